//! containerd's shim wire API, generated from the `.proto` files in `proto/` by ttrpc's
//! pure-Rust codegen; plus the messages of containerd's own content, images, containers and
//! leases gRPC services (see [`grpc`]), which a shim calls on containerd's main socket.
//!
//! Package names, field numbers and types match containerd's, so these messages are
//! byte-compatible with what containerd sends and expects. The modules are flat siblings
//! because the generated code refers to its imports as `super::<file>`.
//!
//! ```
//! use protocol::shim::CreateTaskRequest;
//! use protobuf::Message;
//!
//! let req = CreateTaskRequest { id: "c1".into(), ..Default::default() };
//! let bytes = req.write_to_bytes().unwrap();
//! assert_eq!(CreateTaskRequest::parse_from_bytes(&bytes).unwrap().id, "c1");
//! ```

pub use protobuf;
pub use ttrpc;

macro_rules! generated {
    ($($name:ident),* $(,)?) => {
        $(
            #[allow(clippy::all, clippy::pedantic, missing_docs, unused, non_camel_case_types, non_snake_case, non_upper_case_globals)]
            pub mod $name {
                include!(concat!(env!("OUT_DIR"), "/", stringify!($name), ".rs"));
            }
        )*
    };
}

generated!(
    mount,
    task,
    metrics,
    shim,
    task_events,
    events,
    options,
    runtimeoptions,
    cgroups_v1,
    cgroups_v2,
    bootstrap,
    introspection,
    agent,
    descriptor,
    content,
    images,
    containers,
    leases,
    platform,
    sandbox,
);

// ttrpc's sync glue: clients for test harnesses (the SDK dispatches the task methods itself).
#[cfg(feature = "sync")]
generated!(shim_ttrpc, events_ttrpc, sandbox_ttrpc);

/// `containerd.task.v2.Task` as containerd names it on the wire.
pub const TASK_SERVICE_V2: &str = "containerd.task.v2.Task";
/// `containerd.task.v3.Task`: containerd 2.x asks for the same methods under this name.
pub const TASK_SERVICE_V3: &str = "containerd.task.v3.Task";
/// The micro-VM guest agent's own calls ([`agent`]), served beside the task service.
pub const AGENT_SERVICE: &str = "shim.vm.agent.v1.Agent";
/// containerd 2.x's sandbox API ([`sandbox`]), served beside the task service by shims
/// whose backend holds pods (`sandboxer = "shim"`).
pub const SANDBOX_SERVICE: &str = "containerd.runtime.sandbox.v1.Sandbox";

/// `SandboxStatusResponse.state`: containerd compares these strings exactly.
pub mod sandbox_state {
    /// Started and not stopped.
    pub const READY: &str = "SANDBOX_READY";
    /// Created but not started, or stopped.
    pub const NOT_READY: &str = "SANDBOX_NOTREADY";
}

/// containerd's own gRPC services on its main socket (the shim's `-address`), for shims that
/// read images and content. Messages: [`content`], [`images`], [`containers`], [`leases`].
pub mod grpc {
    /// gRPC metadata key naming the namespace of every call.
    pub const NAMESPACE_HEADER: &str = "containerd-namespace";
    /// gRPC metadata key attaching a lease: content written under it is kept until the lease
    /// is deleted (or expires), whatever references it.
    pub const LEASE_HEADER: &str = "containerd-lease";

    pub const CONTAINERS_GET: &str = "/containerd.services.containers.v1.Containers/Get";
    pub const CONTAINERS_CREATE: &str = "/containerd.services.containers.v1.Containers/Create";
    pub const CONTAINERS_DELETE: &str = "/containerd.services.containers.v1.Containers/Delete";
    pub const IMAGES_GET: &str = "/containerd.services.images.v1.Images/Get";
    pub const CONTENT_INFO: &str = "/containerd.services.content.v1.Content/Info";
    pub const CONTENT_UPDATE: &str = "/containerd.services.content.v1.Content/Update";
    /// Server-streaming: `ReadContentResponse` chunks.
    pub const CONTENT_READ: &str = "/containerd.services.content.v1.Content/Read";
    /// Bidirectional streaming: `WriteContentRequest` in, `WriteContentResponse` out.
    pub const CONTENT_WRITE: &str = "/containerd.services.content.v1.Content/Write";
    pub const CONTENT_DELETE: &str = "/containerd.services.content.v1.Content/Delete";
    pub const LEASES_CREATE: &str = "/containerd.services.leases.v1.Leases/Create";
    pub const LEASES_DELETE: &str = "/containerd.services.leases.v1.Leases/Delete";
    pub const LEASES_ADD_RESOURCE: &str = "/containerd.services.leases.v1.Leases/AddResource";
}

