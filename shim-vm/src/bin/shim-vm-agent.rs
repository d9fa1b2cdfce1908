//! The guest agent: PID 1 of the micro-VM.

fn main() {
    if let Err(e) = shim_vm::agent::run() {
        eprintln!("shim-vm-agent: {e}");
    }
    // PID 1 must not exit: power off (or, failing that, exiting panics the guest kernel,
    // which QEMU, run with -no-reboot, ends on too).
    if let Err(e) = shim_vm::boot::poweroff() {
        eprintln!("shim-vm-agent: power off: {e}");
    }
}
