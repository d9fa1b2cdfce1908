//! An OCI bundle as a backend reads it: its spec (`config.json`), and the spec's process as a
//! command that runs chrooted into the bundle's rootfs.
//!
//! ```no_run
//! # fn main() -> shim_common::Result<()> {
//! let bundle = std::path::Path::new("/run/containerd/io.containerd.runtime.v2.task/default/c");
//! let hostname = shim_common::bundle::spec(bundle)?.get("hostname").cloned();
//! let mut cmd = shim_common::bundle::process_command(bundle)?;
//! let child = shim_common::reaper::spawn(&mut cmd);
//! # Ok(()) }
//! ```

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::error::{Context, Error, Result};

/// The bundle's spec: its `config.json`, parsed. A file that cannot be read is an error
/// naming it; one that is not JSON is `InvalidArgument`.
pub fn spec(bundle: &Path) -> Result<Value> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&text)
        .map_err(|e| Error::InvalidArgument(format!("parse {}: {e}", path.display())))
}

/// A spec object of strings (`annotations`, `linux.sysctl`) as a map; values that are not
/// strings are left out, a missing object is empty.
pub fn string_map<C: FromIterator<(String, String)>>(object: &Value) -> C {
    object
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect()
}

/// The spec's `process` as a command to spawn (through [`crate::reaper::spawn`]): its
/// `args`, only its `env`, and — in the child, before the program runs — a `chroot(2)`
/// into the spec's `root.path` (relative to the bundle; `rootfs` when absent) and a
/// `chdir(2)` to its `cwd` (`/` when absent). Nothing else of the spec (namespaces, user,
/// capabilities, limits) is applied. The program is looked up in the `env`'s `PATH`,
/// inside the rootfs. Empty or malformed `args`, `env` or `cwd` are `InvalidArgument`.
///
/// The caller adds the stdio ([`crate::stdio::ChildStdio::apply`]).
pub fn process_command(bundle: &Path) -> Result<Command> {
    Process::of(bundle, &spec(bundle)?)?.command(true)
}

/// What [`process_command`] takes from a spec.
#[derive(Debug, PartialEq)]
struct Process {
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: String,
    root: PathBuf,
}

