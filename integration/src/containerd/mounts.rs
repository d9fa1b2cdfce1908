//! Mounts of a private containerd's directory: its tmpfs state, the overlay probe, and
//! the unmount-everything of teardown.

use std::ffi::{CString, OsStr};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::Error;

/// Whether an overlay mount (with two lower dirs, as containerd's overlayfs
/// snapshotter needs) works inside `dir`. Checked once per process.
pub(super) fn overlay_works(dir: &Path) -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| probe_overlay(&dir.join("overlay-probe")))
}

fn probe_overlay(p: &Path) -> bool {
    let dirs = ["l1", "l2", "u", "w", "m"].map(|n| p.join(n));
    if dirs.iter().any(|d| fs::create_dir_all(d).is_err()) {
        return false;
    }
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        dirs[0].display(),
        dirs[1].display(),
        dirs[2].display(),
        dirs[3].display()
    );
    let ok = match (
        CString::new("overlay"),
        CString::new(dirs[4].as_os_str().as_bytes()),
        CString::new(opts),
    ) {
        (Ok(src), Ok(target), Ok(data)) => {
            // SAFETY: all pointers are valid NUL-terminated strings for the call.
            let rc = unsafe {
                libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    src.as_ptr(),
                    0,
                    data.as_ptr().cast(),
                )
            };
            if rc == 0 {
                // SAFETY: as above.
                unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
            }
            rc == 0
        }
        _ => false,
    };
    let _ = fs::remove_dir_all(p);
    ok
}

pub(super) fn mount_tmpfs(target: &Path) -> Result<(), Error> {
    let c = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
    let path = std::ffi::CString::new(target.as_os_str().as_bytes())
        .map_err(|e| Error::io("tmpfs path", std::io::Error::other(e)))?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            c("tmpfs").as_ptr(),
            path.as_ptr(),
            c("tmpfs").as_ptr(),
            0,
            c("mode=0711").as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(Error::io(
            format!("mount tmpfs on {}", target.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let dir_b = dir.as_os_str().as_bytes();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|m| {
            let b = m.as_os_str().as_bytes();
            b == dir_b || (b.starts_with(dir_b) && b.get(dir_b.len()) == Some(&b'/'))
        })
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// Lazily unmounts everything under `dir`; returns true if nothing is left.
pub(super) fn unmount_all(dir: &Path) -> bool {
    for _ in 0..5 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return true;
        }
        for m in mounts {
            if let Ok(c) = CString::new(m.as_os_str().as_bytes()) {
                // SAFETY: valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
    mounts_under(dir).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(
            unescape_mountinfo(r"/tmp/a\040b\134c"),
            PathBuf::from("/tmp/a b\\c")
        );
    }
}
