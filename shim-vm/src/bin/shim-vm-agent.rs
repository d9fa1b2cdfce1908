//! The guest agent: PID 1 of the micro-VM.

fn main() {
    eprintln!("shim-vm-agent: not built yet");
    std::process::exit(1);
}
