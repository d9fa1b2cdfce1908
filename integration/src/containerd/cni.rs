//! The CNI bridge network of a private containerd with CRI, and its removal.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use super::config::CRI_PLUGIN;
use super::{DIR_PREFIX, SYSTEM_PATH};
use crate::error::{Error, IoContext};

/// Where Debian's `containernetworking-plugins` installs the CNI plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// The CNI plugins the pod network uses.
pub(super) const CNI_PLUGINS: &[&str] = &["bridge", "host-local", "loopback"];

/// Subnet of every harness pod network. Each containerd gets its own bridge and the
/// host keeps no address on it (no gateway), so parallel instances reuse the same range
/// without a routing clash, and nothing else on the machine uses 10.231.0.0/24.
pub const POD_SUBNET: &str = "10.231.0.0/24";

/// libcni's default cache of ADD results (`<network>-<container>-<ifname>`); containerd
/// 1.6 does not move it, so teardown removes our entries by name.
const CNI_RESULTS_DIR: &str = "/var/lib/cni/results";

/// The CNI network and bridge names of the containerd in `dir`, derived from the
/// directory's random suffix: unique among live instances, and recomputable by the sweep
/// of a dead test's directory without any record. Bridge names must fit IFNAMSIZ (15).
pub(super) fn cni_names(dir: &Path) -> (String, String) {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let suffix: String = name
        .strip_prefix(DIR_PREFIX)
        .unwrap_or(&name)
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let suffix = &suffix[suffix.len().saturating_sub(8)..];
    (format!("shimtest-{suffix}"), format!("shimbr{suffix}"))
}

/// Writes `<dir>/cni/net.d/10-shimtest.conflist`: a bridge of this instance's own with
/// host-local IPAM (leases kept in `<dir>/cni/ipam`), then loopback, which brings `lo` up
/// and passes the bridge's result through. No gateway and no masquerading: the host gets
/// no address on the bridge, IP forwarding stays as it is, no iptables rule is written.
pub(super) fn write_cni_config(dir: &Path) -> Result<(), Error> {
    let (network, bridge) = cni_names(dir);
    let net_d = dir.join("cni").join("net.d");
    fs::create_dir_all(&net_d).ctx_path("creating", &net_d)?;
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": network,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": false,
                "ipMasq": false,
                "hairpinMode": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": POD_SUBNET }]],
                    "dataDir": dir.join("cni").join("ipam"),
                },
            },
            { "type": "loopback" },
        ],
    });
    let path = net_d.join("10-shimtest.conflist");
    let text = serde_json::to_string_pretty(&conf).map_err(|source| Error::Json {
        what: "CNI config",
        source,
    })?;
    fs::write(&path, text).ctx_path("writing", &path)
}

/// Removes what CNI leaves outside `dir` when pods were not torn down through CRI: the
/// bridge (the pods' veths went with their network namespaces) and cached ADD results.
pub(super) fn cleanup_cni(dir: &Path) {
    let (network, bridge) = cni_names(dir);
    if Path::new("/sys/class/net").join(&bridge).exists() {
        let out = Command::new("ip")
            .args(["link", "delete", &bridge])
            .env("PATH", SYSTEM_PATH)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "integration: ip link delete {bridge}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("integration: running ip link delete {bridge}: {e}"),
        }
    }
    // Results are `<network>-<container id>-<ifname>`; the loopback network CRI adds is
    // shared by name, so only the entries of this instance's sandboxes go.
    let sandboxes: Vec<String> = fs::read_dir(dir.join("root").join(CRI_PLUGIN).join("sandboxes"))
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    let Ok(rd) = fs::read_dir(CNI_RESULTS_DIR) else {
        return;
    };
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with(&format!("{network}-"))
            || sandboxes.iter().any(|id| name.contains(id.as_str()));
        if ours {
            let _ = fs::remove_file(e.path());
        }
    }
}
