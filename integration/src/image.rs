//! An offline busybox OCI image.
//!
//! Tests cannot pull from a registry (there is no network), so the image is
//! assembled from Debian's static `/usr/bin/busybox`: one uncompressed layer
//! holding busybox, a symlink per applet and a minimal `/etc`, plus the OCI
//! config, manifest, `index.json` and `oci-layout`, written as a tar archive
//! that `ctr images import` accepts.
//!
//! The output is deterministic (fixed mtimes, owners and ordering), so the same
//! busybox always gives the same digests, and the archive can be cached across
//! test processes.
//!
//! [`oci_archive`] packs any list of files the same way; CRI's sandbox image
//! ([`pause_oci_archive`], our static `pause` binary) is built with it.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext};

/// The image reference tests use for the busybox image.
pub const BUSYBOX_REF: &str = "docker.io/library/busybox:shimtest";

/// Where the static busybox comes from (Debian package `busybox-static`).
pub const BUSYBOX_BINARY: &str = "/usr/bin/busybox";

/// Bump when the image layout changes, so cached archives are rebuilt.
const LAYOUT_VERSION: &str = "1";

/// Applets tests rely on; always linked even if `busybox --list` fails.
const REQUIRED_APPLETS: &[&str] = &[
    "sh", "echo", "true", "false", "sleep", "cat", "ls", "ps", "id", "env", "hostname", "touch",
    "mkdir", "rm", "nc", "wc", "head", "yes", "top", "kill",
];

const MT_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A content-addressed blob of the image.
pub(crate) struct Blob {
    pub(crate) digest_hex: String,
    pub(crate) data: Vec<u8>,
}

impl Blob {
    pub(crate) fn new(data: Vec<u8>) -> Self {
        Blob {
            digest_hex: hex(&Sha256::digest(&data)),
            data,
        }
    }

    pub(crate) fn digest(&self) -> String {
        format!("sha256:{}", self.digest_hex)
    }

    pub(crate) fn descriptor(&self, media_type: &str) -> serde_json::Value {
        json!({ "mediaType": media_type, "digest": self.digest(), "size": self.data.len() })
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// OCI architecture name for the machine we run on (the image must match the
/// host platform or `ctr images import` skips it).
pub(crate) fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Applet names: the required ones plus whatever this busybox reports.
fn applets() -> BTreeSet<String> {
    let mut set: BTreeSet<String> = REQUIRED_APPLETS.iter().map(|s| s.to_string()).collect();
    if let Ok(out) = Command::new(BUSYBOX_BINARY).arg("--list").output() {
        if out.status.success() {
            set.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(str::trim)
                    .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
                    .map(str::to_string),
            );
        }
    }
    set
}

pub(crate) fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h
}

pub(crate) fn tar_err(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(format!("writing {what} to tar"), e)
}

/// Builds the uncompressed root filesystem layer.
fn build_layer(busybox: &[u8]) -> Result<Vec<u8>, Error> {
    build_layer_with(busybox, &[])
}

/// The busybox layer plus `extra` files (whose directories must be in the layer already
/// or among `extra`'s paths' parents: `bin/`, `etc/`, `tmp/`...).
fn build_layer_with(busybox: &[u8], extra: &[ImageFile<'_>]) -> Result<Vec<u8>, Error> {
    let mut b = tar::Builder::new(Vec::new());
    let dirs: &[(&str, u32)] = &[
        ("bin/", 0o755),
        ("dev/", 0o755),
        ("etc/", 0o755),
        ("proc/", 0o555),
        ("root/", 0o700),
        ("run/", 0o755),
        ("sys/", 0o555),
        ("tmp/", 0o1777),
        ("usr/", 0o755),
        ("usr/bin/", 0o755),
        ("var/", 0o755),
    ];
    for (path, mode) in dirs {
        let mut h = header(tar::EntryType::Directory, *mode, 0);
        b.append_data(&mut h, path, std::io::empty())
            .map_err(tar_err(path))?;
    }
    let mut h = header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
    b.append_data(&mut h, "bin/busybox", busybox)
        .map_err(tar_err("bin/busybox"))?;
    for applet in applets() {
        let path = format!("bin/{applet}");
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, &path, "busybox")
            .map_err(tar_err(&path))?;
    }
    let files: &[(&str, &str)] = &[
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnobody:x:65534:\n"),
        ("etc/hostname", "busybox\n"),
    ];
    for (path, content) in files {
        let mut h = header(tar::EntryType::Regular, 0o644, content.len() as u64);
        b.append_data(&mut h, path, content.as_bytes())
            .map_err(tar_err(path))?;
    }
    for f in extra {
        let mut h = header(tar::EntryType::Regular, f.mode, f.data.len() as u64);
        b.append_data(&mut h, f.path, f.data)
            .map_err(tar_err(f.path))?;
    }
    b.into_inner().map_err(tar_err("layer trailer"))
}

