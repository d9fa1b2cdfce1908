//! Mount lists that build a rootfs in stages, as containerd's mount manager (2.2+) writes
//! them: each entry is mounted in turn, and later entries name the earlier ones' mount
//! points through templates. The EROFS snapshotter's block mode, for one:
//!
//! ```text
//! 0: mkfs/ext4           rwlayer.img  X-containerd.mkfs.fs=ext4,X-containerd.mkfs.size=N,rw,loop
//! 1: erofs               layer.erofs  ro,loop
//! 2: format/mkdir/overlay overlay     lowerdir={{ mount 1 }},upperdir={{ mount 0 }}/upper,
//!                                     workdir={{ mount 0 }}/work,
//!                                     X-containerd.mkdir.path={{ mount 0 }}/upper:0755, ...
//! ```
//!
//! A type's prefixes are transforms, applied left to right before the mount: `format/` fills
//! the templates (`{{ mount N }}`, `{{ source N }}`, `{{ target N }}`, `{{ overlay A B }}`),
//! `mkdir/` makes the directories of `X-containerd.mkdir.path=<dir>[:<mode>[:<uid>:<gid>]]`,
//! `mkfs/` makes a filesystem image (`X-containerd.mkfs.fs`, `.size`, `.uuid`) unless it
//! exists. Every entry but the last is mounted under `<bundle>/rootfs-mounts/<index>`, the
//! last on the rootfs; [`unmount`] takes them down in reverse.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use protocol::mount::Mount;

use crate::error::{Context, Error, Result};
use crate::os::{mount_one, unmount_all};

/// Where the entries before the last are mounted, beside `rootfs` in the bundle.
const STAGES: &str = "rootfs-mounts";

const MKDIR_PATH: &str = "X-containerd.mkdir.path=";
const MKFS_PREFIX: &str = "X-containerd.mkfs.";