impl Process {
    fn of(bundle: &Path, spec: &Value) -> Result<Process> {
        let bad = |what: &str| Error::InvalidArgument(format!("config.json: {what}"));
        let strings = |key: &str| -> Result<Vec<String>> {
            match &spec["process"][key] {
                Value::Null => Ok(Vec::new()),
                v => serde_json::from_value(v.clone())
                    .map_err(|e| bad(&format!("process.{key}: {e}"))),
            }
        };
        let args = strings("args")?;
        if args.first().is_none_or(String::is_empty) {
            return Err(bad("process.args: no program to run"));
        }
        let env = strings("env")?
            .into_iter()
            .map(|e| match e.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => Err(bad(&format!("process.env: {e:?} is not KEY=value"))),
            })
            .collect::<Result<_>>()?;
        let cwd = match &spec["process"]["cwd"] {
            Value::Null => "/",
            Value::String(cwd) if cwd.starts_with('/') => cwd,
            v => return Err(bad(&format!("process.cwd: {v} is not an absolute path"))),
        };
        let root = match &spec["root"]["path"] {
            Value::Null => "rootfs",
            Value::String(root) if !root.is_empty() => root,
            v => return Err(bad(&format!("root.path: {v} is not a path"))),
        };
        Ok(Process {
            args,
            env,
            cwd: cwd.to_string(),
            root: bundle.join(root),
        })
    }

    /// The command; `chroot` false (the tests' seam) runs it on the host's root.
    fn command(self, chroot: bool) -> Result<Command> {
        let c_string = |what: &str, bytes: &[u8]| {
            CString::new(bytes)
                .map_err(|_| Error::InvalidArgument(format!("config.json: {what}: a NUL byte")))
        };
        let root = c_string("root.path", self.root.as_os_str().as_bytes())?;
        let cwd = c_string("process.cwd", self.cwd.as_bytes())?;
        let mut cmd = Command::new(&self.args[0]);
        cmd.args(&self.args[1..]).env_clear().envs(self.env);
        let enter = move || {
            // SAFETY: chroot(2) and chdir(2) take NUL-terminated paths made before the fork,
            // and are async-signal-safe, as a pre_exec closure must be.
            let fail = std::io::Error::last_os_error;
            if chroot && unsafe { libc::chroot(root.as_ptr()) } != 0 {
                return Err(fail());
            }
            if unsafe { libc::chdir(cwd.as_ptr()) } != 0 {
                return Err(fail());
            }
            Ok(())
        };
        // SAFETY: `enter` allocates nothing and makes only async-signal-safe calls.
        unsafe { cmd.pre_exec(enter) };
        Ok(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    fn bundle(config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        dir
    }

    fn invalid(config: &str) -> String {
        let b = bundle(config);
        let e = process_command(b.path()).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{config}: {e}");
        e.to_string()
    }

    #[test]
    fn spec_is_read_once_and_names_the_file_it_failed_on() {
        let b = bundle(r#"{"hostname":"h"}"#);
        assert_eq!(spec(b.path()).unwrap()["hostname"], "h");
        let b = bundle("{ not json");
        let e = spec(b.path()).unwrap_err();
        assert_eq!(e.code(), ttrpc::Code::INVALID_ARGUMENT, "{e}");
        assert!(e.to_string().contains("config.json"), "{e}");
        let none = tempfile::tempdir().unwrap();
        let e = spec(none.path()).unwrap_err().to_string();
        assert!(
            e.contains(&none.path().join("config.json").display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn the_process_needs_args_and_well_formed_env_and_cwd() {
        invalid(r#"{"process":{"cwd":"/"}}"#);
        invalid(r#"{"process":{"args":[]}}"#);
        invalid(r#"{"process":{"args":[""]}}"#);
        invalid(r#"{"process":{"args":"sh"}}"#);
        invalid(r#"{"process":{"args":["sh"],"env":["NOEQUALS"]}}"#);
        invalid(r#"{"process":{"args":["sh"],"cwd":"relative"}}"#);
        invalid(r#"{"process":{"args":["sh"]},"root":{"path":""}}"#);
        invalid(r#"{"process":{"args":["sh"],"cwd":"/a\u0000b"}}"#);
        assert!(invalid("[1").contains("config.json"));
    }

    #[test]
    fn the_process_is_parsed_with_defaults() {
        let spec = serde_json::json!({"process": {"args": ["sh", "-c", "x"], "env": ["A=1=2"]}});
        let p = Process::of(Path::new("/b"), &spec).unwrap();
        let want = Process {
            args: vec!["sh".into(), "-c".into(), "x".into()],
            env: vec![("A".into(), "1=2".into())],
            cwd: "/".into(),
            root: "/b/rootfs".into(),
        };
        assert_eq!(p, want);
        let spec = serde_json::json!({"process": {"args": ["sh"]}, "root": {"path": "/r"}});
        assert_eq!(
            Process::of(Path::new("/b"), &spec).unwrap().root,
            Path::new("/r")
        );
    }

    #[test]
    fn args_env_and_cwd_are_applied() {
        let out = |args: &[&str]| {
            let spec = serde_json::json!({
                "process": {"args": args, "env": ["FOO=bar", "EMPTY="], "cwd": "/tmp"}
            });
            let mut cmd = Process::of(Path::new("/b"), &spec)
                .unwrap()
                .command(false)
                .unwrap();
            let out = crate::reaper::run(cmd.stdout(Stdio::piped())).unwrap();
            assert!(out.success(), "{args:?}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        // Only the spec's environment, nothing of the shim's (std passes it sorted).
        assert_eq!(out(&["/usr/bin/env"]), "EMPTY=\nFOO=bar\n");
        let script = r#"printf '%s|%s|%s' "$FOO" "$1" "$(/bin/pwd)""#;
        assert_eq!(out(&["/bin/sh", "-c", script, "sh", "one"]), "bar|one|/tmp");
    }

    #[test]
    fn the_process_runs_chrooted_in_the_rootfs_and_finds_its_program_there() {
        // chroot(2) needs root, and the rootfs a static program.
        let busybox = Path::new("/bin/busybox");
        if !nix::unistd::geteuid().is_root() || !busybox.exists() {
            return;
        }
        let b = bundle(
            r#"{"process":{"args":["busybox","sh","-c","pwd; busybox ls /"],
                "env":["PATH=/sbox"],"cwd":"/sbox"}}"#,
        );
        std::fs::create_dir_all(b.path().join("rootfs/sbox")).unwrap();
        std::fs::copy(busybox, b.path().join("rootfs/sbox/busybox")).unwrap();
        let mut cmd = process_command(b.path()).unwrap();
        let out = crate::reaper::run(cmd.stdout(Stdio::piped())).unwrap();
        assert!(out.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "/sbox\nsbox\n");
    }
}
