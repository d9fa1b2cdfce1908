//! Files put in place whole or not at all: written beside their destination, checked,
//! flushed, then renamed over it. A shim that is running keeps the inode it was started
//! from; containerd never reads half a config.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use thiserror::Error;

/// A file operation that failed, with the path it failed on.
#[derive(Debug, Error)]
pub enum FileError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: sha256 {actual}, but the release's SHA256SUMS says {expected}", path.display())]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{}: line {line} is not `<sha256>  <file>`", path.display())]
    Sums { path: PathBuf, line: usize },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FileError {
    let path = path.to_path_buf();
    move |source| FileError::Io { what, path, source }
}

/// The sha256 of the file at `path`, in hex.
pub fn sha256_file(path: &Path) -> Result<String, FileError> {
    let mut f = File::open(path).map_err(io_err("opening", path))?;
    let mut hasher = Sha256::new();
    io::copy(&mut f, &mut hasher).map_err(io_err("reading", path))?;
    Ok(hex(&hasher.finalize()))
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A release's `SHA256SUMS` (`sha256sum`'s format): relative path → sha256.
pub fn read_sums(path: &Path) -> Result<HashMap<String, String>, FileError> {
    let text = fs::read_to_string(path).map_err(io_err("reading", path))?;
    let mut sums = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || FileError::Sums {
            path: path.to_path_buf(),
            line: i + 1,
        };
        let (sum, name) = line.split_once(' ').ok_or_else(bad)?;
        // Text mode is two spaces, binary mode a space and `*`.
        let name = name.strip_prefix([' ', '*']).ok_or_else(bad)?;
        if sum.len() != 64 || !sum.bytes().all(|b| b.is_ascii_hexdigit()) || name.is_empty() {
            return Err(bad());
        }
        sums.insert(name.to_string(), sum.to_ascii_lowercase());
    }
    Ok(sums)
}

/// Whether [`install`] changed the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Written,
    Unchanged,
}

/// Puts a copy of `src` at `dest` (mode `mode`) unless `dest` already has sha256
/// `expected`; the copy's bytes are hashed as they are written and must match.
pub fn install(src: &Path, dest: &Path, expected: &str, mode: u32) -> Result<Outcome, FileError> {
    if dest.exists() && sha256_file(dest)? == expected {
        set_mode(dest, mode)?;
        return Ok(Outcome::Unchanged);
    }
    let mut input = File::open(src).map_err(io_err("opening", src))?;
    let mut hasher = Sha256::new();
    write_atomic(dest, mode, |out| {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = input.read(&mut buf).map_err(io_err("reading", src))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io_err("writing", dest))?;
        }
        let actual = hex(&hasher.finalize_reset());
        if actual != expected {
            return Err(FileError::Checksum {
                path: src.to_path_buf(),
                expected: expected.to_string(),
                actual,
            });
        }
        Ok(())
    })?;
    Ok(Outcome::Written)
}

/// Replaces `dest` with `bytes` (mode `mode`).
pub fn write_bytes(dest: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    write_atomic(dest, mode, |out| {
        out.write_all(bytes).map_err(io_err("writing", dest))
    })
}

/// Writes through `fill` into a temporary file beside `dest`, flushes it and renames it
/// over `dest`, then flushes the directory; on any error the temporary file goes.
fn write_atomic(
    dest: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> Result<(), FileError>,
) -> Result<(), FileError> {
    let (dir, tmp) = beside(dest)?;
    let result = (|| {
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err("creating", &tmp))?;
        fill(&mut out)?;
        out.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", &tmp))?;
        out.sync_all().map_err(io_err("flushing", &tmp))?;
        fs::rename(&tmp, dest).map_err(io_err("renaming into place", dest))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("flushing", &dir))
}

/// The directory of `dest` (created) and a temporary name in it, for what is renamed over
/// `dest` once complete.
fn beside(dest: &Path) -> Result<(PathBuf, PathBuf), FileError> {
    let dir = dest.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.shim-installer.{}", std::process::id()));
    Ok((dir.to_path_buf(), tmp))
}

/// Removes the file `path`.
pub fn remove(path: &Path) -> Result<(), FileError> {
    fs::remove_file(path).map_err(io_err("removing", path))
}

