//! The VM shim's runtime options: a CRI runtime handler's `options` TOML, and pod
//! annotations for what a pod may choose itself.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use shim_common::options::{self, RuntimeOptions, Toml};
use shim_common::{Context, Error, Result};

use crate::channel::Channel;
use crate::image::{self, GuestImage};

/// Annotation: guest memory in MiB, beyond [`VmOptions::overhead_mib`].
pub const MEMORY_ANNOTATION: &str = "io.containerd.vm.memory_mib";
/// Annotation: guest vCPUs.
pub const VCPUS_ANNOTATION: &str = "io.containerd.vm.vcpus";
/// containerd's CRI (1.6.7 and later) on a pod's sandbox: the memory limits of the pod's
/// containers, summed by the kubelet (bytes; `0`: none).
pub const CRI_MEMORY_ANNOTATION: &str = "io.kubernetes.cri.sandbox-memory";
/// containerd's CRI on a pod's sandbox: the pod's CPU limit as a CFS quota and period.
pub const CRI_CPU_QUOTA_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// See [`CRI_CPU_QUOTA_ANNOTATION`].
pub const CRI_CPU_PERIOD_ANNOTATION: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// How a VM is made. Every field has a working default; paths default to what `make`
/// installs next to the shim binary.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct VmOptions {
    /// The QEMU binary (`QemuPath`); default `qemu-system-x86_64` on `PATH`.
    pub qemu_path: String,
    /// The guest kernel (`KernelPath`); default `vm-guest/vmlinux` beside the shim.
    pub kernel_path: String,
    /// The guest initramfs (`InitrdPath`); default `vm-guest/initramfs.cpio` beside the
    /// shim.
    pub initrd_path: String,
    /// `virtiofsd` (`VirtiofsdPath`); default beside the shim, then `PATH`.
    pub virtiofsd_path: String,
    /// vCPUs (`Vcpus`), unless the pod's annotation says otherwise.
    pub vcpus: u32,
    /// Guest memory for the containers, MiB (`MemoryMib`), unless the pod's annotation or
    /// the containers' limits say more.
    pub memory_mib: u32,
    /// Guest memory for the kernel and agent, MiB (`OverheadMib`), added to the above.
    pub overhead_mib: u32,
    /// How long the agent may take to answer after QEMU started, ms (`DialTimeoutMs`).
    pub dial_timeout_ms: u32,
    /// The OCI runtime inside the guest (`GuestRuntime`): `crun` (default) or `runc`.
    pub guest_runtime: String,
    /// Use TCG even where KVM works (`ForceTcg`).
    pub force_tcg: bool,
    /// TCG's translation cache, MiB (`TcgTbMib`); 0: QEMU's default. Smaller trades host
    /// memory per VM for time (see [`crate::vmm::VmConfig::tcg_tb_mib`]).
    pub tcg_tb_mib: u32,
    /// The agent's channel (`Channel`): `"virtio-serial"` (default) or `"vsock"`
    /// ([`crate::channel`]).
    pub channel: Channel,
    /// `vhost-device-vsock` (`VhostVsockPath`), for `Channel = "vsock"` on a host without
    /// KVM and `/dev/vhost-vsock`; default beside the shim, then `PATH`.
    pub vhost_vsock_path: String,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            qemu_path: String::new(),
            kernel_path: String::new(),
            initrd_path: String::new(),
            virtiofsd_path: String::new(),
            vcpus: 1,
            memory_mib: 128,
            overhead_mib: 128,
            dial_timeout_ms: 20_000,
            guest_runtime: "crun".into(),
            force_tcg: false,
            tcg_tb_mib: 0,
            channel: Channel::default(),
            vhost_vsock_path: String::new(),
        }
    }
}

impl RuntimeOptions for VmOptions {
    const TYPE_URL: Option<&'static str> = Some("shim.vm.v1.Options");

