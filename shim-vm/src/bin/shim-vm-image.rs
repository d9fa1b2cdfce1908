//! Builds the guest image (kernel + initramfs) from Debian packages.

fn main() {
    eprintln!("shim-vm-image: not built yet");
    std::process::exit(1);
}
