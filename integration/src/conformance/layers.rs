//! Checks of a layered root filesystem (image files on loop devices) and of what its
//! teardown leaves.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::playground::Playground;
use crate::checks::wait_until;

pub const LOOP_RELEASE: Duration = Duration::from_secs(5);

/// The loop devices bound to files under `dir` that are still bound [`LOOP_RELEASE`] after
/// the unmount. Autoclear frees a device when its file system's last reference goes, and a
/// mount namespace another process was cloning at the unmount (a container starting in a
/// parallel test) holds one until it drops its copy.
pub fn loop_devices_left(dir: &Path) -> Vec<String> {
    wait_until(LOOP_RELEASE, || loop_devices_of(dir).is_empty());
    loop_devices_of(dir)
}

/// After the init's delete: the container wrote into the ext4 upper layer, and nothing of the
/// rootfs is left mounted or bound to a loop device.
pub fn check_layers(pg: &Playground) -> Result<String, String> {
    let rw = pg.layers().join("rwlayer.img");
    let left = leftover_mounts(&pg.bundle());
    if !left.is_empty() {
        return Err(format!("still mounted: {left:?}"));
    }
    let bound = loop_devices_left(&pg.layers());
    if !bound.is_empty() {
        return Err(format!(
            "loop devices still bound {LOOP_RELEASE:?} after the delete: {bound:?}"
        ));
    }
    let stages = pg.bundle().join("rootfs-mounts");
    if stages.exists() {
        return Err(format!("{} left behind", stages.display()));
    }
    let out = Command::new("debugfs")
        .args(["-R", "cat /upper/layered"])
        .arg(&rw)
        .output()
        .map_err(|e| format!("run debugfs (apt install e2fsprogs): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim() != "layered" {
        return Err(format!(
            "{} holds {:?} at upper/layered, want \"layered\" ({})",
            rw.display(),
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok("the init's /layered in rwlayer.img's upper/; nothing mounted, no loop device left".into())
}

/// Mount points at or under `dir`, from this mount namespace's table.
pub fn leftover_mounts(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(&prefix))
        .map(String::from)
        .collect()
}

/// Loop devices whose backing file is under `dir`, as `loopN=<file>`.
pub fn loop_devices_of(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let file = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
            file.trim()
                .starts_with(&prefix)
                .then(|| format!("{name}={}", file.trim()))
        })
        .collect()
}