/// Writes a busybox OCI image archive for `image_ref` and returns its path.
///
/// `dest` is either an existing directory (the archive is written inside it as
/// `busybox.oci.tar`) or the path of the archive file itself. The file is
/// written to a temporary name and renamed into place, so concurrent writers
/// never expose a half-written archive.
///
/// `index.json` names the image twice, as `io.containerd.image.name` (which
/// `ctr images import` uses verbatim) and as `org.opencontainers.image.ref.name`
/// (the OCI standard annotation other tools read).
pub fn busybox_oci_archive(dest: &Path, image_ref: &str) -> Result<PathBuf, Error> {
    let busybox = fs::read(BUSYBOX_BINARY).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::MissingProgram {
                path: BUSYBOX_BINARY.into(),
                why: "install Debian package busybox-static",
            }
        } else {
            Error::io(format!("reading {BUSYBOX_BINARY}"), e)
        }
    })?;
    let archive = build_archive(
        build_layer(&busybox)?,
        image_ref,
        json!({
            "Env": [DEFAULT_PATH_ENV],
            "Cmd": ["sh"],
            "WorkingDir": "/",
        }),
        &format!("integration harness: {BUSYBOX_BINARY} + applet symlinks"),
    )?;
    write_archive(dest, "busybox.oci.tar", &archive)
}

/// A busybox image archive like [`busybox_oci_archive`] with `extra` files added to its
/// layer (say `wasm/hello.wasm`, under a directory that is also in `extra` or in busybox's
/// layer: `bin/`, `etc/`, `tmp/`, `usr/bin/`...); its default command is `cmd`.
pub fn busybox_with_files_oci_archive(
    dest: &Path,
    image_ref: &str,
    extra: &[ImageFile<'_>],
    cmd: &[&str],
) -> Result<PathBuf, Error> {
    let busybox = fs::read(BUSYBOX_BINARY).ctx(|| format!("reading {BUSYBOX_BINARY}"))?;
    let names: Vec<&str> = extra.iter().map(|f| f.path).collect();
    let archive = build_archive(
        build_layer_with(&busybox, extra)?,
        image_ref,
        json!({ "Env": [DEFAULT_PATH_ENV], "Cmd": cmd, "WorkingDir": "/" }),
        &format!("integration harness: busybox + {}", names.join(" ")),
    )?;
    write_archive(dest, "image.oci.tar", &archive)
}

/// `PATH` in the images' config.
pub(crate) const DEFAULT_PATH_ENV: &str =
    "PATH=/bin:/usr/bin:/sbin:/usr/sbin:/usr/local/bin:/usr/local/sbin";

/// A regular file of an image built by [`oci_archive`].
#[derive(Debug, Clone, Copy)]
pub struct ImageFile<'a> {
    /// Path inside the image, relative (`pause`, `etc/hosts`).
    pub path: &'a str,
    pub mode: u32,
    pub data: &'a [u8],
}

/// Writes a single-layer OCI image archive for `image_ref` holding the directories `dirs`
/// (relative, ending in `/`) and `files`, whose process is `entrypoint`; returns its path.
///
/// `dest` works as for [`busybox_oci_archive`] (a directory gets `image.oci.tar`). Like the
/// busybox image, the archive is deterministic.
pub fn oci_archive(
    dest: &Path,
    image_ref: &str,
    dirs: &[&str],
    files: &[ImageFile<'_>],
    entrypoint: &[&str],
) -> Result<PathBuf, Error> {
    let mut b = tar::Builder::new(Vec::new());
    for dir in dirs {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, dir, std::io::empty())
            .map_err(tar_err(dir))?;
    }
    for f in files {
        let mut h = header(tar::EntryType::Regular, f.mode, f.data.len() as u64);
        b.append_data(&mut h, f.path, f.data)
            .map_err(tar_err(f.path))?;
    }
    let layer = b.into_inner().map_err(tar_err("layer trailer"))?;
    let names: Vec<&str> = files.iter().map(|f| f.path).collect();
    let archive = build_archive(
        layer,
        image_ref,
        json!({ "Env": [DEFAULT_PATH_ENV], "Entrypoint": entrypoint, "WorkingDir": "/" }),
        &format!("integration harness: {}", names.join(" ")),
    )?;
    write_archive(dest, "image.oci.tar", &archive)
}

