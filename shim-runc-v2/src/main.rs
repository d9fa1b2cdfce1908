//! `containerd-shim-runc-v2`: containerd's runc shim, on the shim SDK.

fn main() {
    shim_common::run::<shim_runc_v2::RuncBackend>("containerd-shim-runc-v2")
}
