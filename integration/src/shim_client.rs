//! Talking ttrpc to a running shim directly, beside containerd: for requests `ctr` cannot
//! make (bad input, resize of a non-tty, update) and for driving thousands of execs fast.

use std::path::PathBuf;

use protocol::shim_ttrpc::TaskClient;

use crate::containerd::Containerd;

/// Seconds-based timeout for ttrpc calls.
pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(30_000_000_000)
}

/// The bundle containerd made for task `id`.
pub fn bundle(c: &Containerd, id: &str) -> PathBuf {
    c.state_dir()
        .join("io.containerd.runtime.v2.task")
        .join(c.namespace())
        .join(id)
}

/// A task client on the shim serving container `id` (its address is in the bundle).
pub fn connect(c: &Containerd, id: &str) -> TaskClient {
    let path = bundle(c, id).join("address");
    let address =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let client = ttrpc::Client::connect(address.trim())
        .unwrap_or_else(|e| panic!("connect to shim at {address}: {e}"));
    TaskClient::new(client)
}

/// The ttrpc status code of a failed call (`None` for success or a transport error).
pub fn code<T>(r: &ttrpc::Result<T>) -> Option<ttrpc::Code> {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => Some(s.code()),
        _ => None,
    }
}

/// An OCI process spec JSON for an exec of `args`.
pub fn process_spec(args: &[&str]) -> protobuf::well_known_types::any::Any {
    let spec = serde_json::json!({
        "args": args,
        "cwd": "/",
        "env": ["PATH=/bin:/usr/bin:/sbin:/usr/sbin"],
        "user": {"uid": 0, "gid": 0},
    });
    protobuf::well_known_types::any::Any {
        type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
        value: spec.to_string().into_bytes(),
        ..Default::default()
    }
}

/// An `Update` of task `id` with `json` as its OCI `LinuxResources`, as containerd sends it.
pub fn update_request(id: &str, json: &str) -> protocol::shim::UpdateTaskRequest {
    protocol::shim::UpdateTaskRequest {
        id: id.to_string(),
        resources: protobuf::MessageField::some(protobuf::well_known_types::any::Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
            value: json.as_bytes().to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Adds exec `exec_id` running `args` to container `id` and starts it; returns its pid.
pub fn start_exec(shim: &TaskClient, id: &str, exec_id: &str, args: &[&str]) -> u32 {
    let exec = protocol::shim::ExecProcessRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        spec: protobuf::MessageField::some(process_spec(args)),
        ..Default::default()
    };
    shim.exec(ctx(), &exec)
        .unwrap_or_else(|e| panic!("exec {exec_id} in {id}: {e}"));
    let start = protocol::shim::StartRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        ..Default::default()
    };
    shim.start(ctx(), &start)
        .unwrap_or_else(|e| panic!("start exec {exec_id} in {id}: {e}"))
        .pid
}
