//! The release as `make dist` ships it, and the installer's image: built here, offline, from
//! the binaries `make build` left, so the tests install exactly what a release holds.
//!
//! A release directory holds the shims, `shim-installer`, the VM shim's helpers and guest
//! image when present, and `SHA256SUMS` over all of them (what the installer checks). The
//! image (`make dist`'s `shim-installer.oci.tar`, what the DaemonSet runs) is that directory
//! under `/release`, with the installer as its entrypoint.

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext};
use crate::image::{self, ImageFile};

/// The installer image's reference (deploy/shim-installer.yaml names it).
pub const INSTALLER_IMAGE: &str = "localhost/containerd-shims/installer:latest";

/// Where the release is inside the installer image.
pub const IMAGE_RELEASE_DIR: &str = "/release";

/// Every file a release can hold, relative to the build's binary directory; those absent
/// there (the VM shim's guest image before `make guest`) are left out.
pub const RELEASE_FILES: &[&str] = &[
    "shim-installer",
    "containerd-shim-runc-v2",
    "containerd-shim-wasm-v2",
    "containerd-shim-vm-v2",
    "virtiofsd",
    "vhost-device-vsock",
    "vm-guest/vmlinux",
    "vm-guest/initramfs.cpio",
];

/// Copies `files` (relative to `bin_dir`, links followed; those absent are skipped) into
/// `dest` and writes `SHA256SUMS` over everything `dest` then holds; returns the files copied.
pub fn release_dir(bin_dir: &Path, files: &[&str], dest: &Path) -> Result<Vec<String>, Error> {
    let mut copied = Vec::new();
    for f in files {
        let src = bin_dir.join(f);
        if !src.exists() {
            continue;
        }
        let to = dest.join(f);
        if let Some(dir) = to.parent() {
            fs::create_dir_all(dir).ctx_path("creating", dir)?;
        }
        fs::copy(&src, &to).ctx_path("copying", &src)?;
        copied.push(f.to_string());
    }
    write_sums(dest)?;
    Ok(copied)
}

/// Writes `dir/SHA256SUMS` (`sha256sum`'s format) over every other file under `dir`.
pub fn write_sums(dir: &Path) -> Result<(), Error> {
    let mut dirs = Vec::new();
    let mut entries = Vec::new();
    collect(dir, "", &mut dirs, &mut entries)?;
    let mut sums = String::new();
    for (name, _, data) in entries.iter().filter(|(n, _, _)| n != "SHA256SUMS") {
        sums.push_str(&format!("{}  {name}\n", image::hex(&Sha256::digest(data))));
    }
    let path = dir.join("SHA256SUMS");
    fs::write(&path, sums).ctx_path("writing", &path)
}

/// Writes the installer image holding the release directory `release` at
/// [`IMAGE_RELEASE_DIR`]; returns the archive's path.
pub fn installer_image(release: &Path, dest: &Path) -> Result<PathBuf, Error> {
    let mut entries: Vec<(String, u32, Vec<u8>)> = Vec::new();
    let mut dirs = vec!["release/".to_string()];
    collect(release, "release", &mut dirs, &mut entries)?;
    let files: Vec<ImageFile<'_>> = entries
        .iter()
        .map(|(path, mode, data)| ImageFile {
            path,
            mode: *mode,
            data,
        })
        .collect();
    let dirs: Vec<&str> = dirs.iter().map(String::as_str).collect();
    let entrypoint = format!("{IMAGE_RELEASE_DIR}/shim-installer");
    image::oci_archive(dest, INSTALLER_IMAGE, &dirs, &files, &[&entrypoint])
}

fn collect(
    dir: &Path,
    prefix: &str,
    dirs: &mut Vec<String>,
    out: &mut Vec<(String, u32, Vec<u8>)>,
) -> Result<(), Error> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .ctx_path("reading", dir)?
        .filter_map(Result::ok)
        .collect();
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let path = e.path();
        let file = e.file_name().to_string_lossy().into_owned();
        let name = if prefix.is_empty() {
            file
        } else {
            format!("{prefix}/{file}")
        };
        if path.is_dir() {
            dirs.push(format!("{name}/"));
            collect(&path, &name, dirs, out)?;
        } else {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path)
                .ctx_path("reading", &path)?
                .permissions()
                .mode()
                & 0o777;
            out.push((name, mode, fs::read(&path).ctx_path("reading", &path)?));
        }
    }
    Ok(())
}
