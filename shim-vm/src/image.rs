//! The guest image: an uncompressed `vmlinux` and a cpio initramfs whose `/init` is the
//! agent, built from Debian packages at `make` time ([`Builder`]) and found by the shim at
//! run time ([`GuestImage::locate`]).
//!
//! The kernel is Debian's `linux-image-cloud-amd64` (the smallest, virtio as modules); the
//! initramfs holds the agent, the modules it loads in order (`/lib/modules/load`), and the
//! host's `crun` and `runc` with every shared library they need. Builds are cached by a
//! hash of every input: `<cache>/<hash>/{vmlinux,initramfs.cpio}`, with `<cache>/current`
//! pointing at the last one built.

mod bzimage;
pub mod cpio;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufWriter, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};
use shim_common::reaper;
use shim_common::{Context, Error, Result};

pub use bzimage::vmlinux;

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
/// Where the initramfs lists the modules the guest loads, in order, one path a line.
pub const MODULE_LIST: &str = "/lib/modules/load";

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

/// The Debian metapackage that names the current cloud kernel.
pub const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";

/// The modules the guest needs (with their dependencies); those built in are skipped.
pub const MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_console",
    "fuse",
    "virtiofs",
    "overlay",
    "vsock",
    "vmw_vsock_virtio_transport",
    "virtio_balloon",
    "virtio_net",
];

/// The host runtimes copied into the guest (at the same paths), with their libraries.
pub const RUNTIMES: &[&str] = &["/usr/bin/crun", "/usr/sbin/runc"];

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
    modules: Vec<String>,
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
    /// The kernel release (`6.1.0-NN-cloud-amd64`), when it was (re)built.
    pub kernel_release: Option<String>,
    /// Guest paths of the modules, in load order, when it was (re)built.
    pub modules: Vec<String>,
}

impl Builder {
    /// An image whose `/init` is `init`, with [`MODULES`] and [`RUNTIMES`], cached in
    /// `cache` and pointed at by `<cache>/current`.
    pub fn new(cache: impl Into<PathBuf>, init: impl Into<PathBuf>) -> Builder {
        Builder {
            cache: cache.into(),
            init: init.into(),
            files: RUNTIMES
                .iter()
                .map(|p| (PathBuf::from(p), p.to_string()))
                .collect(),
            modules: MODULES.iter().map(|m| m.to_string()).collect(),
            link: Some("current".into()),
        }
    }

    /// Adds host file `host` at `guest` (an absolute guest path), with its libraries if it
    /// is a dynamic ELF.
    pub fn file(mut self, host: impl Into<PathBuf>, guest: impl Into<String>) -> Builder {
        self.files.push((host.into(), guest.into()));
        self
    }

    /// Adds a module (by name) to load after [`MODULES`].
    pub fn module(mut self, name: impl Into<String>) -> Builder {
        self.modules.push(name.into());
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
        let deb = kernel_deb(&self.cache.join("debs"))?;
        let files = self.guest_files()?;
        let hash = self.hash(&deb, &files)?;
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
            kernel_release: None,
            modules: Vec::new(),
        };
        if GuestImage::locate(&dir).is_err() {
            let tmp = self.cache.join(format!(".build-{hash}-{}", unique()));
            let result = self.assemble(&deb, &files, &tmp, &mut built);
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

    fn hash(&self, deb: &Path, files: &BTreeMap<String, PathBuf>) -> Result<String> {
        let mut h = Sha256::new();
        h.update(BUILDER_VERSION);
        h.update([0]);
        h.update(
            deb.file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
        h.update([0]);
        hash_file(&mut h, deb)?;
        for m in &self.modules {
            h.update(m);
            h.update([0]);
        }
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

    /// Extracts the kernel package under `tmp` and writes the image into `tmp/out`.
    fn assemble(
        &self,
        deb: &Path,
        files: &BTreeMap<String, PathBuf>,
        tmp: &Path,
        built: &mut Built,
    ) -> Result<()> {
        let root = tmp.join("root");
        let out = tmp.join("out");
        fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
        run_tool(
            Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root),
            "dpkg-deb",
        )?;

        let (release, vmlinuz) = find_kernel(&root)?;
        let bz = fs::read(&vmlinuz).with_context(|| format!("read {}", vmlinuz.display()))?;
        let elf = vmlinux(&bz)?;
        fs::write(out.join(KERNEL_FILE), elf).context("write vmlinux")?;

        let mods_dir = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| root.join(d).join(&release))
            .find(|d| d.is_dir())
            .ok_or_else(|| Error::Runtime(format!("{}: no modules directory", deb.display())))?;
        if !mods_dir.join("modules.dep").is_file() {
            run_tool(
                Command::new("depmod").arg("-b").arg(&root).arg(&release),
                "depmod (Debian package kmod)",
            )?;
        }
        let order = module_order(&mods_dir, &self.modules)?;

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
        let mut list = String::new();
        for rel in &order {
            let data =
                fs::read(mods_dir.join(rel)).with_context(|| format!("read module {rel}"))?;
            let guest = format!("/lib/modules/{release}/{rel}");
            w.file(&guest, 0o644, &data).map_err(io)?;
            list.push_str(&guest);
            list.push('\n');
        }
        w.file(MODULE_LIST, 0o644, list.as_bytes()).map_err(io)?;
        w.finish().map_err(io)?;

        built.kernel_release = Some(release);
        built.modules = list.lines().map(str::to_string).collect();
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

/// The kernel package `.deb` in `debs`: the exact `linux-image-<abi>-cloud-amd64` that
/// [`KERNEL_PACKAGE`] depends on, downloaded with `apt-get download` unless cached.
fn kernel_deb(debs: &Path) -> Result<PathBuf> {
    fs::create_dir_all(debs).with_context(|| format!("create {}", debs.display()))?;
    let cached = |name: &str| -> Option<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(debs)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with(&format!("{name}_")) && n.ends_with("_amd64.deb")
                })
            })
            .collect();
        found.sort();
        found.pop()
    };
    let name = match run_tool(
        Command::new("apt-cache").args(["depends", KERNEL_PACKAGE]),
        "apt-cache",
    ) {
        Ok(out) => out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|d| d.starts_with("linux-image-") && d.ends_with("-cloud-amd64"))
            .map(str::to_string)
            .ok_or_else(|| {
                Error::Runtime(format!("apt-cache: {KERNEL_PACKAGE} depends on no kernel"))
            })?,
        // No apt lists (a root where `apt-get update` never ran): any cached kernel will do.
        Err(e) => return cached("linux-image").ok_or(e),
    };
    if let Some(deb) = cached(&name) {
        return Ok(deb);
    }
    let dl = debs.join(format!(".download-{}", unique()));
    fs::create_dir_all(&dl).with_context(|| format!("create {}", dl.display()))?;
    let result = run_tool(
        Command::new("apt-get")
            .args(["download", "-q", &name])
            .current_dir(&dl),
        "apt-get download",
    )
    .and_then(|_| {
        let deb = fs::read_dir(&dl)
            .with_context(|| format!("read {}", dl.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| Error::Runtime(format!("apt-get download {name}: no .deb")))?;
        let dest = debs.join(deb.file_name().unwrap_or_default());
        fs::rename(&deb, &dest).with_context(|| format!("move {}", deb.display()))?;
        Ok(dest)
    });
    let _ = fs::remove_dir_all(&dl);
    result
}

