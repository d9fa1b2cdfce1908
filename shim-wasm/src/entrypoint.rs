//! What `process.args[0]` names: a Wasm module or component (run by wasmtime), or a native
//! program (ELF, `#!` script) that runs through libcontainer's own `execve`.
//!
//! The file is looked up on the host, inside the container's rootfs, before the container
//! exists, so a bad module fails `Create` with a clear error instead of a dead init.

use std::path::{Component, Path, PathBuf};

use shim_common::{Context, Error, Result};

/// `args[0]` split into the module path and the export after `#` (`/app.wasm#serve`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entrypoint {
    pub path: String,
    /// The exported function to call; `None` means the default (`_start` / `wasi:cli/run`).
    pub func: Option<String>,
}

impl Entrypoint {
    pub fn parse(arg0: &str) -> Entrypoint {
        match arg0.rsplit_once('#') {
            Some((path, func)) if !func.is_empty() && !path.is_empty() => Entrypoint {
                path: path.to_string(),
                func: Some(func.to_string()),
            },
            _ => Entrypoint {
                path: arg0.to_string(),
                func: None,
            },
        }
    }
}

/// What the container's init will run.
#[derive(Debug)]
pub enum Workload {
    /// A program the kernel executes: libcontainer's default executor handles it.
    Native,
    /// Wasm bytes (binary or `.wat` text) read from the rootfs.
    Wasm { entry: Entrypoint, bytes: Vec<u8> },
}

/// Classifies `args[0]` of a container whose rootfs is at `rootfs`, with the spec's `PATH`.
pub fn classify(args: &[String], path_env: Option<&str>, rootfs: &Path) -> Result<Workload> {
    let arg0 = args.first().map(String::as_str).unwrap_or_default();
    if arg0.is_empty() {
        return Err(Error::InvalidArgument(
            "process.args is empty: no module or program to run".into(),
        ));
    }
    let entry = Entrypoint::parse(arg0);
    let looks_wasm =
        entry.func.is_some() || entry.path.ends_with(".wasm") || entry.path.ends_with(".wat");
    let Some(host) = find(&entry.path, path_env, rootfs) else {
        if looks_wasm {
            return Err(Error::NotFound(format!(
                "module {:?} in the container's rootfs",
                entry.path
            )));
        }
        // Let libcontainer report a missing program the way runc would.
        return Ok(Workload::Native);
    };
    let bytes = std::fs::read(&host).with_context(|| format!("read {}", entry.path))?;
    if bytes.starts_with(b"\x7fELF") || (bytes.starts_with(b"#!") && !looks_wasm) {
        return Ok(Workload::Native);
    }
    if bytes.starts_with(b"\0asm") || looks_wasm {
        return Ok(Workload::Wasm { entry, bytes });
    }
    Ok(Workload::Native)
}

/// The host path of `path` (absolute, or looked up on `PATH`) inside `rootfs`.
pub fn find(path: &str, path_env: Option<&str>, rootfs: &Path) -> Option<PathBuf> {
    if path.contains('/') {
        return resolve_in_root(rootfs, Path::new(path)).filter(|p| p.is_file());
    }
    path_env
        .unwrap_or("/usr/local/bin:/usr/bin:/bin")
        .split(':')
        .filter_map(|dir| resolve_in_root(rootfs, &Path::new(dir).join(path)))
        .find(|p| p.is_file())
}

/// Resolves `path` as the container will see it: symlinks are followed with `rootfs` as
/// `/`, so an image cannot make the shim read a host file through `/app.wasm -> /etc/...`.
pub fn resolve_in_root(rootfs: &Path, path: &Path) -> Option<PathBuf> {
    let mut resolved = PathBuf::from("/");
    let mut pending: Vec<PathBuf> = vec![path.to_path_buf()];
    let mut links = 0;
    while let Some(next) = pending.pop() {
        let mut parts: Vec<Component> = next.components().collect();
        parts.reverse();
        while let Some(part) = parts.pop() {
            match part {
                Component::RootDir => resolved = PathBuf::from("/"),
                Component::CurDir | Component::Prefix(_) => {}
                Component::ParentDir => {
                    resolved.pop();
                }
                Component::Normal(name) => {
                    let candidate = resolved.join(name);
                    let host = rootfs.join(candidate.strip_prefix("/").ok()?);
                    match std::fs::read_link(&host) {
                        Ok(target) => {
                            links += 1;
                            if links > 40 {
                                return None;
                            }
                            // The rest of this path continues after the link's target.
                            let rest: PathBuf = parts.iter().rev().collect();
                            parts.clear();
                            pending.push(rest);
                            pending.push(target);
                        }
                        Err(_) => resolved = candidate,
                    }
                }
            }
        }
    }
    Some(rootfs.join(resolved.strip_prefix("/").ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn func_after_hash() {
        assert_eq!(
            Entrypoint::parse("/app.wasm#serve"),
            Entrypoint {
                path: "/app.wasm".into(),
                func: Some("serve".into())
            }
        );
        assert_eq!(Entrypoint::parse("/app.wasm").func, None);
        assert_eq!(Entrypoint::parse("/app.wasm#").func, None);
    }

    #[test]
    fn symlinks_stay_inside_the_rootfs() {
        let root = std::env::temp_dir().join(format!("wasm-entry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/real.wasm"), b"\0asm\x01\0\0\0").unwrap();
        std::os::unix::fs::symlink("/bin/real.wasm", root.join("app.wasm")).unwrap();
        std::os::unix::fs::symlink("../../../../etc/passwd", root.join("bin/escape")).unwrap();
        assert_eq!(
            resolve_in_root(&root, Path::new("/app.wasm")),
            Some(root.join("bin/real.wasm"))
        );
        assert_eq!(
            resolve_in_root(&root, Path::new("/bin/escape")),
            Some(root.join("etc/passwd"))
        );
        let args = vec!["/app.wasm".to_string()];
        assert!(matches!(
            classify(&args, None, &root).unwrap(),
            Workload::Wasm { .. }
        ));
        let missing = vec!["/nope.wasm".to_string()];
        assert!(classify(&missing, None, &root)
            .unwrap_err()
            .to_string()
            .contains("nope.wasm"));
        assert!(classify(&[], None, &root).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