/// Makes `link` a symbolic link to `target` (created beside it and renamed over it, so a
/// lookup never misses); nothing is done when it already is.
pub fn link(target: &Path, link: &Path) -> Result<Outcome, FileError> {
    if fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(Outcome::Unchanged);
    }
    let (_, tmp) = beside(link)?;
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(io_err("linking", &tmp))?;
    if let Err(e) = fs::rename(&tmp, link) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("renaming into place", link)(e));
    }
    Ok(Outcome::Written)
}

/// Removes the link `link` if it still points to `target`. Returns whether it was removed.
pub fn remove_link_if_ours(link: &Path, target: &Path) -> Result<bool, FileError> {
    match fs::read_link(link) {
        Ok(t) if t == target => {
            fs::remove_file(link).map_err(io_err("removing", link))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), FileError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

/// Removes `path` if it still has sha256 `expected`; a file changed since (someone else's
/// now) stays. Returns whether it was removed.
pub fn remove_if_ours(path: &Path, expected: &str) -> Result<bool, FileError> {
    match sha256_file(path) {
        Ok(sum) if sum == expected => {
            fs::remove_file(path).map_err(io_err("removing", path))?;
            Ok(true)
        }
        Ok(_) => Ok(false),
        Err(FileError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn install_replaces_atomically_and_keeps_the_old_inode_for_its_users() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::write(&src, b"new shim").unwrap();
        let dest = d.path().join("bin").join("shim");
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        fs::write(&dest, b"old shim").unwrap();
        // A running shim: an open descriptor of the old file.
        let old = File::open(&dest).unwrap();
        let old_ino = old.metadata().unwrap().ino();

        let sum = sha256_bytes(b"new shim");
        assert_eq!(install(&src, &dest, &sum, 0o755).unwrap(), Outcome::Written);
        assert_eq!(fs::read(&dest).unwrap(), b"new shim");
        assert_ne!(fs::metadata(&dest).unwrap().ino(), old_ino);
        assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o777, 0o755);
        let mut was = String::new();
        (&old).read_to_string(&mut was).unwrap();
        assert_eq!(was, "old shim");

        assert_eq!(
            install(&src, &dest, &sum, 0o755).unwrap(),
            Outcome::Unchanged
        );
        // Nothing but the file itself in the directory.
        assert_eq!(fs::read_dir(dest.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn a_checksum_mismatch_leaves_the_destination_alone() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::write(&src, b"tampered").unwrap();
        let dest = d.path().join("shim");
        fs::write(&dest, b"old").unwrap();
        let err = install(&src, &dest, &sha256_bytes(b"release"), 0o755).unwrap_err();
        assert!(matches!(err, FileError::Checksum { .. }), "{err}");
        assert_eq!(fs::read(&dest).unwrap(), b"old");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 2);
    }

    #[test]
    fn sums_files_are_read_as_sha256sum_writes_them() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("SHA256SUMS");
        let a = sha256_bytes(b"a");
        fs::write(&p, format!("{a}  bin/a\n{a} *vm-guest/b\n\n")).unwrap();
        let sums = read_sums(&p).unwrap();
        assert_eq!(sums["bin/a"], a);
        assert_eq!(sums["vm-guest/b"], a);
        fs::write(&p, "abc  x\n").unwrap();
        assert!(matches!(
            read_sums(&p),
            Err(FileError::Sums { line: 1, .. })
        ));
    }

    #[test]
    fn links_are_replaced_whole_and_removed_only_while_ours() {
        let d = tempfile::tempdir().unwrap();
        let l = d.path().join("containerd-shim-rs-x-v2");
        fs::write(&l, b"someone else's").unwrap();
        let target = Path::new("/opt/containerd-shims/bin/x");
        assert_eq!(link(target, &l).unwrap(), Outcome::Written);
        assert_eq!(fs::read_link(&l).unwrap(), target);
        assert_eq!(link(target, &l).unwrap(), Outcome::Unchanged);
        assert!(!remove_link_if_ours(&l, Path::new("/other")).unwrap());
        assert!(remove_link_if_ours(&l, target).unwrap());
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn only_unchanged_files_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        fs::write(&p, b"ours").unwrap();
        assert!(!remove_if_ours(&p, &sha256_bytes(b"other")).unwrap());
        assert!(p.exists());
        assert!(remove_if_ours(&p, &sha256_bytes(b"ours")).unwrap());
        assert!(!remove_if_ours(&p, &sha256_bytes(b"ours")).unwrap());
    }
}
