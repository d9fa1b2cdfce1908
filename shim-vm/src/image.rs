//! The guest image: an uncompressed `vmlinux` and a cpio initramfs whose `/init` is the
//! agent, built from Debian packages at `make` time ([`Builder`]) and found by the shim at
//! run time ([`GuestImage::locate`]).
//!
//! The kernel is built from Debian's kernel source with everything the guest uses built
//! in ([`kernel`]); the initramfs holds the agent and the host's `crun` with every shared
//! library it needs. Builds are cached by a hash of every input:
//! `<cache>/<hash>/{vmlinux,initramfs.cpio}`, with `<cache>/current` pointing at the last
//! one built.

pub mod cpio;
pub mod kernel;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufWriter, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};
use shim_common::reaper;
use shim_common::{Context, Error, Result};

/// What the shim boots: the files of one built image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The uncompressed ELF kernel (booted through its PVH note).
    pub kernel: PathBuf,
    /// The newc cpio initramfs.
    pub initrd: PathBuf,
}

/// The directory, next to the shim's executable, that `make guest` installs the image as.
pub const INSTALL_DIR: &str = "vm-guest";
/// The kernel's file name in an image directory.
pub const KERNEL_FILE: &str = "vmlinux";
/// The initramfs's file name in an image directory.
pub const INITRD_FILE: &str = "initramfs.cpio";

impl GuestImage {
    /// The image in `dir` (`vmlinux`, `initramfs.cpio`); a missing file is an error naming
    /// it and how to build it.
    pub fn locate(dir: &Path) -> Result<GuestImage> {
        GuestImage {
            kernel: dir.join(KERNEL_FILE),
            initrd: dir.join(INITRD_FILE),
        }
        .checked()
    }

    /// The image installed next to the running executable (`<exe dir>/vm-guest`).
    pub fn beside_executable() -> Result<GuestImage> {
        GuestImage::locate(&installed_dir()?)
    }

    /// This image, once both files are there; a missing one is an error naming it and how
    /// to build it.
    pub fn checked(self) -> Result<GuestImage> {
        for f in [&self.kernel, &self.initrd] {
            if !f.is_file() {
                return Err(Error::FailedPrecondition(format!(
                    "guest image file {} not found: run `make guest` to build the VM image",
                    f.display()
                )));
            }
        }
        Ok(self)
    }
}

/// Where `make guest` installs the image for the running executable: `<exe dir>/vm-guest`.
pub fn installed_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("find the shim's own executable")?;
    Ok(exe.parent().unwrap_or(Path::new("/")).join(INSTALL_DIR))
}

/// Bumped whenever the builder lays out the image differently: part of the cache key.
pub const BUILDER_VERSION: &str = concat!("shim-vm-image/", env!("CARGO_PKG_VERSION"), "/1");

/// The host runtimes copied into the guest (at the same paths), with their libraries:
/// `crun` only (`GuestRuntime = "runc"` brings the host's runc through the VM's share, see
/// [`crate::share::provide_runtime`]).
pub const RUNTIMES: &[&str] = &["/usr/bin/crun"];

/// Empty directories the guest's PID 1 mounts on or writes to.
const GUEST_DIRS: &[&str] = &[
    "proc", "sys", "dev", "run", "tmp", "etc", "root", "mnt", "var/tmp", "usr/bin", "usr/sbin",
];

/// Builds (or finds in the cache) the image for one set of inputs.
///
/// ```no_run
/// use shim_vm::image::Builder;
/// let built = Builder::new("target/vm-guest", "target/x86_64-unknown-linux-gnu/release/shim-vm-agent")
///     .build()
///     .unwrap();
/// println!("{}", built.image.kernel.display());
/// ```
#[derive(Debug, Clone)]
pub struct Builder {
    cache: PathBuf,
    init: PathBuf,
    files: Vec<(PathBuf, String)>,
    link: Option<String>,
}

/// What [`Builder::build`] made or found.
#[derive(Debug, Clone)]
pub struct Built {
    /// `<cache>/<hash>`.
    pub dir: PathBuf,
    /// The content hash of every input.
    pub hash: String,
    /// The files in `dir`.
    pub image: GuestImage,
    /// False when the cache already held this image.
    pub rebuilt: bool,
    /// The kernel it holds (a copy of the cached build).
    pub kernel: kernel::Kernel,
}

impl Builder {
    /// An image whose `/init` is `init`, with [`RUNTIMES`], cached in
    /// `cache` and pointed at by `<cache>/current`.
    pub fn new(cache: impl Into<PathBuf>, init: impl Into<PathBuf>) -> Builder {
        Builder {
            cache: cache.into(),
            init: init.into(),
            files: RUNTIMES
                .iter()
                .map(|p| (PathBuf::from(p), p.to_string()))
                .collect(),
            link: Some("current".into()),
        }
    }

