//! `shim-conformance`: checks a containerd shim binary against the contract one containerd
//! generation holds it to — without containerd.
//!
//! For runtime authors: before wiring your `containerd-shim-foo-v2` into a containerd
//! release, run
//!
//! ```text
//! shim-conformance --shim /path/containerd-shim-foo-v2 --generation 1.6|1.7|2.0|2.3 \
//!     [--runc-binary NAME] [--runtime-options FILE.toml] [--runtime-options-path FILE.toml]
//! ```
//!
//! as root on a Linux host with `/usr/bin/busybox` (Debian: `busybox-static`). The runner
//! plays containerd: it serves the events service shims forward to
//! (`containerd.services.events.ttrpc.v1.Events/Forward`) on its own socket, lays out a
//! bundle whose `config.json` runs busybox from a plain directory (`root.path`, no
//! snapshotter, no mounts), and runs your `start` with that generation's flags, env
//! (`TTRPC_ADDRESS`; from 1.7 on also `GRPC_ADDRESS`, `NAMESPACE`, `MAX_SHIM_VERSION=2`) and
//! stdin (the runtime options `Any`; from 2.3 on a protobuf `BootstrapParams`). It parses the
//! answer as that containerd does — plain address, JSON `{"version":..}`, or a protobuf
//! `BootstrapResult` — connects to the task API version the answer selects (v2 or v3), and
//! walks a container through Create, Start, State, Exec (exit code 3), Wait, Delete of the
//! exec, Kill (SIGKILL → 137), Wait, Stats (cgroup metrics, as CRI asks after each exit),
//! Delete, checking stdout, exit codes and the events
//! received and their order, then Shutdown (the daemon and its socket must go) and the
//! `delete` action (a `DeleteResponse` with exit status 137).
//!
//! `--sandbox` (2.0 and later) plays containerd 2.x's `shim` sandboxer instead: a pod
//! without a pause container through the sandbox API (`CreateSandbox` with a netns the
//! runner makes, `StartSandbox`, `WaitSandbox`, `SandboxStatus`, a container joining the
//! sandbox's namespaces, a reconnect, `StopSandbox`, `ShutdownSandbox`, `delete`), with
//! every out-of-order call expected refused; it needs `ip` (iproute2).
//!
//! `--vm`: the shim runs its pods in VMs (`containerd-shim-vm-v2`), so the pids it reports
//! are guest pids: the sandbox walk then checks what a pod's container sees (hostname, the
//! holder as its PID 1) instead of comparing namespaces in the host's `/proc`.
//!
//! `--one-socket` plays a daemon other than containerd that has only its ttrpc socket:
//! `-address` and `GRPC_ADDRESS` name the events service's socket too, which speaks no gRPC
//! (a shim must not wait on it).
//!
//! `--rootfs layered` hands the container its rootfs as containerd's EROFS snapshotter does
//! in block mode: the busybox layer as an erofs image (`ro,loop`), a writable ext4 image the
//! shim makes (`mkfs/ext4`, `rw,loop`), and a templated overlay of the two
//! (`format/mkdir/overlay`); after the delete nothing may stay mounted or on a loop device
//! (needs `mkfs.erofs` and `debugfs`: erofs-utils, e2fsprogs). The default, `dir`, is a plain
//! directory in `root.path`.
//!
//! Options: `--runc-binary` sends `containerd.runc.v1.Options{binary_name}`;
//! `--runtime-options` sends `runtimeoptions.v1.Options` with the file's TOML as
//! `config_body`, `--runtime-options-path` with the file's path as `config_path` (what
//! containerd's CRI sends for a runtime with an `options` section).
//!
//! One line per step, `PASS`/`FAIL`; the exit status is 0 only if every step passed (2 for a
//! usage error). On failure the tail of the shim's log follows.

use std::path::PathBuf;
use std::process::ExitCode;

use integration::conformance::{run_lifecycle, run_sandbox_pod, Config, Generation, RootfsLayout};
use protobuf::well_known_types::any::Any;

const USAGE: &str = "usage: shim-conformance --shim PATH --generation 1.6|1.7|2.0|2.3 \
[--runc-binary NAME] [--runtime-options FILE.toml] [--runtime-options-path FILE.toml] [--id ID] \
[--sandbox] [--vm] [--one-socket] [--rootfs dir|layered]";

fn main() -> ExitCode {
    let (config, sandbox) = match parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shim-conformance: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    println!(
        "shim-conformance: {} as containerd {} sees it",
        config.shim.display(),
        config.generation
    );
    let report = match sandbox {
        true => run_sandbox_pod(&config, false),
        false => run_lifecycle(&config),
    };
    print!("{report}");
    if report.passed() {
        println!("PASS all {} steps", report.steps.len());
        ExitCode::SUCCESS
    } else {
        println!(
            "FAIL {} of {} steps",
            report.failures().len(),
            report.steps.len()
        );
        ExitCode::FAILURE
    }
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<(Config, bool), String> {
    let mut sandbox = false;
    let mut one_socket = false;
    let mut in_vm = false;
    let mut rootfs = RootfsLayout::HostDir;
    let mut shim = None;
    let mut generation = None;
    let mut options = None;
    let mut id = format!("conformance-{}", std::process::id());
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--shim" => shim = Some(PathBuf::from(value()?)),
            "--generation" => generation = Some(value()?.parse::<Generation>()?),
            "--id" => id = value()?,
            "--sandbox" => sandbox = true,
            "--one-socket" => one_socket = true,
            "--vm" => in_vm = true,
            "--rootfs" => rootfs = value()?.parse()?,
            "--runc-binary" => {
                let o = protocol::options::Options {
                    binary_name: value()?,
                    ..Default::default()
                };
                options = Some(pack(&o)?);
            }
            "--runtime-options" => {
                let path = value()?;
                let body = std::fs::read(&path).map_err(|e| format!("read {path}: {e}"))?;
                options = Some(pack(&protocol::runtimeoptions::Options {
                    config_body: body,
                    ..Default::default()
                })?);
            }
            "--runtime-options-path" => {
                options = Some(pack(&protocol::runtimeoptions::Options {
                    config_path: value()?,
                    ..Default::default()
                })?);
            }
            "-h" | "--help" => return Err("help".into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let config = Config {
        shim: shim.ok_or("--shim is required")?,
        generation: generation.ok_or("--generation is required")?,
        runtime_options: options,
        id,
        one_socket,
        in_vm,
        rootfs,
    };
    if sandbox && matches!(config.generation, Generation::V1_6 | Generation::V1_7) {
        return Err(format!(
            "--sandbox: containerd {} has no shim sandboxer",
            config.generation
        ));
    }
    Ok((config, sandbox))
}

fn pack<M: protocol::TypeUrl>(m: &M) -> Result<Any, String> {
    protocol::pack(m).map_err(|e| format!("encode runtime options: {e}"))
}
