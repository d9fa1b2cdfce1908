//! `containerd-shim-jail-v2`: FreeBSD jails through runj, on the shim SDK.

mod backend;
mod options;
mod runj;
mod spec;

fn main() {
    shim_common::run::<backend::JailBackend>("containerd-shim-jail-v2")
}
