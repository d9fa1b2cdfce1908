//! `install`, `uninstall` and `status`: the steps in the order that keeps a node working
//! at every point. Binaries go in before any config names them and leave after none does;
//! a config change is validated by the node's own containerd before it replaces the old
//! one; containerd restarts only when its config changed; handlers are checked live.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::config::{self, ConfigError, Handler};
use crate::cri::{Cri, CriError, PodUse};
use crate::files::{self, FileError, Outcome};
use crate::node::{self, Node, NodeError, Restart};
use crate::record::{ConfigEdit, InstalledFile, InstalledHandler, InstalledLink, Record};
use crate::release::{self, Release, Shim};

/// The drop-in file's name (containerd 2.x).
pub const DROPIN: &str = "shim-installer.toml";
/// Where the main config's first state is kept (containerd 1.x), in the state directory.
const BACKUP: &str = "config.toml.orig";

#[derive(Debug, Error)]
pub enum InstallError {
    #[error("{0}")]
    File(#[from] FileError),
    #[error("{0}")]
    Node(#[from] NodeError),
    #[error("{0}")]
    Cri(#[from] CriError),
    #[error("{}: {source}", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error("containerd refuses the merged config, so nothing was changed and containerd was not restarted: {0}")]
    Invalid(NodeError),
    #[error("containerd's merged config lacks handler {0:?} (an import replaced it, or containerd ignored our file): nothing was changed")]
    NotMerged(String),
    #[error("unknown shim {0:?} (runc, wasm, vm, jail)")]
    UnknownShim(String),
    #[error("the {0} shim runs on {1} only")]
    WrongOs(&'static str, &'static str),
    #[error("the release in {} lacks {shim}'s {files}", dir.display())]
    Incomplete {
        dir: PathBuf,
        shim: &'static str,
        files: String,
    },
    #[error("containerd is not managed by systemd here: say how to restart it (--restart-command CMD), or --no-restart")]
    NoRestart,
    #[error("handler {handler:?} does not run pods: {source}")]
    Unhealthy {
        handler: String,
        #[source]
        source: CriError,
    },
    #[error("CRI does not report handler {0:?} after the restart")]
    NotReported(String),
    #[error("pods use the handlers to remove (--force removes them anyway): {}", list_pods(.0))]
    InUse(Vec<PodUse>),
    #[error("cannot tell whether pods use the handlers (--force removes them anyway): {0}")]
    UseUnknown(CriError),
}

fn list_pods(pods: &[PodUse]) -> String {
    pods.iter()
        .map(|p| format!("{}/{} ({})", p.namespace, p.name, p.handler))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where things are on the node (host paths) and how to treat it.
#[derive(Debug, Clone)]
pub struct Target {
    pub node: Node,
    pub config: PathBuf,
    pub bin_dir: PathBuf,
    /// A directory on containerd's `PATH`, for the links to the shim binaries.
    pub link_dir: PathBuf,
    pub dropin_dir: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub address: PathBuf,
    pub restart: Restart,
    pub ready_timeout: Duration,
}

impl Target {
    fn host(&self, p: &Path) -> PathBuf {
        self.node.host(p)
    }

    fn dropin_path(&self) -> PathBuf {
        match &self.dropin_dir {
            Some(d) => d.join(DROPIN),
            None => config_dir(&self.config).join("conf.d").join(DROPIN),
        }
    }
}

fn config_dir(config: &Path) -> &Path {
    config.parent().unwrap_or(Path::new("/"))
}

/// What to install: shims, their handler names, extra settings.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Shim names; empty: every shim of the release that runs here.
    pub shims: Vec<String>,
    /// shim → handler name (default `rs-<shim>`).
    pub names: Vec<(String, String)>,
    /// (handler, key, TOML value).
    pub settings: Vec<(String, String, String)>,
}

impl Selection {
    pub fn handler_name(&self, shim: &str) -> String {
        self.names
            .iter()
            .rev()
            .find(|(s, _)| s == shim)
            .map(|(_, n)| n.clone())
            .unwrap_or_else(|| format!("rs-{shim}"))
    }

    /// The shims named, checked against the release; all of the release's for this OS when
    /// none is named.
    fn resolve(&self, release: &Release) -> Result<Vec<&'static Shim>, InstallError> {
        if self.shims.is_empty() {
            return Ok(release::SHIMS
                .iter()
                .filter(|s| s.for_this_os() && release.missing(s).is_empty())
                .collect());
        }
        self.shims
            .iter()
            .map(|name| {
                let shim =
                    release::shim(name).ok_or_else(|| InstallError::UnknownShim(name.clone()))?;
                if !shim.for_this_os() {
                    return Err(InstallError::WrongOs(shim.name, shim.os));
                }
                let missing = release.missing(shim);
                if !missing.is_empty() {
                    return Err(InstallError::Incomplete {
                        dir: release.dir.clone(),
                        shim: shim.name,
                        files: missing.join(", "),
                    });
                }
                Ok(shim)
            })
            .collect()
    }
}

/// The handler sections of `sel`'s shims (all for this OS when none is named) as a config
/// file of version `schema` would hold them: the snippet a manual install pastes.
pub fn config_text(schema: &str, sel: &Selection) -> Result<String, InstallError> {
    let schema = match schema {
        "2" => config::Schema::V2,
        "3" => config::Schema::V3,
        "4" => config::Schema::V4,
        other => {
            return Err(InstallError::Config {
                path: PathBuf::from("--schema"),
                source: ConfigError::Version(other.parse().unwrap_or(0)),
            })
        }
    };
    let mut handlers = Vec::new();
    for shim in release::SHIMS.iter().filter(|s| {
        if sel.shims.is_empty() {
            s.for_this_os()
        } else {
            sel.shims.iter().any(|n| n == s.name)
        }
    }) {
        handlers.push(handler(shim, sel)?);
    }
    Ok(format!(
        "# The runtime handlers `shim-installer install` adds (containerd config version {}).\n{}",
        schema.number(),
        config::dropin(schema, &handlers)
    ))
}

/// The handler section of `shim` with its settings and the selection's.
fn handler(shim: &Shim, sel: &Selection) -> Result<Handler, InstallError> {
    let name = sel.handler_name(shim.name);
    let mut h = Handler::new(&name, shim.name, shim.runtime_type);
    let config_err = |source| InstallError::Config {
        path: PathBuf::from("--set"),
        source,
    };
    for (key, value) in shim.settings {
        h.set(key, value).map_err(config_err)?;
    }
    for (_, key, value) in sel.settings.iter().filter(|(hn, _, _)| *hn == name) {
        h.set(key, value).map_err(config_err)?;
    }
    Ok(h)
}

/// What a step reports, a line each.
pub type Report = Vec<String>;

pub fn install(t: &Target, release: &Release, sel: &Selection) -> Result<Report, InstallError> {
    let mut report = Report::new();
    let shims = sel.resolve(release)?;
    if t.restart == Restart::Systemd && !t.node.systemd_manages_containerd() {
        return Err(InstallError::NoRestart);
    }
    let handlers = shims
        .iter()
        .map(|s| handler(s, sel))
        .collect::<Result<Vec<_>, _>>()?;

    let previous = Record::load(&t.host(&t.state_dir))?;
    let mut record = previous.clone().unwrap_or_default();
    record.installer = env!("CARGO_PKG_VERSION").to_string();
    record.config = t.config.clone();

    // Binaries first: a config never names a file that is not there.
    let mut new_files = Vec::new();
    for shim in &shims {
        for f in shim.files {
            let dest = t.bin_dir.join(f);
            let sum = &release.sums[*f];
            let outcome = files::install(&release.dir.join(f), &t.host(&dest), sum, Shim::mode(f))?;
            if outcome == Outcome::Written {
                report.push(format!("installed {}", dest.display()));
            }
            if !record.files.iter().any(|r| r.path == dest) {
                new_files.push((dest.clone(), sum.clone()));
            }
            record.add_file(InstalledFile {
                shim: shim.name.to_string(),
                path: dest,
                sha256: sum.clone(),
            });
        }
    }

    // The installer itself, for `status` and `uninstall` on the node later.
    if release.sums.contains_key(release::INSTALLER)
        && release.dir.join(release::INSTALLER).is_file()
    {
        let dest = t.bin_dir.join(release::INSTALLER);
        let sum = &release.sums[release::INSTALLER];
        files::install(
            &release.dir.join(release::INSTALLER),
            &t.host(&dest),
            sum,
            0o755,
        )?;
        if !record.files.iter().any(|r| r.path == dest) {
            new_files.push((dest.clone(), sum.clone()));
        }
        record.add_file(InstalledFile {
            shim: "installer".into(),
            path: dest,
            sha256: sum.clone(),
        });
    }

    let mut new_links = Vec::new();
    for shim in &shims {
        let path = t.link_dir.join(shim.link);
        let target = t.bin_dir.join(shim.files[0]);
        if files::link(&target, &t.host(&path))? == Outcome::Written {
            report.push(format!("linked {} -> {}", path.display(), target.display()));
            if !record.links.iter().any(|l| l.path == path) {
                new_links.push((path.clone(), target.clone()));
            }
        }
        record.add_link(InstalledLink {
            shim: shim.name.to_string(),
            path,
            target,
        });
    }

    let edited = t
        .node
        .containerd_version()
        .map_err(InstallError::from)
        .and_then(|(major, _)| {
            if major < 2 {
                add_to_main(t, &handlers, &mut record)
            } else {
                add_to_dropin(t, &handlers, &mut record)
            }
        });
    let changed = match edited {
        Ok(changed) => changed,
        Err(e) => {
            // The config is as it was: so are the files this run added.
            for (path, target) in &new_links {
                let _ = files::remove_link_if_ours(&t.host(path), target);
            }
            for (path, sum) in &new_files {
                let _ = files::remove_if_ours(&t.host(path), sum);
            }
            if previous.is_none() {
                for d in [t.bin_dir.join("vm-guest"), t.bin_dir.clone()] {
                    let _ = fs::remove_dir(t.host(&d));
                }
            }
            return Err(e);
        }
    };
    for h in &handlers {
        record.add_handler(InstalledHandler {
            shim: h.shim.clone(),
            name: h.name.clone(),
        });
    }
    record.save(&t.host(&t.state_dir))?;

    if !changed {
        report.push("containerd's config already has these handlers: not restarted".into());
        return Ok(report);
    }
    report.push(format!(
        "added handlers {} to {}",
        names(&handlers).join(", "),
        t.config.display()
    ));
    if t.restart == Restart::Never {
        report.push("containerd not restarted (--no-restart): the handlers work once it is".into());
        return Ok(report);
    }
    t.node.restart(&t.restart)?;
    report.push("restarted containerd".into());
    check_live(t, &names(&handlers), &mut report)?;
    Ok(report)
}

fn names(handlers: &[Handler]) -> Vec<String> {
    handlers.iter().map(|h| h.name.clone()).collect()
}

/// containerd 1.x: the handlers go into the main file (its imports would replace the CRI
/// plugin's whole section). Returns whether the file changed.
fn add_to_main(
    t: &Target,
    handlers: &[Handler],
    record: &mut Record,
) -> Result<bool, InstallError> {
    let path = t.host(&t.config);
    let original = read_optional(&path)?;
    let text = original.clone().unwrap_or_else(|| "version = 2\n".into());
    let added = config::add_handlers(&text, handlers).map_err(|source| InstallError::Config {
        path: t.config.clone(),
        source,
    })?;
    let Some(new) = added.text else {
        return Ok(false);
    };
    let after = files::sha256_bytes(new.as_bytes());
    if let Some(ConfigEdit::Main { after: a, .. }) = &mut record.edit {
        replace_validated(t, &t.config, &new, handlers)?;
        *a = after;
        return Ok(true);
    }
    // The first edit: the original is kept before anything replaces it.
    let backup = match &original {
        Some(text) => {
            let b = t.state_dir.join(BACKUP);
            files::write_bytes(&t.host(&b), text.as_bytes(), 0o600)?;
            Some(b)
        }
        None => None,
    };
    if let Err(e) = replace_validated(t, &t.config, &new, handlers) {
        if let Some(b) = &backup {
            let _ = fs::remove_file(t.host(b));
            let _ = fs::remove_dir(t.host(&t.state_dir));
        }
        return Err(e);
    }
    record.edit = Some(ConfigEdit::Main { backup, after });
    Ok(true)
}

/// containerd 2.x: the handlers go into our drop-in, which the main file must import;
/// an `imports` entry is added only when containerd's merged view shows it does not.
fn add_to_dropin(
    t: &Target,
    handlers: &[Handler],
    record: &mut Record,
) -> Result<bool, InstallError> {
    let main_path = t.host(&t.config);
    let main = read_optional(&main_path)?.unwrap_or_default();
    let cfg_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Config { path, source }
    };
    let schema = if main.trim().is_empty() {
        config::Schema::V3
    } else {
        config::schema(&main).map_err(cfg_err(&t.config))?
    };
    // A handler of the same name in the main file would be merged with ours.
    if !main.trim().is_empty() {
        config::add_handlers(&main, handlers).map_err(cfg_err(&t.config))?;
    }
    let dropin = t.dropin_path();
    let dropin_host = t.host(&dropin);
    let before = read_optional(&dropin_host)?;
    let base = before.clone().unwrap_or_else(|| {
        format!(
            "# Written by shim-installer; `shim-installer uninstall` removes it.\n{}",
            config::dropin(schema, &[])
        )
    });
    let added = config::add_handlers(&base, handlers).map_err(cfg_err(&dropin))?;
    let Some(new) = added.text else {
        return Ok(false);
    };
    files::write_bytes(&dropin_host, new.as_bytes(), 0o644)?;
    let restore = || -> Result<(), FileError> {
        match &before {
            Some(text) => files::write_bytes(&dropin_host, text.as_bytes(), 0o644),
            None => fs::remove_file(&dropin_host).map_err(|source| FileError::Io {
                what: "removing",
                path: dropin_host.clone(),
                source,
            }),
        }
    };
    let dump = match t.node.config_dump(&t.config) {
        Ok(d) => d,
        Err(e) => {
            restore()?;
            return Err(InstallError::Invalid(e));
        }
    };
    let mut import = None;
    let mut imports_created = false;
    if handlers.iter().any(|h| !merged(&dump, h)) {
        let entry = dropin.to_string_lossy().into_owned();
        let text = if main.trim().is_empty() {
            format!("version = {}\n", schema.number())
        } else {
            main.clone()
        };
        let (new_main, created) = config::add_import(&text, &entry).map_err(cfg_err(&t.config))?;
        imports_created = created;
        if let Err(e) = replace_validated(t, &t.config, &new_main, handlers) {
            restore()?;
            return Err(e);
        }
        import = Some(entry);
    }
    if !matches!(record.edit, Some(ConfigEdit::DropIn { .. })) {
        record.edit = Some(ConfigEdit::DropIn {
            path: dropin,
            import,
            imports_created,
        });
    }
    Ok(true)
}

/// Whether containerd's merged view has `h` as we wrote it.
fn merged(dump: &toml::Table, h: &Handler) -> bool {
    let want = h.section.get("runtime_type").and_then(|v| v.as_str());
    node::dumped_handler(dump, &h.name)
        .and_then(|d| d.get("runtime_type"))
        .and_then(|v| v.as_str())
        == want
}

/// Writes `text` beside the config (host path `config`), has containerd validate it there
/// (relative imports resolve the same), checks `handlers` are in its merged view, and only
/// then renames it over the config.
fn replace_validated(
    t: &Target,
    config: &Path,
    text: &str,
    handlers: &[Handler],
) -> Result<(), InstallError> {
    let name = config
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let candidate = config_dir(config).join(format!(".{name}.shim-installer-candidate"));
    let candidate_host = t.host(&candidate);
    files::write_bytes(&candidate_host, text.as_bytes(), 0o644)?;
    let checked = t
        .node
        .config_dump(&candidate)
        .map_err(InstallError::Invalid)
        .and_then(|dump| match handlers.iter().find(|h| !merged(&dump, h)) {
            Some(h) => Err(InstallError::NotMerged(h.name.clone())),
            None => Ok(()),
        });
    if let Err(e) = checked {
        let _ = fs::remove_file(&candidate_host);
        return Err(e);
    }
    fs::rename(&candidate_host, t.host(config)).map_err(|source| FileError::Io {
        what: "renaming into place",
        path: t.host(config),
        source,
    })?;
    Ok(())
}

/// After a restart: CRI answers, and each handler runs a pod (or is listed in `Status`
/// where CRI reports handlers).
fn check_live(t: &Target, handlers: &[String], report: &mut Report) -> Result<(), InstallError> {
    let cri = Cri::connect(&t.host(&t.address), t.ready_timeout)?;
    match cri.reported_handlers()? {
        Some(reported) => {
            for h in handlers {
                if !reported.contains(h) {
                    return Err(InstallError::NotReported(h.clone()));
                }
                report.push(format!("handler {h}: reported by CRI"));
            }
        }
        None => {
            for h in handlers {
                cri.probe(h).map_err(|source| InstallError::Unhealthy {
                    handler: h.clone(),
                    source,
                })?;
                report.push(format!("handler {h}: ran a probe pod"));
            }
        }
    }
    Ok(())
}

pub fn uninstall(t: &Target, sel: &Selection, force: bool) -> Result<Report, InstallError> {
    let mut report = Report::new();
    let state = t.host(&t.state_dir);
    let Some(mut record) = Record::load(&state)? else {
        report.push("nothing installed".into());
        return Ok(report);
    };
    let shims: Vec<String> = if sel.shims.is_empty() {
        record.shims()
    } else {
        sel.shims.clone()
    };
    let handlers: Vec<String> = record
        .handlers
        .iter()
        .filter(|h| shims.contains(&h.shim))
        .map(|h| h.name.clone())
        .collect();

    if !handlers.is_empty() && !force {
        let cri =
            Cri::connect(&t.host(&t.address), t.ready_timeout).map_err(InstallError::UseUnknown)?;
        let pods = cri
            .pods_using(&handlers)
            .map_err(InstallError::UseUnknown)?;
        if !pods.is_empty() {
            return Err(InstallError::InUse(pods));
        }
    }

    let all = record.handlers.iter().all(|h| handlers.contains(&h.name));
    let changed = if handlers.is_empty() {
        false
    } else {
        match record.edit.clone() {
            Some(ConfigEdit::Main { backup, after }) => {
                remove_from_main(t, &handlers, all, backup.as_deref(), &after, &mut record)?
            }
            Some(ConfigEdit::DropIn {
                path,
                import,
                imports_created,
            }) => remove_from_dropin(t, &handlers, all, &path, import.as_deref(), imports_created)?,
            None => false,
        }
    };
    record.handlers.retain(|h| !handlers.contains(&h.name));
    if changed {
        report.push(format!(
            "removed handlers {} from containerd's config",
            handlers.join(", ")
        ));
        if t.restart == Restart::Never {
            report.push("containerd not restarted (--no-restart)".into());
        } else {
            t.node.restart(&t.restart)?;
            Cri::connect(&t.host(&t.address), t.ready_timeout)?;
            report.push("restarted containerd".into());
        }
    }

    // Binaries last: containerd no longer names them.
    for l in record.links.iter().filter(|l| shims.contains(&l.shim)) {
        if files::remove_link_if_ours(&t.host(&l.path), &l.target)? {
            report.push(format!("removed {}", l.path.display()));
        }
    }
    record.links.retain(|l| !shims.contains(&l.shim));
    for f in record.files.iter().filter(|f| shims.contains(&f.shim)) {
        if files::remove_if_ours(&t.host(&f.path), &f.sha256)? {
            report.push(format!("removed {}", f.path.display()));
        } else if t.host(&f.path).exists() {
            report.push(format!(
                "kept {} (changed since it was installed)",
                f.path.display()
            ));
        }
    }
    record.files.retain(|f| !shims.contains(&f.shim));
    if record.handlers.is_empty() && record.files.is_empty() && record.links.is_empty() {
        if let Some(ConfigEdit::Main {
            backup: Some(b), ..
        }) = &record.edit
        {
            let _ = fs::remove_file(t.host(b));
        }
        Record::remove(&state)?;
        for d in [
            t.bin_dir.join("vm-guest"),
            t.bin_dir.clone(),
            t.state_dir.clone(),
        ] {
            // Only when empty: whatever else is there is not ours.
            let _ = fs::remove_dir(t.host(&d));
        }
    } else {
        record.save(&state)?;
    }
    Ok(report)
}

fn remove_from_main(
    t: &Target,
    handlers: &[String],
    all: bool,
    backup: Option<&Path>,
    after: &str,
    record: &mut Record,
) -> Result<bool, InstallError> {
    let path = t.host(&t.config);
    let current = read_optional(&path)?.unwrap_or_default();
    if all && files::sha256_bytes(current.as_bytes()) == after {
        // Untouched since the install: the original comes back byte for byte.
        match backup {
            Some(b) => {
                let text = fs::read(t.host(b)).map_err(|source| FileError::Io {
                    what: "reading",
                    path: t.host(b),
                    source,
                })?;
                files::write_bytes(&path, &text, 0o644)?;
            }
            None => fs::remove_file(&path).map_err(|source| FileError::Io {
                what: "removing",
                path: path.clone(),
                source,
            })?,
        }
        return Ok(true);
    }
    let (new, removed) =
        config::remove_handlers(&current, handlers).map_err(|source| InstallError::Config {
            path: t.config.clone(),
            source,
        })?;
    let Some(new) = new else {
        return Ok(false);
    };
    let _ = removed;
    replace_validated(t, &t.config, &new, &[])?;
    if let Some(ConfigEdit::Main { after, .. }) = &mut record.edit {
        *after = files::sha256_bytes(new.as_bytes());
    }
    Ok(true)
}

fn remove_from_dropin(
    t: &Target,
    handlers: &[String],
    all: bool,
    dropin: &Path,
    import: Option<&str>,
    imports_created: bool,
) -> Result<bool, InstallError> {
    let host = t.host(dropin);
    let Some(current) = read_optional(&host)? else {
        return Ok(false);
    };
    if all {
        if let Some(entry) = import {
            let main = read_optional(&t.host(&t.config))?.unwrap_or_default();
            let new = config::remove_import(&main, entry, imports_created).map_err(|source| {
                InstallError::Config {
                    path: t.config.clone(),
                    source,
                }
            })?;
            replace_validated(t, &t.config, &new, &[])?;
        }
        fs::remove_file(&host).map_err(|source| FileError::Io {
            what: "removing",
            path: host.clone(),
            source,
        })?;
        return Ok(true);
    }
    let (new, _) =
        config::remove_handlers(&current, handlers).map_err(|source| InstallError::Config {
            path: dropin.to_path_buf(),
            source,
        })?;
    match new {
        Some(new) => {
            files::write_bytes(&host, new.as_bytes(), 0o644)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// What is installed and whether it is intact and live.
pub fn status(t: &Target, probe: bool) -> Result<Report, InstallError> {
    let mut report = Report::new();
    let Some(record) = Record::load(&t.host(&t.state_dir))? else {
        report.push("nothing installed".into());
        return Ok(report);
    };
    report.push(format!(
        "installed by shim-installer {} into {}",
        record.installer,
        record.config.display()
    ));
    for f in &record.files {
        let version = release::shim(&f.shim)
            .filter(|s| f.path.ends_with(s.files[0]))
            .and_then(|_| t.node.shim_version(&f.path));
        if let Some(v) = version {
            report.push(format!("shim {}: {v}", f.shim));
        }
        let state = match files::sha256_file(&t.host(&f.path)) {
            Ok(sum) if sum == f.sha256 => "ok",
            Ok(_) => "CHANGED since install",
            Err(_) => "MISSING",
        };
        report.push(format!("file {} ({}): {state}", f.path.display(), f.shim));
    }
    for l in &record.links {
        let state = match fs::read_link(t.host(&l.path)) {
            Ok(target) if target == l.target => "ok".to_string(),
            Ok(target) => format!("CHANGED: points to {}", target.display()),
            Err(_) => "MISSING".into(),
        };
        report.push(format!("link {} ({}): {state}", l.path.display(), l.shim));
    }
    let dump = t.node.config_dump(&t.config).ok();
    let cri = Cri::connect(&t.host(&t.address), Duration::from_secs(5)).ok();
    let reported = cri
        .as_ref()
        .and_then(|c| c.reported_handlers().ok().flatten());
    for h in &record.handlers {
        let configured = dump
            .as_ref()
            .is_some_and(|d| node::dumped_handler(d, &h.name).is_some());
        let live = match (&cri, &reported) {
            (None, _) => "CRI not reachable".to_string(),
            (Some(_), Some(list)) if list.contains(&h.name) => "reported by CRI".into(),
            (Some(_), Some(_)) => "NOT reported by CRI".into(),
            (Some(c), None) if probe => match c.probe(&h.name) {
                Ok(()) => "ran a probe pod".into(),
                Err(e) => format!("probe pod FAILED: {e}"),
            },
            (Some(_), None) => "not probed (--probe runs a pod)".into(),
        };
        report.push(format!(
            "handler {} ({}): {}, {live}",
            h.name,
            h.shim,
            if configured {
                "in containerd's config"
            } else {
                "NOT in containerd's config"
            },
        ));
    }
    Ok(report)
}

fn read_optional(path: &Path) -> Result<Option<String>, FileError> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(FileError::Io {
            what: "reading",
            path: path.to_path_buf(),
            source,
        }),
    }
}
