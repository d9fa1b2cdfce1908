//! `containerd-shim-wasm-v2`: WebAssembly workloads in youki containers, on the shim SDK.
//!
//! Each container is a real Linux container (namespaces, cgroups, capabilities, seccomp)
//! made by youki's `libcontainer`; its init runs a WASI module or component with wasmtime
//! instead of `execve`, or execs a native entrypoint (pause, sidecars) as runc would.

mod backend;
mod cgroup_mount;
mod engine;
mod entrypoint;
mod executor;
mod fork;
mod guest;
mod http;
mod image;
mod log;
mod loopback;
mod oci;
mod precompiled;
mod youki;

fn main() {
    // The shim re-executes itself to run libcontainer in a fresh process (see `fork`).
    if let Some(code) = fork::helper_main() {
        std::process::exit(code)
    }
    shim_common::run::<backend::WasmBackend>("containerd-shim-wasm-v2")
}
