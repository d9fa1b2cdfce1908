//! `shim-dist`: lays out a release (`make dist`) from the binaries `make build` left.
//!
//! ```text
//! shim-dist --bin-dir DIR --repo DIR --out DIR --image FILE [--freebsd DIR]
//! ```
//!
//! `--out` gets the release directory: the shims, `shim-installer`, the VM shim's helpers and
//! guest image when built, `deploy/` (the DaemonSet and RuntimeClasses), `containerd/` (the
//! handler sections for each config version, for a manual install) and `SHA256SUMS` over
//! all of it. `--image` gets the installer's OCI archive (that directory under /release).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use integration::dist;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shim-dist: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = |name: &str| -> Result<PathBuf, String> {
        let flag = format!("--{name}");
        args.iter()
            .position(|a| *a == flag)
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
            .ok_or_else(|| format!("{flag} PATH is needed (--bin-dir --repo --out --image)"))
    };
    let (bin, repo, out, image) = (
        path("bin-dir")?,
        path("repo")?,
        path("out")?,
        path("image")?,
    );

    if out.exists() {
        fs::remove_dir_all(&out).map_err(|e| format!("removing {}: {e}", out.display()))?;
    }
    copy_dir(&repo.join("deploy"), &out.join("deploy"))?;
    let snippets = out.join("containerd");
    fs::create_dir_all(&snippets).map_err(|e| e.to_string())?;
    for schema in ["2", "3"] {
        let o = Command::new(bin.join("shim-installer"))
            .args(["config", "--schema", schema])
            .output()
            .map_err(|e| format!("running shim-installer config: {e}"))?;
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).into_owned());
        }
        let file = snippets.join(format!("config-v{schema}.toml"));
        fs::write(&file, &o.stdout).map_err(|e| format!("{}: {e}", file.display()))?;
    }
    // The jail shim and the installer, linked for FreeBSD by `make check-freebsd`: a release
    // of their own (`freebsd/shim-installer install --shims jail` on a FreeBSD host).
    if let Ok(bin) = path("freebsd") {
        let dir = out.join("freebsd");
        let copied = dist::release_dir(&bin, &["shim-installer", "containerd-shim-jail-v2"], &dir)
            .map_err(|e| e.to_string())?;
        if copied.len() != 2 {
            return Err(format!(
                "{} lacks the FreeBSD binaries: {copied:?}",
                bin.display()
            ));
        }
    }
    let copied = dist::release_dir(&bin, dist::RELEASE_FILES, &out).map_err(|e| e.to_string())?;
    for f in dist::RELEASE_FILES {
        if !copied.iter().any(|c| c == f) {
            eprintln!("shim-dist: {f} is not built; the release has no {f}");
        }
    }
    let archive = dist::installer_image(&out, &image).map_err(|e| e.to_string())?;
    println!("{}\n{}", out.display(), archive.display());
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), String> {
    fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    for e in fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))? {
        let e = e.map_err(|e| e.to_string())?;
        fs::copy(e.path(), to.join(e.file_name()))
            .map_err(|err| format!("{}: {err}", e.path().display()))?;
    }
    Ok(())
}