/// Type URLs containerd uses in `google.protobuf.Any` (the message's full name, no prefix).
pub mod type_urls {
    /// `containerd.runc.v1.Options`, the runc shim's options.
    pub const RUNC_OPTIONS: &str = "containerd.runc.v1.Options";
    /// `runtimeoptions.v1.Options`, what the CRI plugin sends for a runtime with options.
    pub const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";
    /// An OCI runtime `Spec`, JSON-encoded: a sandbox's, in `StartSandboxResponse.spec`.
    pub const OCI_SPEC: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
    /// An OCI runtime-spec `Process`, JSON-encoded, carried by `ExecProcessRequest.spec`.
    pub const OCI_PROCESS: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
    /// An OCI runtime's `features` JSON (what `runc features` prints), as containerd 2.x reads
    /// it from a shim's `-info` (`RuntimeInfo.features`).
    pub const OCI_FEATURES: &str =
        "types.containerd.io/opencontainers/runtime-spec/1/features/Features";
    /// Per-process details the runc shim attaches to `Pids` answers.
    pub const PROCESS_DETAILS: &str = "containerd.runc.v1.ProcessDetails";
    /// cgroups v1 `Stats` answer; containerd picks the decoder by this name. The cgroup
    /// metrics are generated without reflection (`protocol::pack` cannot name them).
    pub const CGROUPS_V1_METRICS: &str = "io.containerd.cgroups.v1.Metrics";
    /// cgroups v2 `Stats` answer.
    pub const CGROUPS_V2_METRICS: &str = "io.containerd.cgroups.v2.Metrics";
}

/// Event topics a shim publishes, with the event message that goes with each.
pub mod topics {
    pub const TASK_CREATE: &str = "/tasks/create";
    pub const TASK_START: &str = "/tasks/start";
    pub const TASK_EXIT: &str = "/tasks/exit";
    pub const TASK_DELETE: &str = "/tasks/delete";
    pub const TASK_EXEC_ADDED: &str = "/tasks/exec-added";
    pub const TASK_EXEC_STARTED: &str = "/tasks/exec-started";
    pub const TASK_PAUSED: &str = "/tasks/paused";
    pub const TASK_RESUMED: &str = "/tasks/resumed";
    pub const TASK_OOM: &str = "/tasks/oom";
    pub const TASK_CHECKPOINTED: &str = "/tasks/checkpointed";
}

/// A message's full protobuf name, known without reflection: asking a rust-protobuf message
/// for its descriptor builds the descriptors of its whole .proto file and its imports
/// (~60 KB of heap that a shim would keep for its lifetime), just to read a name.
pub trait TypeUrl: protobuf::Message {
    const TYPE_URL: &'static str;
}

macro_rules! type_urls {
    ($($ty:ty => $url:expr),* $(,)?) => {
        $(impl TypeUrl for $ty {
            const TYPE_URL: &'static str = $url;
        })*
        /// Every [`TypeUrl`], checked against reflection in the tests.
        #[cfg(test)]
        fn reflected_type_urls() -> Vec<(&'static str, String)> {
            use protobuf::MessageFull;
            vec![$((<$ty as TypeUrl>::TYPE_URL, <$ty>::descriptor().full_name().to_string())),*]
        }
    };
}

type_urls! {
    task_events::TaskCreate => "containerd.events.TaskCreate",
    task_events::TaskStart => "containerd.events.TaskStart",
    task_events::TaskDelete => "containerd.events.TaskDelete",
    task_events::TaskIO => "containerd.events.TaskIO",
    task_events::TaskExit => "containerd.events.TaskExit",
    task_events::TaskOOM => "containerd.events.TaskOOM",
    task_events::TaskExecAdded => "containerd.events.TaskExecAdded",
    task_events::TaskExecStarted => "containerd.events.TaskExecStarted",
    task_events::TaskPaused => "containerd.events.TaskPaused",
    task_events::TaskResumed => "containerd.events.TaskResumed",
    task_events::TaskCheckpointed => "containerd.events.TaskCheckpointed",
    options::Options => type_urls::RUNC_OPTIONS,
    options::CheckpointOptions => "containerd.runc.v1.CheckpointOptions",
    options::ProcessDetails => type_urls::PROCESS_DETAILS,
    runtimeoptions::Options => type_urls::RUNTIME_OPTIONS,
}

