//! The runtime binaries a backend drives (runc, crun, runj): found like `execve` would find
//! them, with an error that says which one and why, before anything is set up.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Context, Error, Result};

/// Resolves `name` (a path, or a name on `PATH`). `kind` names it in errors ("runtime",
/// "runj").
///
/// ```
/// let sh = shim_common::executable::resolve("runtime", "sh").unwrap();
/// assert!(sh.is_absolute());
/// let err = shim_common::executable::resolve("runtime", "/nonexistent/runc").unwrap_err();
/// assert!(err.to_string().contains("runtime binary \"/nonexistent/runc\" not found"));
/// ```
pub fn resolve(kind: &str, name: &str) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = if name.contains('/') {
        vec![PathBuf::from(name)]
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
            .unwrap_or_default()
    };
    for c in &candidates {
        if let Ok(m) = fs::metadata(c) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(c.clone());
            }
            if name.contains('/') {
                return Err(Error::FailedPrecondition(format!(
                    "{kind} binary {name:?} is not executable"
                )));
            }
        }
    }
    let path = std::env::var("PATH").unwrap_or_default();
    Err(Error::FailedPrecondition(format!(
        "{kind} binary {name:?} not found (PATH={path})"
    )))
}

/// The pid a runtime wrote to its `--pid-file`.
pub fn read_pid(path: &Path) -> Result<u32> {
    let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    text.trim()
        .parse()
        .map_err(|e| Error::Runtime(format!("bad pid in {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_executable_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("runc");
        fs::write(&f, "").unwrap();
        let err = resolve("runtime", f.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not executable"), "{err}");
    }

    #[test]
    fn pid_files_are_read_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pid");
        fs::write(&f, "1234\n").unwrap();
        assert_eq!(read_pid(&f).unwrap(), 1234);
        fs::write(&f, "x").unwrap();
        assert!(read_pid(&f).is_err());
    }
}