/// The kernel release and its `vmlinuz` in an extracted package.
fn find_kernel(root: &Path) -> Result<(String, PathBuf)> {
    let boot = root.join("boot");
    fs::read_dir(&boot)
        .with_context(|| format!("read {}", boot.display()))?
        .filter_map(|e| e.ok())
        .find_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let release = name.strip_prefix("vmlinuz-")?.to_string();
            Some((release, e.path()))
        })
        .ok_or_else(|| Error::Runtime(format!("no vmlinuz-* in {}", boot.display())))
}

/// A module's name as the kernel knows it: the file's, `-` read as `_`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Paths (relative to the modules directory) of `wanted` and their dependencies, each after
/// everything it depends on; built-in modules are left out.
pub fn module_order(mods_dir: &Path, wanted: &[String]) -> Result<Vec<String>> {
    let read = |f: &str| {
        let p = mods_dir.join(f);
        fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))
    };
    let builtin: BTreeSet<String> = read("modules.builtin")?.lines().map(module_name).collect();
    let prefix = format!("{}/", mods_dir.display());
    let rel = |p: &str| p.strip_prefix(prefix.as_str()).unwrap_or(p).to_string();
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut by_name: BTreeMap<String, String> = BTreeMap::new();
    for line in read("modules.dep")?.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        let module = rel(module);
        by_name.insert(module_name(&module), module.clone());
        deps.insert(module, rest.split_whitespace().map(rel).collect());
    }
    fn visit(
        m: &str,
        deps: &BTreeMap<String, Vec<String>>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(m.to_string()) {
            return;
        }
        for d in deps.get(m).into_iter().flatten() {
            visit(d, deps, seen, order);
        }
        order.push(m.to_string());
    }
    let (mut seen, mut order) = (BTreeSet::new(), Vec::new());
    for w in wanted {
        let name = w.replace('-', "_");
        if builtin.contains(&name) {
            continue;
        }
        let path = by_name.get(&name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "kernel module {w} is neither built in nor in {}/modules.dep",
                mods_dir.display()
            ))
        })?;
        visit(path, &deps, &mut seen, &mut order);
    }
    Ok(order)
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
    fn modules_come_after_their_dependencies_and_builtins_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("modules.dep"),
            "kernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko kernel/fs/fuse/fuse.ko\n\
             kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/virtio/virtio_ring.ko:\n\
             kernel/fs/fuse/fuse.ko:\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("modules.builtin"),
            "kernel/fs/overlayfs/overlay.ko\n",
        )
        .unwrap();
        let order = module_order(dir.path(), &["virtiofs".into(), "overlay".into()]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/fs/fuse/fuse.ko",
                "kernel/fs/fuse/virtiofs.ko"
            ]
        );
        let e = module_order(dir.path(), &["nope".into()]).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
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