    fn set(&mut self, key: &str, value: &Toml) -> std::result::Result<bool, String> {
        match key {
            "qemupath" => self.qemu_path = options::string(value)?,
            "kernelpath" => self.kernel_path = options::string(value)?,
            "initrdpath" => self.initrd_path = options::string(value)?,
            "virtiofsdpath" => self.virtiofsd_path = options::string(value)?,
            "vcpus" => self.vcpus = positive(options::uint32(value)?)?,
            "memorymib" => self.memory_mib = positive(options::uint32(value)?)?,
            "overheadmib" => self.overhead_mib = options::uint32(value)?,
            "dialtimeoutms" => self.dial_timeout_ms = positive(options::uint32(value)?)?,
            "guestruntime" => {
                let r = options::string(value)?;
                if r != "crun" && r != "runc" {
                    return Err(format!("{r:?}: the guest has crun and runc"));
                }
                self.guest_runtime = r;
            }
            "forcetcg" => self.force_tcg = options::boolean(value)?,
            "tcgtbmib" => self.tcg_tb_mib = options::uint32(value)?,
            "channel" => self.channel = Channel::parse(&options::string(value)?)?,
            "vhostvsockpath" => self.vhost_vsock_path = options::string(value)?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

fn positive(v: u32) -> std::result::Result<u32, String> {
    if v == 0 {
        return Err("must be more than 0".into());
    }
    Ok(v)
}

/// The host's memory in MiB (`MemTotal`): no VM can have more.
fn host_memory_mib() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("read /proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb >> 10)
        .ok_or_else(|| Error::Runtime("no MemTotal in /proc/meminfo".into()))
}

/// The VM's size: vCPUs and MiB of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u32,
}

impl VmOptions {
    /// The VM's size for a first container whose spec has `annotations` and a memory
    /// limit of `limit` bytes (if any). Memory: our annotation, else the largest of the
    /// configured memory, the limit and the pod's (CRI's sandbox annotation), plus the
    /// overhead. vCPUs: our annotation, else the configured ones or the pod's CPU limit
    /// rounded up, whichever is more (at most the host's CPUs).
    pub fn size(&self, annotations: &HashMap<String, String>, limit: Option<u64>) -> Result<Size> {
        let number = |key: &str| -> Result<Option<u32>> {
            annotations
                .get(key)
                .map(|v| {
                    v.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "annotation {key}={v:?}: want a positive number"
                        ))
                    })
                })
                .transpose()
        };
        // containerd sets these itself: one it could not have meant is ignored.
        let cri = |key: &str| {
            annotations
                .get(key)
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|n| *n > 0)
        };
        let mib = |bytes: u64| u32::try_from(bytes.div_ceil(1 << 20)).unwrap_or(u32::MAX);
        let vcpus = match number(VCPUS_ANNOTATION)? {
            Some(n) => n,
            None => {
                let pod = match (
                    cri(CRI_CPU_QUOTA_ANNOTATION),
                    cri(CRI_CPU_PERIOD_ANNOTATION),
                ) {
                    (Some(quota), Some(period)) => quota.div_ceil(period),
                    _ => 0,
                };
                let host = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
                self.vcpus.max(u32::try_from(pod.min(host)).unwrap_or(1))
            }
        };
        let memory = match number(MEMORY_ANNOTATION)? {
            Some(n) => n,
            None => [limit, cri(CRI_MEMORY_ANNOTATION)]
                .into_iter()
                .flatten()
                .map(mib)
                .fold(self.memory_mib, u32::max),
        };
        let size = Size {
            vcpus,
            memory_mib: memory.saturating_add(self.overhead_mib),
        };
        let host = host_memory_mib()?;
        if u64::from(size.memory_mib) > host {
            return Err(Error::FailedPrecondition(format!(
                "the VM would need {} MiB of memory (the pod's, plus {} MiB overhead); \
                 this host has {host} MiB",
                size.memory_mib, self.overhead_mib
            )));
        }
        Ok(size)
    }

    /// The guest image: the files the options name, else the ones installed beside the
    /// shim; both must be there.
    pub fn image(&self) -> Result<GuestImage> {
        let dir = image::installed_dir()?;
        let pick = |set: &str, default: &str| match set {
            "" => dir.join(default),
            path => PathBuf::from(path),
        };
        GuestImage {
            kernel: pick(&self.kernel_path, image::KERNEL_FILE),
            initrd: pick(&self.initrd_path, image::INITRD_FILE),
        }
        .checked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vm_is_sized_from_annotations_limits_and_overhead() {
        let o = VmOptions::default();
        let none = HashMap::new();
        assert_eq!(
            o.size(&none, None).unwrap(),
            Size {
                vcpus: 1,
                memory_mib: 256
            }
        );
        let a = HashMap::from([
            (MEMORY_ANNOTATION.to_string(), "512".to_string()),
            (VCPUS_ANNOTATION.to_string(), "2".to_string()),
        ]);
        assert_eq!(
            o.size(&a, None).unwrap(),
            Size {
                vcpus: 2,
                memory_mib: 640
            }
        );
        assert_eq!(o.size(&none, Some(1 << 30)).unwrap().memory_mib, 1024 + 128);
        // A pod's resources through CRI: its memory and its CPU limit rounded up.
        let pod = HashMap::from([
            (
                CRI_MEMORY_ANNOTATION.to_string(),
                (300u64 << 20).to_string(),
            ),
            (CRI_CPU_QUOTA_ANNOTATION.to_string(), "150000".to_string()),
            (CRI_CPU_PERIOD_ANNOTATION.to_string(), "100000".to_string()),
        ]);
        let host = std::thread::available_parallelism().unwrap().get() as u32;
        assert_eq!(
            o.size(&pod, None).unwrap(),
            Size {
                vcpus: 2.min(host),
                memory_mib: 300 + 128
            }
        );
        let none_set = HashMap::from([
            (CRI_MEMORY_ANNOTATION.to_string(), "0".to_string()),
            (CRI_CPU_QUOTA_ANNOTATION.to_string(), "-1".to_string()),
        ]);
        assert_eq!(
            o.size(&none_set, None).unwrap(),
            o.size(&none, None).unwrap()
        );
        let bad = HashMap::from([(VCPUS_ANNOTATION.to_string(), "zero".to_string())]);
        let e = o.size(&bad, None).unwrap_err().to_string();
        assert!(e.contains(VCPUS_ANNOTATION), "{e}");
        // More memory than the host has: refused, saying how much.
        let huge = HashMap::from([(CRI_MEMORY_ANNOTATION.to_string(), (1u64 << 50).to_string())]);
        let e = o.size(&huge, None).unwrap_err().to_string();
        assert!(
            e.contains("MiB of memory") && e.contains("this host has"),
            "{e}"
        );
    }

    #[test]
    fn cri_toml_keys_are_read_and_bad_values_refused() {
        let mut o = VmOptions::default();
        assert!(o.set("memorymib", &Toml::Integer(300)).unwrap());
        assert_eq!(o.memory_mib, 300);
        assert!(o.set("vcpus", &Toml::Integer(0)).is_err());
        assert!(o
            .set("guestruntime", &Toml::String("youki".into()))
            .is_err());
        assert!(o.set("tcgtbmib", &Toml::Integer(32)).unwrap());
        assert_eq!(o.tcg_tb_mib, 32);
        assert_eq!(o.channel, Channel::VirtioSerial);
        assert!(o.set("channel", &Toml::String("vsock".into())).unwrap());
        assert_eq!(o.channel, Channel::Vsock);
        let e = o.set("channel", &Toml::String("tcp".into())).unwrap_err();
        assert!(e.contains("vsock"), "{e}");
        assert!(!o.set("nosuchkey", &Toml::Boolean(true)).unwrap());
    }
}