    /// Adds host file `host` at `guest` (an absolute guest path), with its libraries if it
    /// is a dynamic ELF.
    pub fn file(mut self, host: impl Into<PathBuf>, guest: impl Into<String>) -> Builder {
        self.files.push((host.into(), guest.into()));
        self
    }

    /// Points `<cache>/<name>` at the result (`current` by default); `None` leaves every
    /// pointer alone (a test's own image).
    pub fn link(mut self, name: Option<&str>) -> Builder {
        self.link = name.map(str::to_string);
        self
    }

    /// Builds the image unless the cache holds it, then updates the pointer.
    pub fn build(&self) -> Result<Built> {
        fs::create_dir_all(&self.cache)
            .with_context(|| format!("create cache {}", self.cache.display()))?;
        let kernel = kernel::build(&self.cache)?;
        let files = self.guest_files()?;
        let hash = self.hash(&kernel, &files)?;
        let dir = self.cache.join(&hash);
        let image = GuestImage {
            kernel: dir.join(KERNEL_FILE),
            initrd: dir.join(INITRD_FILE),
        };
        let mut built = Built {
            dir: dir.clone(),
            hash: hash.clone(),
            image: image.clone(),
            rebuilt: false,
            kernel: kernel.clone(),
        };
        if GuestImage::locate(&dir).is_err() {
            let tmp = self.cache.join(format!(".build-{hash}-{}", unique()));
            let result = self.assemble(&kernel, &files, &tmp);
            let result = result.and_then(|()| {
                // A half-written directory of a killed build is replaced; a complete one that
                // a concurrent build of the same inputs just moved in is as good as ours.
                if GuestImage::locate(&dir).is_ok() {
                    return Ok(());
                }
                let _ = fs::remove_dir_all(&dir);
                match fs::rename(tmp.join("out"), &dir) {
                    Err(_) if GuestImage::locate(&dir).is_ok() => Ok(()),
                    r => r.with_context(|| format!("move the image into {}", dir.display())),
                }
            });
            let _ = fs::remove_dir_all(&tmp);
            result?;
            built.rebuilt = true;
        }
        if let Some(name) = &self.link {
            let link = self.cache.join(name);
            let tmp = self.cache.join(format!(".{name}.{}", unique()));
            let _ = fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&hash, &tmp)
                .with_context(|| format!("link {}", tmp.display()))?;
            fs::rename(&tmp, &link).with_context(|| format!("update {}", link.display()))?;
        }
        // Used now: the newest, for pruning.
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.set_modified(std::time::SystemTime::now());
        }
        prune(&self.cache, KEEP_UNLINKED);
        Ok(built)
    }

    /// `/init` and every extra file, with every library they load, by guest path.
    fn guest_files(&self) -> Result<BTreeMap<String, PathBuf>> {
        let mut files = BTreeMap::new();
        let wanted = std::iter::once((self.init.clone(), "/init".to_string()))
            .chain(self.files.iter().cloned());
        for (host, guest) in wanted {
            if !host.is_file() {
                return Err(Error::FailedPrecondition(format!(
                    "{} (for the guest's {guest}) not found",
                    host.display()
                )));
            }
            for lib in libraries(&host)? {
                let real = fs::canonicalize(&lib).with_context(|| format!("resolve {lib}"))?;
                files.insert(lib, real);
            }
            files.insert(guest, host);
        }
        Ok(files)
    }

    fn hash(&self, kernel: &kernel::Kernel, files: &BTreeMap<String, PathBuf>) -> Result<String> {
        let mut h = Sha256::new();
        h.update(BUILDER_VERSION);
        h.update([0]);
        h.update(&kernel.hash);
        h.update([0]);
        for (guest, host) in files {
            h.update(guest);
            h.update([0]);
            let mode = fs::metadata(host)
                .with_context(|| format!("stat {}", host.display()))?
                .permissions()
                .mode();
            h.update(mode.to_le_bytes());
            hash_file(&mut h, host)?;
        }
        let digest = h.finalize();
        Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Writes the image into `tmp/out`.
    fn assemble(
        &self,
        kernel: &kernel::Kernel,
        files: &BTreeMap<String, PathBuf>,
        tmp: &Path,
    ) -> Result<()> {
        let out = tmp.join("out");
        fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
        fs::copy(&kernel.path, out.join(KERNEL_FILE))
            .with_context(|| format!("copy {}", kernel.path.display()))?;

        let cpio_path = out.join(INITRD_FILE);
        let f = fs::File::create(&cpio_path)
            .with_context(|| format!("create {}", cpio_path.display()))?;
        let mut w = cpio::CpioWriter::new(BufWriter::new(f));
        let io = |e: std::io::Error| Error::Io {
            context: format!("write {}", cpio_path.display()),
            source: e,
        };
        for d in GUEST_DIRS {
            w.dir(d, 0o755).map_err(io)?;
        }
        w.dir("tmp", 0o1777).map_err(io)?;
        for (guest, host) in files {
            let data = fs::read(host).with_context(|| format!("read {}", host.display()))?;
            let mode = fs::metadata(host)
                .with_context(|| format!("stat {}", host.display()))?
                .permissions()
                .mode()
                & 0o7777;
            w.file(guest, mode, &data).map_err(io)?;
        }
        w.finish().map_err(io)?;
        Ok(())
    }
}

