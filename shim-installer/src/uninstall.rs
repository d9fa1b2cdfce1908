//! `uninstall`: refused while pods use the handlers; then the handlers leave containerd's
//! config (a config nobody changed since goes back to its original bytes), containerd
//! restarts, and the links and files go that are still as they were installed.

use std::fs;
use std::path::Path;

use crate::config;
use crate::cri::Cri;
use crate::error::InstallError;
use crate::files::{self, FileError};
use crate::node::Restart;
use crate::record::{ConfigEdit, Record};
use crate::target::{read_optional, replace_validated, Report, Selection, Target};

pub fn uninstall(t: &Target, sel: &Selection, force: bool) -> Result<Report, InstallError> {
    let mut report = Report::new();
    if t.restart == Restart::Service && !t.node.service_manages_containerd() {
        return Err(InstallError::NoRestart);
    }
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
            None => files::remove(&path)?,
        }
        return Ok(true);
    }
    let (new, _) =
        config::remove_handlers(&current, handlers).map_err(InstallError::config(&t.config))?;
    let Some(new) = new else {
        return Ok(false);
    };
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
            let new = config::remove_import(&main, entry, imports_created)
                .map_err(InstallError::config(&t.config))?;
            replace_validated(t, &t.config, &new, &[])?;
        }
        files::remove(&host)?;
        return Ok(true);
    }
    let (new, _) =
        config::remove_handlers(&current, handlers).map_err(InstallError::config(dropin))?;
    match new {
        Some(new) => {
            files::write_bytes(&host, new.as_bytes(), 0o644)?;
            Ok(true)
        }
        None => Ok(false),
    }
}
