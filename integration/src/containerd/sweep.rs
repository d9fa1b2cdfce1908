//! The sweep of directories left by test processes that died without tearing down.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::teardown::cleanup_dir;
use super::{temp_base, DIR_PREFIX};
use crate::error::{Error, IoContext};
use crate::procfs::owner_token;

/// Tears down directories left by test processes that died without running
/// `Drop` (SIGKILL, abort, a test ended at its time bound). Only directories under `base`
/// named `<prefix>*` with an `owner` file whose process no longer exists are touched.
/// Returns a line for each thing removed.
pub(crate) fn sweep_stale(base: &Path, prefix: &str) -> Vec<String> {
    let mut done = Vec::new();
    let Ok(rd) = fs::read_dir(base) else {
        return done;
    };
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name();
        if !name.as_bytes().starts_with(prefix.as_bytes()) {
            continue;
        }
        let dir = e.path();
        let Ok(owner) = fs::read_to_string(dir.join("owner")) else {
            continue;
        };
        // Empty or partial while its owner is still writing it: not ours to judge.
        if !owner_gone(&owner) {
            continue;
        }
        let teardown = cleanup_dir(&dir, &dir.join("c.sock"));
        for (pid, cmd) in teardown.killed {
            done.push(format!("killed pid {pid} of {}: {cmd}", dir.display()));
        }
        if teardown.clean {
            match fs::remove_dir_all(&dir) {
                Ok(()) => done.push(format!("removed {}", dir.display())),
                Err(e) => done.push(format!("removing {}: {e}", dir.display())),
            }
        } else {
            done.push(format!(
                "mounts remain under {}: left in place",
                dir.display()
            ));
        }
    }
    done
}

/// Whether the process a complete `owner` file names (`"<pid> <start time>"`) is gone.
fn owner_gone(owner: &str) -> bool {
    let mut it = owner.split_whitespace();
    let (Some(pid), Some(start)) = (it.next(), it.next()) else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    owner_token(pid).is_none_or(|tok| tok != format!("{pid} {start}"))
}

/// Writes `dir/owner`, naming this process: [`sweep_stale`] leaves the directory alone
/// while it runs.
pub(crate) fn write_owner(dir: &Path) -> Result<(), Error> {
    fs::write(
        dir.join("owner"),
        owner_token(std::process::id()).unwrap_or_default(),
    )
    .ctx_path("writing", &dir.join("owner"))
}

/// Base directory for the private containerds' temp dirs (see [`temp_base`]), and their
/// name prefix.
pub(crate) fn temp_dirs() -> (PathBuf, &'static str) {
    (temp_base(), DIR_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_complete_owner_whose_process_is_gone_is_swept() {
        let me = owner_token(std::process::id()).expect("own token");
        assert!(!owner_gone(&me));
        // Being written by a live test: never swept.
        assert!(!owner_gone(""));
        assert!(!owner_gone(&std::process::id().to_string()));
        // pid_max is at most 2^22: this pid never runs.
        assert!(owner_gone("4194305 12345"));
        // The pid runs, but started at another time: reused.
        assert!(owner_gone(&format!("{} 1", std::process::id())));
    }
}
