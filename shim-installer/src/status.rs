//! `status`: what is installed, whether it is intact, and whether containerd runs it.

use std::fs;
use std::time::Duration;

use crate::cri::Cri;
use crate::error::InstallError;
use crate::files;
use crate::node;
use crate::record::Record;
use crate::release;
use crate::target::{Report, Target};

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