/// Images in a cache that no pointer names and that were used most recently, kept (a test's
/// probe image, the previous agent's); older ones are removed (each is ~70 MB).
const KEEP_UNLINKED: usize = 3;

/// Removes all but the `keep` most recently used unlinked image directories of `cache`.
fn prune(cache: &Path, keep: usize) {
    let Ok(entries) = fs::read_dir(cache) else {
        return;
    };
    let mut linked = BTreeSet::new();
    let mut images = Vec::new();
    for e in entries.filter_map(|e| e.ok()) {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if let Ok(target) = fs::read_link(&path) {
            linked.insert(target.to_string_lossy().into_owned());
        } else if name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
            let used = e.metadata().and_then(|m| m.modified()).ok();
            images.push((used, name));
        }
    }
    images.retain(|(_, n)| !linked.contains(n));
    images.sort_by_key(|(used, _)| std::cmp::Reverse(*used));
    for (_, name) in images.into_iter().skip(keep) {
        let _ = fs::remove_dir_all(cache.join(name));
    }
}

/// A name no other build (in this process or another) uses for its temporary files.
fn unique() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

fn hash_file(h: &mut Sha256, path: &Path) -> Result<()> {
    let mut f = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("read {}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

/// Runs a build tool, its stderr in the error.
fn run_tool(cmd: &mut Command, what: &str) -> Result<String> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = reaper::run(cmd).map_err(|e| match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Error::FailedPrecondition(format!("{what} not found: `make deps` installs it"))
        }
        e => e,
    })?;
    if !out.success() {
        return Err(Error::Runtime(format!(
            "{what} failed (status {}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The shared libraries (and the dynamic loader) `elf` loads, as `ldd` resolves them on
/// this host; none for a static binary.
fn libraries(elf: &Path) -> Result<Vec<String>> {
    let mut head = [0u8; 4];
    let is_elf = fs::File::open(elf)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && head == *b"\x7fELF";
    if !is_elf {
        return Ok(Vec::new());
    }
    let out = reaper::run(
        Command::new("ldd")
            .arg(elf)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.success() {
        // "not a dynamic executable": a static binary, nothing to add.
        let all = format!("{text}{}", String::from_utf8_lossy(&out.stderr));
        if all.contains("not a dynamic executable") || all.contains("statically linked") {
            return Ok(Vec::new());
        }
        return Err(Error::Runtime(format!(
            "ldd {}: {}",
            elf.display(),
            all.trim()
        )));
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("statically linked") {
            continue;
        }
        let path = match line.split_once("=>") {
            Some((lib, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(Error::FailedPrecondition(format!(
                        "{} needs {}, which is not installed",
                        elf.display(),
                        lib.trim()
                    )));
                }
                rest.split(" (").next().unwrap_or("")
            }
            None => line.split(" (").next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(path.to_string());
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_image_names_the_file_and_make_guest() {
        let dir = tempfile::tempdir().unwrap();
        let e = GuestImage::locate(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(&dir.path().join("vmlinux").display().to_string()),
            "{e}"
        );
        assert!(e.contains("make guest"), "{e}");
    }

    #[test]
    fn pruning_keeps_linked_and_recent_images() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["0000000000000001", "0000000000000002", "0000000000000003"];
        for (i, n) in names.iter().enumerate() {
            let d = dir.path().join(n);
            fs::create_dir(&d).unwrap();
            let t =
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 * i as u64);
            fs::File::open(&d).unwrap().set_modified(t).unwrap();
        }
        std::os::unix::fs::symlink(names[0], dir.path().join("current")).unwrap();
        fs::create_dir(dir.path().join("debs")).unwrap();
        prune(dir.path(), 1);
        let left: BTreeSet<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let want: BTreeSet<String> = ["0000000000000001", "0000000000000003", "current", "debs"]
            .map(String::from)
            .into();
        assert_eq!(left, want);
    }

    #[test]
    fn ldd_finds_the_loader_of_a_dynamic_binary() {
        let libs = libraries(Path::new("/usr/bin/crun")).unwrap();
        assert!(libs.iter().any(|l| l.contains("ld-linux")), "{libs:?}");
        assert!(libs.iter().any(|l| l.contains("libc.so")), "{libs:?}");
    }
}
