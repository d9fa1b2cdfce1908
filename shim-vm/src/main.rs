//! `containerd-shim-vm-v2`: each container group in its own QEMU microvm, whose guest
//! agent serves the SDK's task service with the runc backend.

fn main() {
    shim_common::run::<shim_vm::backend::VmBackend>("containerd-shim-vm-v2")
}
