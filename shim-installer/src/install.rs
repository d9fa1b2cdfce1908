//! `install`: the steps in the order that keeps a node working at every point. Binaries go
//! in before any config names them; a config change is validated by the node's own
//! containerd before it replaces the old one; containerd restarts only when its config
//! changed; handlers are checked live.

use std::fs;
use std::path::{Path, PathBuf};

use crate::config::{self, ConfigError, Handler};
use crate::cri::Cri;
use crate::error::InstallError;
use crate::files::{self, FileError, Outcome};
use crate::node::Restart;
use crate::record::{ConfigEdit, InstalledFile, InstalledHandler, InstalledLink, Record};
use crate::release::{self, Release, Shim};
use crate::target::{merged, read_optional, replace_validated, Report, Selection, Target};

/// Whether containerd serves CRI on this OS (not on FreeBSD): without it there are no
/// runtime handlers, only shims that `ctr run --runtime` names.
const CRI_HERE: bool = !cfg!(target_os = "freebsd");

/// Where the main config's first state is kept (containerd 1.x), in the state directory.
pub const BACKUP: &str = "config.toml.orig";

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
    for (key, value) in shim.settings {
        h.set(key, value)
            .map_err(InstallError::config(Path::new("--set")))?;
    }
    for (_, key, value) in sel.settings.iter().filter(|(hn, _, _)| *hn == name) {
        h.set(key, value)
            .map_err(InstallError::config(Path::new("--set")))?;
    }
    Ok(h)
}

pub fn install(t: &Target, release: &Release, sel: &Selection) -> Result<Report, InstallError> {
    let mut report = Report::new();
    let shims = sel.resolve(release)?;
    if CRI_HERE && t.restart == Restart::Service && !t.node.service_manages_containerd() {
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

    if !CRI_HERE {
        record.save(&t.host(&t.state_dir))?;
        report.push(format!(
            "containerd has no CRI on {}: no handler to add; run containers with `ctr run --runtime io.containerd.rs-<shim>.v2`",
            std::env::consts::OS
        ));
        return Ok(report);
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
    let added = config::add_handlers(&text, handlers).map_err(InstallError::config(&t.config))?;
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
    let schema = if main.trim().is_empty() {
        config::Schema::V3
    } else {
        config::schema(&main).map_err(InstallError::config(&t.config))?
    };
    // A handler of the same name in the main file would be merged with ours.
    if !main.trim().is_empty() {
        config::add_handlers(&main, handlers).map_err(InstallError::config(&t.config))?;
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
    let added = config::add_handlers(&base, handlers).map_err(InstallError::config(&dropin))?;
    let Some(new) = added.text else {
        return Ok(false);
    };
    files::write_bytes(&dropin_host, new.as_bytes(), 0o644)?;
    let restore = || -> Result<(), FileError> {
        match &before {
            Some(text) => files::write_bytes(&dropin_host, text.as_bytes(), 0o644),
            None => files::remove(&dropin_host),
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
        let (new_main, created) =
            config::add_import(&text, &entry).map_err(InstallError::config(&t.config))?;
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
