//! Removes what earlier, killed test runs left on this machine (see
//! `integration::leftovers`), logging each process killed and each thing removed. `make
//! test` runs it before and after the tests; `make clean-machine` runs it too.
//!
//! Usage: `shimtest-sweep` (as root).

fn main() {
    integration::require_root();
    let done = integration::leftovers::sweep();
    if done.is_empty() {
        eprintln!("shimtest-sweep: nothing left by earlier runs");
    }
    for line in &done {
        eprintln!("shimtest-sweep: {line}");
    }
}