/// Whether `mounts` must be mounted in stages: some entry has a transform or a template.
/// Lists without them keep the classic meaning: every entry on the rootfs, in order.
pub fn is_staged(mounts: &[Mount]) -> bool {
    mounts.iter().any(|m| {
        Transform::split(&m.type_).0.next().is_some()
            || m.source.contains("{{")
            || m.options.iter().any(|o| o.contains("{{"))
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transform {
    Format,
    Mkdir,
    Mkfs,
}

impl Transform {
    /// `format/mkdir/overlay` → ([Format, Mkdir], "overlay").
    fn split(type_: &str) -> (impl Iterator<Item = Transform> + '_, &str) {
        let mut rest = type_;
        let mut n = 0;
        while let Some((prefix, tail)) = rest.split_once('/') {
            if Transform::parse(prefix).is_none() {
                break;
            }
            rest = tail;
            n += 1;
        }
        let transforms = type_.split('/').take(n).filter_map(Transform::parse);
        (transforms, rest)
    }

    fn parse(prefix: &str) -> Option<Transform> {
        match prefix {
            "format" => Some(Transform::Format),
            "mkdir" => Some(Transform::Mkdir),
            "mkfs" => Some(Transform::Mkfs),
            _ => None,
        }
    }
}

/// An entry once mounted: what later templates refer to.
#[derive(Debug, Clone)]
struct Active {
    source: String,
    target: String,
    mount_point: PathBuf,
}

/// Mounts `mounts` in stages, the last on `rootfs`; on failure, undoes what it mounted.
pub fn mount(mounts: &[Mount], rootfs: &Path) -> Result<()> {
    let stages = stages_dir(rootfs);
    let mut active: Vec<Active> = Vec::new();
    for (i, m) in mounts.iter().enumerate() {
        let point = if i + 1 == mounts.len() {
            rootfs.to_path_buf()
        } else {
            stages.join(i.to_string())
        };
        match mount_stage(m, &point, &active) {
            // Templates see each entry as it was mounted, its own templates filled.
            Ok(mounted) => active.push(Active {
                source: mounted.source,
                target: mounted.target,
                mount_point: point,
            }),
            Err(e) => {
                let _ = unmount(rootfs);
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Unmounts the rootfs and every stage beneath it, newest first, and removes the stages'
/// directories. Loop devices under them free themselves (autoclear). Goes on past errors
/// and returns the first.
pub fn unmount(rootfs: &Path) -> Result<()> {
    let mut result = unmount_all(rootfs);
    let stages = stages_dir(rootfs);
    let mut indices: Vec<usize> = match fs::read_dir(&stages) {
        Ok(entries) => entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return result,
    };
    indices.sort_unstable_by(|a, b| b.cmp(a));
    for i in indices {
        let dir = stages.join(i.to_string());
        let undone = unmount_all(&dir).and_then(|()| {
            fs::remove_dir(&dir).with_context(|| format!("remove {}", dir.display()))
        });
        result = result.and(undone);
    }
    let removed = fs::remove_dir(&stages).with_context(|| format!("remove {}", stages.display()));
    result.and(removed)
}

fn stages_dir(rootfs: &Path) -> PathBuf {
    rootfs
        .parent()
        .unwrap_or_else(|| Path::new("/"))
        .join(STAGES)
}

/// Applies `m`'s transforms and mounts it on `point`; returns it as mounted.
fn mount_stage(m: &Mount, point: &Path, active: &[Active]) -> Result<Mount> {
    let (transforms, fs_type) = Transform::split(&m.type_);
    let mut m = Mount {
        type_: fs_type.to_string(),
        ..m.clone()
    };
    for t in transforms {
        m = match t {
            Transform::Format => format_all(&m, active)?,
            Transform::Mkdir => mkdirs(m)?,
            Transform::Mkfs => mkfs(m)?,
        };
    }
    if let Some(o) = m.options.iter().find(|o| o.contains("{{")) {
        return Err(Error::InvalidArgument(format!(
            "option {o:?} has a template but type {:?} no format/ transform",
            m.type_
        )));
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(point)
        .with_context(|| format!("create mount point {}", point.display()))?;
    mount_one(&m, point)?;
    Ok(m)
}

fn format_all(m: &Mount, active: &[Active]) -> Result<Mount> {
    Ok(Mount {
        source: format(&m.source, active)?,
        target: format(&m.target, active)?,
        options: m
            .options
            .iter()
            .map(|o| format(o, active))
            .collect::<Result<_>>()?,
        ..m.clone()
    })
}

/// Fills the templates of `s` from the entries mounted so far.
fn format(s: &str, active: &[Active]) -> Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| Error::InvalidArgument(format!("unclosed template in {s:?}")))?;
        out.push_str(&expand(after[..end].trim(), active, s)?);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn expand(action: &str, active: &[Active], whole: &str) -> Result<String> {
    let bad = |why: &str| {
        Error::InvalidArgument(format!("template {{{{ {action} }}}} in {whole:?}: {why}"))
    };
    let mut words = action.split_whitespace();
    let func = words.next().unwrap_or_default();
    if !matches!(func, "mount" | "source" | "target" | "overlay") {
        return Err(bad("want mount N, source N, target N or overlay A B"));
    }
    let args: Vec<usize> = words
        .map(|w| w.parse().map_err(|_| bad("arguments are mount indices")))
        .collect::<Result<_>>()?;
    let get = |i: usize| {
        active.get(i).ok_or_else(|| {
            bad(&format!(
                "index out of bounds: {i}, has {} active mounts",
                active.len()
            ))
        })
    };
    match (func, args.as_slice()) {
        ("mount", [i]) => Ok(get(*i)?.mount_point.display().to_string()),
        ("source", [i]) => Ok(get(*i)?.source.clone()),
        ("target", [i]) => Ok(get(*i)?.target.clone()),
        ("overlay", [a, b]) => {
            let range: Vec<usize> = if a > b {
                (*b..=*a).rev().collect()
            } else {
                (*a..=*b).collect()
            };
            let dirs = range
                .into_iter()
                .map(|i| Ok(get(i)?.mount_point.display().to_string()))
                .collect::<Result<Vec<_>>>()?;
            Ok(dirs.join(":"))
        }
        _ => Err(bad("want mount N, source N, target N or overlay A B")),
    }
}

/// Makes the directories of the `X-containerd.mkdir.path` options and drops the options.
fn mkdirs(mut m: Mount) -> Result<Mount> {
    let mut kept = Vec::with_capacity(m.options.len());
    for o in std::mem::take(&mut m.options) {
        let Some(spec) = o.strip_prefix(MKDIR_PATH) else {
            kept.push(o);
            continue;
        };
        let bad = |why: &str| Error::InvalidArgument(format!("{o}: {why}"));
        let mut parts = spec.split(':');
        let dir = PathBuf::from(parts.next().unwrap_or_default());
        if !dir.is_absolute() {
            return Err(bad("the path must be absolute"));
        }
        let mode = match parts.next() {
            Some(m) => u32::from_str_radix(m, 8).map_err(|_| bad("mode is not octal"))?,
            None => 0o700,
        };
        let owner = match (parts.next(), parts.next()) {
            (Some(u), Some(g)) => Some((
                u.parse::<u32>().map_err(|_| bad("uid is not a number"))?,
                g.parse::<u32>().map_err(|_| bad("gid is not a number"))?,
            )),
            (None, None) => None,
            _ => return Err(bad("want <dir>[:<mode>[:<uid>:<gid>]]")),
        };
        let existed = dir.is_dir();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(&dir)
            .with_context(|| format!("mkdir {}", dir.display()))?;
        if !existed {
            // The umask must not narrow what containerd asked for.
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode))
                .with_context(|| format!("chmod {}", dir.display()))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                    .with_context(|| format!("chown {}", dir.display()))?;
            }
        }
    }
    m.options = kept;
    Ok(m)
}

/// Makes the filesystem image `m.source` unless it exists, and drops the mkfs options.
/// The image is made under a temporary name and renamed into place, so a failed mkfs never
/// leaves a file that the next create would take for a formatted image.
fn mkfs(mut m: Mount) -> Result<Mount> {
    let (mut fs_type, mut size, mut uuid) = (None, None, None);
    let mut kept = Vec::with_capacity(m.options.len());
    for o in std::mem::take(&mut m.options) {
        match o
            .strip_prefix(MKFS_PREFIX)
            .and_then(|kv| kv.split_once('='))
        {
            Some(("fs", v)) => fs_type = Some(v.to_string()),
            Some(("size", v)) => {
                size = Some(parse_size(v).ok_or_else(|| {
                    Error::InvalidArgument(format!("{o}: not a size (bytes, or with KiB/MiB/GiB)"))
                })?)
            }
            Some(("uuid", v)) => uuid = Some(v.to_string()),
            _ => kept.push(o),
        }
    }
    m.options = kept;
    let image = PathBuf::from(&m.source);
    if image.exists() {
        return Ok(m);
    }
    let fs_type = fs_type.unwrap_or_else(|| m.type_.clone());
    let size = size.ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{}: image missing and no X-containerd.mkfs.size to make it",
            image.display()
        ))
    })?;
    let tmp = image.with_extension(format!("mkfs-{}", std::process::id()));
    let made = (|| {
        let f = fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        f.set_len(size)
            .with_context(|| format!("size {} to {size} bytes", tmp.display()))?;
        drop(f);
        let tool = format!("mkfs.{fs_type}");
        let mut cmd = Command::new(&tool);
        cmd.arg("-q");
        if let Some(uuid) = &uuid {
            match fs_type.as_str() {
                "xfs" => cmd.args(["-m", &format!("uuid={uuid}")]),
                _ => cmd.args(["-U", uuid]),
            };
        }
        cmd.arg(&tmp).stdout(Stdio::null()).stderr(Stdio::piped());
        // Through the reaper: the shim is a subreaper, so std's own wait would race it.
        let out = crate::reaper::run(&mut cmd)?;
        if !out.success() {
            return Err(Error::Runtime(format!(
                "{tool} {}: exit status {}: {}",
                tmp.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        fs::rename(&tmp, &image).with_context(|| format!("rename to {}", image.display()))
    })();
    if made.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    made.map(|()| m)
}

/// `67108864`, `64MiB`, `64M`, `1G`, ...
fn parse_size(s: &str) -> Option<u64> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..digits].parse().ok()?;
    let unit: u64 = match s[digits..].trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active(points: &[&str]) -> Vec<Active> {
        points
            .iter()
            .enumerate()
            .map(|(i, p)| Active {
                source: format!("/src/{i}"),
                target: String::new(),
                mount_point: PathBuf::from(p),
            })
            .collect()
    }

    #[test]
    fn transforms_are_the_known_prefixes_left_to_right() {
        let (t, fs) = Transform::split("format/mkdir/overlay");
        assert_eq!(t.collect::<Vec<_>>(), [Transform::Format, Transform::Mkdir]);
        assert_eq!(fs, "overlay");
        let (t, fs) = Transform::split("mkfs/ext4");
        assert_eq!(t.collect::<Vec<_>>(), [Transform::Mkfs]);
        assert_eq!(fs, "ext4");
        let (mut t, fs) = Transform::split("erofs");
        assert!(t.next().is_none());
        assert_eq!(fs, "erofs");
    }

    #[test]
    fn templates_name_earlier_mounts() {
        let a = active(&["/b/m/0", "/b/m/1", "/b/m/2"]);
        assert_eq!(
            format("upperdir={{ mount 0 }}/upper", &a).unwrap(),
            "upperdir=/b/m/0/upper"
        );
        assert_eq!(format("{{source 1}}", &a).unwrap(), "/src/1");
        assert_eq!(
            format("lowerdir={{ overlay 2 1 }}", &a).unwrap(),
            "lowerdir=/b/m/2:/b/m/1"
        );
        assert_eq!(
            format("lowerdir={{ overlay 1 2 }}", &a).unwrap(),
            "lowerdir=/b/m/1:/b/m/2"
        );
        assert_eq!(format("plain", &a).unwrap(), "plain");
    }

    #[test]
    fn bad_templates_are_invalid_arguments_that_say_why() {
        let a = active(&["/b/m/0"]);
        for (s, why) in [
            ("{{ mount 3 }}", "index out of bounds: 3, has 1"),
            ("{{ mount 0 ", "unclosed"),
            ("{{ env HOME }}", "want mount N"),
            ("{{ mount x }}", "mount indices"),
        ] {
            let e = format(s, &a).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{s}: {e}");
            assert!(e.to_string().contains(why), "{s}: {e}");
        }
    }

    #[test]
    fn mkdir_options_make_directories_with_their_mode_and_go() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("m0/upper");
        let m = Mount {
            type_: "overlay".into(),
            options: vec![
                format!("{MKDIR_PATH}{}:0755", upper.display()),
                "index=off".into(),
            ],
            ..Default::default()
        };
        let m = mkdirs(m).unwrap();
        assert_eq!(m.options, ["index=off"]);
        let meta = fs::metadata(&upper).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        let bad = Mount {
            options: vec![format!("{MKDIR_PATH}relative/dir")],
            ..Default::default()
        };
        assert!(mkdirs(bad).is_err());
    }

    #[test]
    fn sizes_read_as_containerd_writes_them() {
        assert_eq!(parse_size("67108864"), Some(64 << 20));
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("12 parsecs"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn classic_lists_are_not_staged() {
        let plain = Mount {
            type_: "overlay".into(),
            options: vec!["lowerdir=/a".into()],
            ..Default::default()
        };
        assert!(!is_staged(std::slice::from_ref(&plain)));
        let loop_only = Mount {
            type_: "erofs".into(),
            options: vec!["ro".into(), "loop".into()],
            ..Default::default()
        };
        assert!(!is_staged(&[loop_only]));
        let templated = Mount {
            type_: "format/overlay".into(),
            ..plain
        };
        assert!(is_staged(&[templated]));
    }
}