/// The sandbox ("pause") image CRI starts first in every pod: `pause_binary` (the static
/// `pause` of this crate) as `/pause`, plus the mount points runc expects. A static binary
/// needs nothing else, which keeps the sandbox's rootfs a few hundred KiB.
pub fn pause_oci_archive(
    dest: &Path,
    pause_binary: &Path,
    image_ref: &str,
) -> Result<PathBuf, Error> {
    let data = fs::read(pause_binary).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::MissingProgram {
                path: pause_binary.into(),
                why: "build the integration binaries: cargo build --release -p integration --bins",
            }
        } else {
            Error::io(format!("reading {}", pause_binary.display()), e)
        }
    })?;
    oci_archive(
        dest,
        image_ref,
        &["dev/", "etc/", "proc/", "sys/"],
        &[ImageFile {
            path: "pause",
            mode: 0o755,
            data: &data,
        }],
        &["/pause"],
    )
}

/// Writes `archive` to `dest` (a directory gets `default_name` inside it) through a
/// temporary name and a rename, so concurrent writers never expose a half-written archive.
pub(crate) fn write_archive(
    dest: &Path,
    default_name: &str,
    archive: &[u8],
) -> Result<PathBuf, Error> {
    let path = if dest.is_dir() {
        dest.join(default_name)
    } else {
        dest.to_path_buf()
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".oci-archive-")
        .tempfile_in(&dir)
        .ctx_path("creating temporary file in", &dir)?;
    tmp.write_all(archive).ctx_path("writing", tmp.path())?;
    tmp.persist(&path)
        .map_err(|e| Error::io(format!("renaming archive to {}", path.display()), e.error))?;
    Ok(path)
}

/// Wraps one uncompressed `layer` into an OCI image archive: config (with `process` as
/// its `config` object), manifest, index naming `image_ref`, layout file.
fn build_archive(
    layer: Vec<u8>,
    image_ref: &str,
    process: serde_json::Value,
    created_by: &str,
) -> Result<Vec<u8>, Error> {
    let layer = Blob::new(layer);
    let config = json!({
        "created": "1970-01-01T00:00:00Z",
        "architecture": oci_arch(),
        "os": "linux",
        "config": process,
        "rootfs": { "type": "layers", "diff_ids": [layer.digest()] },
        "history": [{
            "created": "1970-01-01T00:00:00Z",
            "created_by": created_by,
        }],
    });
    let config = Blob::new(serde_json::to_vec(&config).map_err(|source| Error::Json {
        what: "image config",
        source,
    })?);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": config.descriptor(MT_CONFIG),
        "layers": [layer.descriptor(MT_LAYER)],
    });
    let manifest = Blob::new(serde_json::to_vec(&manifest).map_err(|source| Error::Json {
        what: "image manifest",
        source,
    })?);
    let mut mdesc = manifest.descriptor(MT_MANIFEST);
    mdesc["platform"] = json!({ "architecture": oci_arch(), "os": "linux" });
    mdesc["annotations"] = json!({
        "io.containerd.image.name": image_ref,
        "org.opencontainers.image.ref.name": image_ref,
    });
    let index = json!({ "schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [mdesc] });
    let index = serde_json::to_vec(&index).map_err(|source| Error::Json {
        what: "image index",
        source,
    })?;
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;

    let mut b = tar::Builder::new(Vec::new());
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, dir, std::io::empty())
            .map_err(tar_err(dir))?;
    }
    for blob in [&layer, &config, &manifest] {
        let path = format!("blobs/sha256/{}", blob.digest_hex);
        let mut h = header(tar::EntryType::Regular, 0o644, blob.data.len() as u64);
        b.append_data(&mut h, &path, blob.data.as_slice())
            .map_err(tar_err(&path))?;
    }
    for (path, data) in [("oci-layout", &layout[..]), ("index.json", &index[..])] {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        b.append_data(&mut h, path, data).map_err(tar_err(path))?;
    }
    b.into_inner().map_err(tar_err("archive trailer"))
}

