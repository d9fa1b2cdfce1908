//! Generates the wire API from `proto/` with ttrpc's pure-Rust codegen (no `protoc`).

use std::fs;
use std::path::{Path, PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

const PROTOS: &[&str] = &[
    "proto/types/mount.proto",
    "proto/types/task.proto",
    "proto/types/metrics.proto",
    "proto/task/v2/shim.proto",
    "proto/events/task_events.proto",
    "proto/events/events.proto",
    "proto/runc/options.proto",
    "proto/runtimeoptions/runtimeoptions.proto",
    "proto/bootstrap/bootstrap.proto",
    "proto/types/introspection.proto",
    "proto/vm/agent.proto",
    "proto/types/platform.proto",
    "proto/sandbox/v1/sandbox.proto",
];

/// containerd's cgroup metrics (the `Stats` answer), generated without reflection: with it
/// their ~200 fields cost ~380 KB of a ~2.5 MB shim; nothing needs their descriptors, since
/// `type_urls::CGROUPS_V*_METRICS` name them for the `Any`.
const LITE_PROTOS: &[&str] = &[
    "proto/cgroups/v1/cgroups_v1.proto",
    "proto/cgroups/v2/cgroups_v2.proto",
];

/// containerd's own gRPC services (content, images, containers, leases) that a shim calls on
/// containerd's main socket: messages only, no service code (tonic drives them with a small
/// codec in the caller), and without reflection for the same size reason as above.
const GRPC_PROTOS: &[&str] = &[
    "proto/types/descriptor.proto",
    "proto/services/content/v1/content.proto",
    "proto/services/images/v1/images.proto",
    "proto/services/containers/v1/containers.proto",
    "proto/services/leases/v1/leases.proto",
];

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for p in PROTOS.iter().chain(LITE_PROTOS).chain(GRPC_PROTOS) {
        println!("cargo:rerun-if-changed={p}");
    }
    Codegen::new()
        .out_dir(&out)
        .inputs(PROTOS)
        .include("proto")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .customize(Customize {
            ..Default::default()
        })
        .run()
        .expect("generating the shim protocol failed");
    // Both lite sets in one run: same options, and one parse of the shared imports.
    let lite: Vec<&str> = LITE_PROTOS.iter().chain(GRPC_PROTOS).copied().collect();
    Codegen::new()
        .out_dir(&out)
        .inputs(&lite)
        .include("proto")
        .rust_protobuf()
        .rust_protobuf_customize(
            ProtobufCustomize::default()
                .gen_mod_rs(false)
                .lite_runtime(true),
        )
        .run()
        .expect("generating the cgroup metrics and containerd's gRPC messages failed");
    strip_inner_attributes(&out);
}

/// `include!` cannot take files with inner attributes (`#![...]`) or inner doc comments;
/// the wrapping modules in `lib.rs` carry the `allow`s instead.
fn strip_inner_attributes(dir: &Path) {
    for entry in fs::read_dir(dir).expect("OUT_DIR is readable") {
        let path = entry.expect("OUT_DIR entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = fs::read_to_string(&path).expect("generated file is UTF-8");
            let kept: String = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("#!["))
                .map(|l| match l.strip_prefix("//!") {
                    Some(rest) => format!("//{rest}\n"),
                    None => format!("{l}\n"),
                })
                .collect();
            fs::write(&path, kept).expect("rewrite generated file");
        }
    }
}
