//! The guest kernel, built from Debian's own kernel source (package `linux-source-6.1`,
//! `/usr/src/linux-source-*.tar.xz`) with [`CONFIG`] merged onto `make tinyconfig`.
//!
//! Why not Debian's cloud kernel: under TCG a boot is kernel code run once, and the cloud
//! kernel (virtio as modules, ~580 initcalls a VM mostly never needs) had the agent ready
//! ~1.6 s after QEMU started here, ~0.1 s of it loading modules; with this one, every
//! device built in, it is ready in ~0.95 s. Builds are cached by a hash of the source, the
//! configuration and the compiler: `<cache>/kernels/<hash>/vmlinux`. One build takes ~5
//! minutes on 2 cores.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use shim_common::{Context, Error, Result};

use super::{hash_file, run_tool, unique, KERNEL_FILE};

/// The configuration fragment (`shim-vm/guest/kernel.config`).
pub const CONFIG: &str = include_str!("../../guest/kernel.config");

/// The guest kernel's release suffix (`uname -r` is `6.1.NNN-shim-vm`): how a process
/// tells it runs in the guest.
pub const LOCALVERSION: &str = "-shim-vm";

/// Where Debian's `linux-source-<version>` package puts its tarball.
pub const SOURCE_DIR: &str = "/usr/src";

/// The Debian package that holds the source, named in errors.
pub const SOURCE_PACKAGE: &str = "linux-source-6.1";

/// The kernels' directory inside an image cache.
const KERNELS: &str = "kernels";

/// Kernels kept: the last two used (switching a configuration back and forth builds once).
const KEEP: usize = 2;

/// A built kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The uncompressed ELF `vmlinux`.
    pub path: PathBuf,
    /// The hash its directory is named after.
    pub hash: String,
}

/// The kernel for this source and configuration: from `cache` when built before, else
/// built (minutes) and cached.
pub fn build(cache: &Path) -> Result<Kernel> {
    let source = source_tarball(Path::new(SOURCE_DIR))?;
    let hash = hash(&source)?;
    let dir = cache.join(KERNELS).join(&hash);
    let path = dir.join(KERNEL_FILE);
    if path.is_file() {
        // Used now: the newest, for pruning.
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.set_modified(std::time::SystemTime::now());
        }
        return Ok(Kernel { path, hash });
    }
    let tmp = cache
        .join(KERNELS)
        .join(format!(".build-{hash}-{}", unique()));
    let result = compile(&source, &tmp).and_then(|vmlinux| {
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        fs::rename(&vmlinux, &path).with_context(|| format!("move vmlinux into {}", dir.display()))
    });
    // The source tree and its objects: ~1.7 GB.
    let _ = fs::remove_dir_all(&tmp);
    result?;
    // Images hold their own copy: older kernels only cost disk.
    super::prune(&cache.join(KERNELS), KEEP);
    Ok(Kernel { path, hash })
}

/// Whether `cache` holds the kernel [`build`] would make.
pub fn is_cached(cache: &Path) -> bool {
    source_tarball(Path::new(SOURCE_DIR))
        .and_then(|source| hash(&source))
        .is_ok_and(|hash| cache.join(KERNELS).join(hash).join(KERNEL_FILE).is_file())
}

/// The newest `linux-source-*.tar.xz` in `dir`.
fn source_tarball(dir: &Path) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("linux-source-") && n.ends_with(".tar.xz"))
        })
        .collect();
    found.sort();
    found.pop().ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "no linux-source-*.tar.xz in {}: install Debian's {SOURCE_PACKAGE} (`make deps`)",
            dir.display()
        ))
    })
}

/// Hash of the source tarball, [`CONFIG`] and the compiler's version.
fn hash(source: &Path) -> Result<String> {
    let mut h = Sha256::new();
    h.update(super::BUILDER_VERSION);
    h.update([0]);
    h.update(CONFIG);
    h.update([0]);
    h.update(run_tool(Command::new("gcc").arg("--version"), "gcc")?);
    h.update([0]);
    hash_file(&mut h, source)?;
    let digest = h.finalize();
    Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
}

