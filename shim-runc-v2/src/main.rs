//! `containerd-shim-runc-v2`: containerd's runc shim, on the shim SDK.

mod backend;
mod options;
mod runc;

fn main() {
    shim_common::run::<backend::RuncBackend>("containerd-shim-runc-v2")
}