/// Packs a message into an `Any` the way containerd's `typeurl` does: the type URL is the
/// message's full protobuf name, without the `type.googleapis.com/` prefix.
pub fn pack<M: TypeUrl>(msg: &M) -> protobuf::Result<protobuf::well_known_types::any::Any> {
    Ok(protobuf::well_known_types::any::Any {
        type_url: M::TYPE_URL.to_string(),
        value: msg.write_to_bytes()?,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::Message;

    #[test]
    fn type_urls_match_reflection() {
        for (url, reflected) in reflected_type_urls() {
            assert_eq!(url, reflected);
        }
    }

    #[test]
    fn event_type_urls_match_containerd() {
        let any = pack(&task_events::TaskExit::default()).unwrap();
        assert_eq!(any.type_url, "containerd.events.TaskExit");
        let any = pack(&options::Options::default()).unwrap();
        assert_eq!(any.type_url, type_urls::RUNC_OPTIONS);
        let any = pack(&runtimeoptions::Options::default()).unwrap();
        assert_eq!(any.type_url, type_urls::RUNTIME_OPTIONS);
    }

    #[test]
    fn field_numbers_match_containerd() {
        // KillRequest{id=1:"c", exec_id=2:"e", signal=3:9, all=4:true}
        let req = shim::KillRequest {
            id: "c".into(),
            exec_id: "e".into(),
            signal: 9,
            all: true,
            ..Default::default()
        };
        let bytes = req.write_to_bytes().unwrap();
        assert_eq!(bytes, [0x0a, 1, b'c', 0x12, 1, b'e', 0x18, 9, 0x20, 1]);
        // runc Options: binary_name is field 6, root field 7, systemd_cgroup field 9.
        let opts = options::Options {
            binary_name: "b".into(),
            root: "r".into(),
            systemd_cgroup: true,
            ..Default::default()
        };
        assert_eq!(
            opts.write_to_bytes().unwrap(),
            [0x32, 1, b'b', 0x3a, 1, b'r', 0x48, 1]
        );
    }

    #[test]
    fn grpc_messages_match_containerd() {
        // WriteContentRequest{action=1:COMMIT(2), ref=2:"r", total=3:5, expected=4:"d", offset=5:1}
        let req = content::WriteContentRequest {
            action: content::WriteAction::COMMIT.into(),
            ref_: "r".into(),
            total: 5,
            expected: "d".into(),
            offset: 1,
            ..Default::default()
        };
        assert_eq!(
            req.write_to_bytes().unwrap(),
            [0x08, 2, 0x12, 1, b'r', 0x18, 5, 0x22, 1, b'd', 0x28, 1]
        );
        // Image{target=3:{media_type=1:"m", digest=2:"d", size=3:7}}
        let image = images::Image {
            target: protobuf::MessageField::some(descriptor::Descriptor {
                media_type: "m".into(),
                digest: "d".into(),
                size: 7,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            image.write_to_bytes().unwrap(),
            [0x1a, 8, 0x0a, 1, b'm', 0x12, 1, b'd', 0x18, 7]
        );
        // Container.image is field 3; leases CreateRequest.labels is field 3 (2 unused).
        let c = containers::Container {
            image: "i".into(),
            ..Default::default()
        };
        assert_eq!(c.write_to_bytes().unwrap(), [0x1a, 1, b'i']);
        let lease = leases::CreateRequest {
            labels: [("k".to_string(), "v".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(
            lease.write_to_bytes().unwrap(),
            [0x1a, 6, 0x0a, 1, b'k', 0x12, 1, b'v']
        );
    }

    #[test]
    fn cgroup_metrics_match_containerd() {
        // Generated without reflection, so the type URLs are constants: pin them to the
        // package and message name of the .proto files they come from.
        for (proto, url) in [
            (
                include_str!("../proto/cgroups/v1/cgroups_v1.proto"),
                type_urls::CGROUPS_V1_METRICS,
            ),
            (
                include_str!("../proto/cgroups/v2/cgroups_v2.proto"),
                type_urls::CGROUPS_V2_METRICS,
            ),
        ] {
            let package = url.strip_suffix(".Metrics").unwrap();
            assert!(proto.contains(&format!("\npackage {package};\n")));
            assert!(proto.contains("\nmessage Metrics {\n"));
        }
        // v1: pids = 2 {current = 1}; memory_oom_control = 9 {oom_kill = 3}.
        let m = cgroups_v1::Metrics {
            pids: protobuf::MessageField::some(cgroups_v1::PidsStat {
                current: 5,
                ..Default::default()
            }),
            memory_oom_control: protobuf::MessageField::some(cgroups_v1::MemoryOomControl {
                oom_kill: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            m.write_to_bytes().unwrap(),
            [0x12, 2, 0x08, 5, 0x4a, 2, 0x18, 1]
        );
        // v1 MemoryStat: total_rss = 19, usage = 33 {usage = 2}.
        let mem = cgroups_v1::MemoryStat {
            total_rss: 7,
            usage: protobuf::MessageField::some(cgroups_v1::MemoryEntry {
                usage: 9,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            mem.write_to_bytes().unwrap(),
            [0x98, 0x01, 7, 0x8a, 0x02, 2, 0x10, 9]
        );
        // v2: memory = 4 {usage = 32}; memory_events = 8 {oom_kill = 5}.
        let m = cgroups_v2::Metrics {
            memory: protobuf::MessageField::some(cgroups_v2::MemoryStat {
                usage: 3,
                ..Default::default()
            }),
            memory_events: protobuf::MessageField::some(cgroups_v2::MemoryEvents {
                oom_kill: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            m.write_to_bytes().unwrap(),
            [0x22, 3, 0x80, 0x02, 3, 0x42, 2, 0x28, 1]
        );
    }
}