/// Directory for archives shared between test processes:
/// `$SHIMTEST_CACHE_DIR`, else `<tmp>/shimtest-cache`.
pub(crate) fn cache_dir() -> PathBuf {
    match std::env::var_os("SHIMTEST_CACHE_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => std::env::temp_dir().join("shimtest-cache"),
    }
}

/// The busybox archive for [`BUSYBOX_REF`], built at most once per process.
///
/// The archive lives in a small shared cache directory (see `cache_dir`) under
/// a name derived from the busybox binary, the ref and the layout version, so
/// it is reused by later test processes instead of leaking one temporary
/// directory per process (a `TempDir` held in a static is never dropped).
pub fn cached_busybox_archive() -> Result<PathBuf, Error> {
    static ARCHIVE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ARCHIVE
        .get_or_init(|| build_cached().map_err(|e| e.to_string()))
        .clone()
        .map_err(|msg| Error::io("building busybox image archive", std::io::Error::other(msg)))
}

fn build_cached() -> Result<PathBuf, Error> {
    let busybox = fs::read(BUSYBOX_BINARY).ctx(|| format!("reading {BUSYBOX_BINARY}"))?;
    let mut h = Sha256::new();
    h.update(LAYOUT_VERSION);
    h.update([0]);
    h.update(BUSYBOX_REF);
    h.update([0]);
    h.update(&busybox);
    let key = hex(&h.finalize()[..8]);
    let dir = cache_dir();
    fs::create_dir_all(&dir).ctx_path("creating cache dir", &dir)?;
    let path = dir.join(format!("busybox-{key}.oci.tar"));
    if path.is_file() {
        return Ok(path);
    }
    busybox_oci_archive(&path, BUSYBOX_REF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_deterministic_and_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = busybox_oci_archive(&dir.path().join("a.tar"), BUSYBOX_REF).expect("a");
        let b = busybox_oci_archive(dir.path(), BUSYBOX_REF).expect("b");
        let (da, db) = (fs::read(&a).expect("read a"), fs::read(&b).expect("read b"));
        assert_eq!(da, db, "archives differ");

        let mut names = Vec::new();
        let mut index = None;
        let mut ar = tar::Archive::new(da.as_slice());
        for e in ar.entries().expect("entries") {
            let mut e = e.expect("entry");
            let name = e.path().expect("path").to_string_lossy().into_owned();
            if name == "index.json" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut e, &mut s).expect("read index");
                index = Some(s);
            }
            names.push(name);
        }
        assert!(names.contains(&"oci-layout".to_string()));
        let blobs = names
            .iter()
            .filter(|n| n.starts_with("blobs/sha256/") && !n.ends_with('/'));
        assert_eq!(blobs.count(), 3, "layer, config, manifest");
        let index: serde_json::Value =
            serde_json::from_str(&index.expect("index.json")).expect("json");
        let ann = &index["manifests"][0]["annotations"];
        assert_eq!(ann["io.containerd.image.name"], BUSYBOX_REF);
        assert_eq!(ann["org.opencontainers.image.ref.name"], BUSYBOX_REF);

        let layer = build_layer(&fs::read(BUSYBOX_BINARY).expect("busybox")).expect("layer");
        let mut ar = tar::Archive::new(layer.as_slice());
        let names: Vec<String> = ar
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        for a in REQUIRED_APPLETS {
            assert!(names.contains(&format!("bin/{a}")), "missing applet {a}");
        }
        for p in ["bin/busybox", "etc/passwd", "etc/group", "proc/", "tmp/"] {
            assert!(names.iter().any(|n| n == p), "missing {p}");
        }
    }

    #[test]
    fn generic_archive_has_entrypoint_and_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("pause-bin");
        fs::write(&bin, b"not really a binary").expect("write");
        let a = pause_oci_archive(dir.path(), &bin, "localhost/x/pause:1").expect("archive");
        assert_eq!(a, dir.path().join("image.oci.tar"));
        let data = fs::read(&a).expect("read");
        let mut ar = tar::Archive::new(data.as_slice());
        let mut configs = 0;
        for e in ar.entries().expect("entries") {
            let mut e = e.expect("entry");
            let mut s = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut s).expect("read entry");
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&s) {
                if v["config"]["Entrypoint"] == json!(["/pause"]) {
                    configs += 1;
                }
            }
        }
        assert_eq!(configs, 1, "image config with the pause entrypoint");
    }
}