/// Extracts `source` under `tmp`, configures and builds it; returns the `vmlinux` path.
fn compile(source: &Path, tmp: &Path) -> Result<PathBuf> {
    fs::create_dir_all(tmp).with_context(|| format!("create {}", tmp.display()))?;
    run_tool(
        Command::new("tar")
            .arg("-xJf")
            .arg(source)
            .arg("-C")
            .arg(tmp),
        "tar",
    )?;
    let src = fs::read_dir(tmp)
        .with_context(|| format!("read {}", tmp.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.is_dir())
        .ok_or_else(|| Error::Runtime(format!("{}: no source tree", source.display())))?;
    let make = |args: &[&str], what: &str| {
        run_tool(
            Command::new("make").arg("-C").arg(&src).args(args),
            &format!("make {what} (Debian packages make, gcc, flex, bison, bc, libelf-dev)"),
        )
    };
    make(&["-s", "tinyconfig"], "tinyconfig")?;
    // `make NAME.config` merges kernel/configs/NAME.config onto .config, then olddefconfig.
    fs::write(src.join("kernel/configs/shim-vm.config"), CONFIG)
        .context("write kernel/configs/shim-vm.config")?;
    make(&["-s", "shim-vm.config"], "shim-vm.config")?;
    let config = fs::read_to_string(src.join(".config")).context("read .config")?;
    let dropped = unmet(CONFIG, &config);
    if !dropped.is_empty() {
        return Err(Error::Runtime(format!(
            "guest kernel configuration: {} did not hold after the merge (a missing \
             dependency or a renamed option)",
            dropped.join(", ")
        )));
    }
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    make(&["-s", &format!("-j{jobs}"), "vmlinux"], "vmlinux")?;
    Ok(src.join("vmlinux"))
}

/// The lines of `fragment` (`CONFIG_X=v`) that `config` (a merged `.config`) does not hold;
/// `=n` holds when the option is unset or absent.
fn unmet(fragment: &str, config: &str) -> Vec<String> {
    let value = |key: &str| {
        config.lines().find_map(|l| {
            if l == format!("# {key} is not set") {
                Some("n")
            } else {
                l.strip_prefix(key)?.strip_prefix('=')
            }
        })
    };
    fragment
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CONFIG_"))
        .filter_map(|l| {
            let (key, want) = l.split_once('=')?;
            let got = value(key).unwrap_or("n");
            (got != want).then(|| l.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmet_names_what_the_merge_dropped() {
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\nCONFIG_AB=y\n";
        let fragment = "# comment\nCONFIG_A=y\nCONFIG_B=n\nCONFIG_C=\"x\"\nCONFIG_D=n\n\
                        CONFIG_E=y\nCONFIG_B=y\n";
        assert_eq!(unmet(fragment, config), ["CONFIG_E=y", "CONFIG_B=y"]);
    }

    #[test]
    fn the_configuration_builds_in_what_the_guest_needs() {
        for needed in [
            "CONFIG_MODULES=n",
            "CONFIG_PVH=y",
            "CONFIG_VIRTIO_MMIO=y",
            "CONFIG_VIRTIO_FS=y",
            "CONFIG_OVERLAY_FS=y",
            "CONFIG_VIRTIO_VSOCKETS=y",
            "CONFIG_CGROUP_BPF=y",
            "CONFIG_SECCOMP_FILTER=y",
        ] {
            assert!(CONFIG.lines().any(|l| l == needed), "{needed}");
        }
        let release = format!("CONFIG_LOCALVERSION=\"{LOCALVERSION}\"");
        assert!(CONFIG.lines().any(|l| l == release), "{release}");
    }

    #[test]
    fn a_missing_source_names_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let e = source_tarball(dir.path()).unwrap_err().to_string();
        assert!(e.contains(SOURCE_PACKAGE) && e.contains("make deps"), "{e}");
    }
}
