//! The VMM: one QEMU `microvm` per VM, tuned for boot time (no firmware, option ROMs, PIC or
//! PIT; the uncompressed kernel booted through PVH), with the agent on a virtio-serial port
//! bound to a host socket or on vsock ([`crate::channel`]), QMP to stop it, and virtiofs for
//! a shared directory.
//!
//! ```no_run
//! # fn main() -> shim_common::Result<()> {
//! use shim_vm::{image::GuestImage, vmm::{Vm, VmConfig}};
//! let image = GuestImage::beside_executable()?;
//! let vm = Vm::start(&VmConfig::new(&image, "/run/shim-vm/pod1"))?;
//! let agent = std::os::unix::net::UnixStream::connect(vm.agent_socket());
//! vm.shutdown(std::time::Duration::from_secs(5))?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use shim_common::{Context, Error, Result};

use crate::boot::{CLOCK_PARAM, SHARE_PARAM};
use crate::channel::{Address, Channel, CHANNEL_PARAM};
use crate::image::GuestImage;
use crate::process::Process;
use crate::virtiofsd::{Cache, Virtiofsd};
use crate::vsock::{self, VhostUserVsock};

/// QEMU's binary, looked up on `PATH` unless configured.
pub const QEMU: &str = "qemu-system-x86_64";
/// The agent's virtio-serial port name (`/sys/class/virtio-ports/*/name` in the guest).
pub const AGENT_PORT: &str = "agent";
/// How long QEMU may take to open its sockets.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How the guest's CPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's own translator: slower, works everywhere.
    Tcg,
}

/// What [`Accel::detect`] chose, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    /// The choice.
    pub accel: Accel,
    /// Why (for the log).
    pub reason: String,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

impl Accel {
    /// KVM where it can boot a guest, else TCG. `kvm_pvm` (KVM on a machine that is itself
    /// a VM without `vmx`/`svm`) offers `/dev/kvm` but never boots a stock kernel.
    pub fn detect() -> AccelChoice {
        let tcg = |reason: String| AccelChoice {
            accel: Accel::Tcg,
            reason,
        };
        if Path::new("/sys/module/kvm_pvm").exists() {
            return tcg(
                "/dev/kvm is kvm_pvm (/sys/module/kvm_pvm), which cannot boot a guest".into(),
            );
        }
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .unwrap_or_default();
        let has = |f: &str| flags.split_whitespace().any(|w| w == f);
        if !has("vmx") && !has("svm") {
            return tcg("the CPU has no vmx or svm flag (no hardware virtualisation)".into());
        }
        match fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            Ok(_) => AccelChoice {
                accel: Accel::Kvm,
                reason: "/dev/kvm opens and the CPU has hardware virtualisation".into(),
            },
            Err(e) => tcg(format!("/dev/kvm cannot be opened: {e}")),
        }
    }
}

/// Whether the kernel's vhost-vsock serves this VM (why, if so; why not, if not): it needs
/// KVM and `/dev/vhost-vsock`.
fn kernel_vsock(accel: Accel) -> std::result::Result<String, String> {
    if accel != Accel::Kvm {
        return Err(format!(
            "the VM runs under {accel}, and vhost-vsock needs KVM"
        ));
    }
    vsock::kernel_device()?;
    Ok(format!("KVM, and {} opens", vsock::KERNEL_DEVICE))
}

fn accel_arg(accel: Accel, tb_mib: Option<u32>) -> String {
    match (accel, tb_mib) {
        (Accel::Tcg, Some(mib)) => format!("tcg,tb-size={mib}"),
        (other, _) => other.to_string(),
    }
}

/// A directory served to the guest over virtiofs.
#[derive(Debug, Clone)]
pub struct Share {
    /// The host directory.
    pub dir: PathBuf,
    /// The virtiofs tag; the guest's [`crate::boot::setup`] mounts it at
    /// [`crate::boot::SHARED_DIR`].
    pub tag: String,
    /// The virtiofsd binary ([`crate::virtiofsd::locate`]).
    pub virtiofsd: PathBuf,
    /// virtiofsd's cache policy.
    pub cache: Cache,
}

/// The pod's network device ([`crate::network`]): a tap opened in the pod's namespace, and
/// the MAC of the interface the guest's virtio-net device stands in for.
#[derive(Debug, Clone)]
pub struct NetDevice {
    pub tap: Arc<OwnedFd>,
    pub mac: Vec<u8>,
}

/// The fd QEMU finds the tap at (`-netdev tap,fd=`).
const TAP_FD: RawFd = 3;

/// The agent's channel as the VMM sets it up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum VmChannel {
    /// A virtio-serial port behind QEMU's chardev socket.
    #[default]
    Serial,
    /// vsock: the kernel's vhost-vsock where it works (KVM and `/dev/vhost-vsock`), else
    /// `vhost_user` (`vhost-device-vsock`; `None`: not found, an error then).
    Vsock {
        /// The `vhost-device-vsock` binary ([`vsock::locate`]).
        vhost_user: Option<PathBuf>,
    },
}

impl VmChannel {
    /// The option's [`Channel`], with `vhost-device-vsock` where it is found.
    pub fn from_option(channel: Channel, vhost_vsock_path: &str) -> VmChannel {
        match channel {
            Channel::VirtioSerial => VmChannel::Serial,
            Channel::Vsock => VmChannel::Vsock {
                vhost_user: vsock::locate(vhost_vsock_path),
            },
        }
    }
}

/// One VM's configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// QEMU (a path, or a name on `PATH`).
    pub qemu: PathBuf,
    /// The uncompressed kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// Appended to the kernel command line.
    pub cmdline: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// The VM's own directory: its sockets, console log and QEMU's stderr. Paths must stay
    /// under the 107 bytes of a unix socket address.
    pub runtime_dir: PathBuf,
    /// A host directory for the guest, over virtiofs.
    pub share: Option<Share>,
    /// `None`: [`Accel::detect`].
    pub accel: Option<Accel>,
    /// TCG's translation cache in MiB (`None`: QEMU's default, up to 1 GiB). Its touched
    /// pages count in the VM's host memory: measured here, 32 MiB saves ~35 MiB of QEMU's
    /// PSS and costs ~0.3 s per `ctr run` (code translated again).
    pub tcg_tb_mib: Option<u32>,
    /// The agent's channel.
    pub channel: VmChannel,
    /// A pod network device.
    pub network: Option<NetDevice>,
}

impl VmConfig {
    /// Defaults: QEMU from `PATH`, 1 vCPU, 512 MiB, no share, detected acceleration.
    pub fn new(image: &GuestImage, runtime_dir: impl Into<PathBuf>) -> VmConfig {
        VmConfig {
            qemu: PathBuf::from(QEMU),
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            cmdline: String::new(),
            vcpus: 1,
            memory_mib: 512,
            runtime_dir: runtime_dir.into(),
            share: None,
            accel: None,
            tcg_tb_mib: None,
            channel: VmChannel::Serial,
            network: None,
        }
    }
}

/// A running VM. Dropping it kills QEMU (and virtiofsd) and removes its sockets.
#[derive(Debug)]
pub struct Vm {
    qemu: Process,
    virtiofsd: Option<Virtiofsd>,
    vsock: Option<VhostUserVsock>,
    agent: PathBuf,
    address: Address,
    qmp: PathBuf,
    console: PathBuf,
    stderr: PathBuf,
    accel: AccelChoice,
    /// The kernel and initramfs QEMU loaded.
    boot_files: [PathBuf; 2],
}

/// The host's TSC frequency in kHz, for the guest's `tsc_early_khz`: without it the guest
/// calibrates against a timer TCG emulates slowly, and 2 boots in 20 hung here.
pub fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse::<f64>()
        .ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

/// The (address, length) of each mapping of one of `files` in a `/proc/PID/maps` text.
fn file_mappings(maps: &str, files: &[PathBuf]) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut f = line.splitn(6, ' ');
            let range = f.next()?;
            let path = f.nth(4)?.trim_start();
            if !files.iter().any(|p| p.as_os_str() == path) {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            let (a, b) = (
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            );
            Some((a, b.checked_sub(a)?))
        })
        .collect()
}

/// QEMU's option syntax doubles commas inside a value.
fn opt_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

fn missing_image(p: &Path) -> Error {
    Error::FailedPrecondition(format!(
        "guest image file {} not found: run `make guest` to build the VM image",
        p.display()
    ))
}

impl Vm {
    /// Starts QEMU (and virtiofsd for a share) and returns once the agent's socket exists;
    /// the guest is still booting then. A QEMU that dies first is an error carrying its
    /// stderr and the console's tail.
    pub fn start(config: &VmConfig) -> Result<Vm> {
        for f in [&config.kernel, &config.initrd] {
            if !f.is_file() {
                return Err(missing_image(f));
            }
        }
        let qemu = shim_common::executable::resolve("qemu", &config.qemu.to_string_lossy())
            .map_err(|_| {
                Error::FailedPrecondition(format!(
                    "QEMU binary {} not found: install the Debian package qemu-system-x86 (`make deps`)",
                    config.qemu.display()
                ))
            })?;
        let dir = &config.runtime_dir;
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let agent = dir.join("agent.sock");
        let qmp = dir.join("qmp.sock");
        let fs_sock = dir.join("virtiofs.sock");
        let vsock_sock = dir.join("vsock.sock");
        if fs_sock.as_os_str().len() > 107 {
            return Err(Error::InvalidArgument(format!(
                "runtime directory {} is too long for unix socket paths",
                dir.display()
            )));
        }
        for s in [&agent, &qmp, &fs_sock, &vsock_sock] {
            let _ = fs::remove_file(s);
        }
        let console = dir.join("console.log");
        let stderr = dir.join("qemu.log");
        let accel = match config.accel {
            Some(a) => AccelChoice {
                accel: a,
                reason: "configured".into(),
            },
            None => Accel::detect(),
        };
        log::info!(
            "vm {}: accel {} ({})",
            dir.display(),
            accel.accel,
            accel.reason
        );

        // The agent's channel: what QEMU gets, how the host dials, what serves it beside.
        let mut vsock_device = None;
        let mut channel_args: Vec<String> = Vec::new();
        let address = match &config.channel {
            VmChannel::Serial => {
                channel_args.extend([
                    "-device".into(),
                    "virtio-serial-device".into(),
                    "-chardev".into(),
                    format!(
                        "socket,id=agent,path={},server=on,wait=off",
                        opt_path(&agent)
                    ),
                    "-device".into(),
                    format!("virtserialport,chardev=agent,name={AGENT_PORT}"),
                ]);
                Address::Serial(agent.clone())
            }
            VmChannel::Vsock { vhost_user } => match kernel_vsock(accel.accel) {
                Ok(why) => {
                    let cid = vsock::kernel_guest_cid(dir);
                    log::info!(
                        "vm {}: vsock through the kernel's vhost-vsock ({why}), guest CID {cid}",
                        dir.display()
                    );
                    channel_args.extend([
                        "-device".into(),
                        format!("vhost-vsock-device,guest-cid={cid}"),
                    ]);
                    Address::Vsock {
                        cid,
                        port: vsock::AGENT_PORT,
                    }
                }
                Err(why) => {
                    let binary = vhost_user
                        .as_deref()
                        .ok_or_else(|| vsock::missing_binary(None))?;
                    log::info!(
                        "vm {}: vsock through {} (no kernel vhost-vsock: {why})",
                        dir.display(),
                        binary.display()
                    );
                    let device =
                        VhostUserVsock::start(binary, &vsock_sock, &agent, vsock::USER_GUEST_CID)?;
                    channel_args.extend([
                        "-chardev".into(),
                        format!("socket,id=vsock,path={}", opt_path(&vsock_sock)),
                        "-device".into(),
                        "vhost-user-vsock-device,chardev=vsock".into(),
                    ]);
                    vsock_device = Some(device);
                    Address::HybridVsock {
                        uds: agent.clone(),
                        port: vsock::AGENT_PORT,
                        console: console.clone(),
                    }
                }
            },
        };
        let vhost_user = config.share.is_some() || vsock_device.is_some();

        let virtiofsd = match &config.share {
            Some(s) => Some(Virtiofsd::start(&s.virtiofsd, &fs_sock, &s.dir, s.cache)?),
            None => None,
        };

        let mut append =
            String::from("console=ttyS0 quiet cryptomgr.notests panic=-1 rdinit=/init");
        // Only under TCG, whose guest TSC runs at the host's rate; KVM guests have kvmclock,
        // and "cpu MHz" on a host that scales its frequency is not its TSC's.
        if let (Accel::Tcg, Some(khz)) = (accel.accel, host_tsc_khz()) {
            append.push_str(&format!(" tsc_early_khz={khz}"));
        }
        if let Ok(now) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
            append.push_str(&format!(" {CLOCK_PARAM}={}", now.as_secs()));
        }
        if let Some(s) = &config.share {
            append.push_str(&format!(" {SHARE_PARAM}={}", s.tag));
        }
        if config.channel != VmChannel::Serial {
            append.push_str(&format!(" {CHANNEL_PARAM}={}", Channel::Vsock));
        }
        if !config.cmdline.is_empty() {
            append.push(' ');
            append.push_str(&config.cmdline);
        }

        let mem = config.memory_mib;
        let mut machine =
            String::from("microvm,x-option-roms=off,isa-serial=on,rtc=on,pic=off,pit=off,acpi=on");
        let mut cmd = Command::new(&qemu);
        if vhost_user {
            // vhost-user needs guest memory the backend can map.
            machine.push_str(",memory-backend=mem");
            cmd.arg("-object")
                .arg(format!("memory-backend-memfd,id=mem,size={mem}M,share=on"));
        }
        cmd.args(["-M", &machine])
            .args(["-accel", &accel_arg(accel.accel, config.tcg_tb_mib)])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args(["-smp", &config.vcpus.to_string(), "-m", &format!("{mem}M")])
            .arg("-kernel")
            .arg(&config.kernel)
            .arg("-initrd")
            .arg(&config.initrd)
            .args(["-append", &append])
            .arg("-chardev")
            .arg(format!("file,id=console,path={}", opt_path(&console)))
            .args(["-serial", "chardev:console"])
            .args(&channel_args)
            // Free page reporting: the guest hands back what it freed (the initramfs it
            // unpacked, boot-time allocations, a container's memory after it exits), and
            // QEMU discards those pages, so the host's memory follows the guest's use.
            .args(["-device", "virtio-balloon-device,free-page-reporting=on"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", opt_path(&qmp)));
        if let Some(s) = &config.share {
            cmd.arg("-chardev")
                .arg(format!("socket,id=fs,path={}", opt_path(&fs_sock)))
                .arg("-device")
                .arg(format!("vhost-user-fs-device,chardev=fs,tag={}", s.tag));
        }
        if let Some(net) = &config.network {
            // vhost-net moves the frames in the host kernel; it needs KVM's ioeventfds.
            let vhost = accel.accel == Accel::Kvm && Path::new("/dev/vhost-net").exists();
            let mac = crate::network::mac_text(&net.mac);
            cmd.arg("-netdev")
                .arg(format!(
                    "tap,id=pod,fd={TAP_FD},vhost={}",
                    if vhost { "on" } else { "off" }
                ))
                .arg("-device")
                .arg(format!("virtio-net-device,netdev=pod,mac={mac}"));
            let tap = net.tap.as_raw_fd();
            // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl) on
            // fds this process owns; the tap's file outlives the spawn.
            unsafe {
                cmd.pre_exec(move || {
                    if tap == TAP_FD {
                        let flags = libc::fcntl(tap, libc::F_GETFD);
                        if flags < 0
                            || libc::fcntl(tap, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                    } else if libc::dup2(tap, TAP_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let err_file =
            fs::File::create(&stderr).with_context(|| format!("create {}", stderr.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err_file);
        let process =
            Process::spawn(&mut cmd, QEMU).with_context(|| format!("start {}", qemu.display()))?;
        let mut vm = Vm {
            qemu: process,
            virtiofsd,
            vsock: vsock_device,
            agent,
            address,
            qmp,
            console,
            stderr,
            accel,
            boot_files: [config.kernel.clone(), config.initrd.clone()],
        };
        let deadline = Instant::now() + START_TIMEOUT;
        // vhost-device-vsock's socket for the host is there before QEMU; a serial port's
        // socket once QEMU made it; the kernel's vsock has none.
        let agent_socket = !matches!(vm.address, Address::Vsock { .. });
        while !((vm.agent.exists() || !agent_socket) && vm.qmp.exists()) {
            let died = vm.qemu.wait_timeout(Duration::from_millis(5))?;
            if died || Instant::now() >= deadline {
                let what = if died {
                    "exited"
                } else {
                    "did not open its sockets in time"
                };
                return Err(Error::Runtime(format!("QEMU {what}: {}", vm.diagnostics())));
            }
        }
        Ok(vm)
    }

    /// The host's unix socket of the agent's channel: the virtio-serial port (connect to it,
    /// one client at a time), or `vhost-device-vsock`'s (connect, then `CONNECT <port>`).
    pub fn agent_socket(&self) -> &Path {
        &self.agent
    }

    /// How the host dials the agent.
    pub fn agent_address(&self) -> &Address {
        &self.address
    }

    /// `vhost-device-vsock`'s pid, for a vsock channel through it.
    pub fn vsock_pid(&self) -> Option<u32> {
        self.vsock.as_ref().map(VhostUserVsock::pid)
    }

    /// SIGKILLs QEMU through its pidfd (never a reused pid) without waiting: whoever
    /// reaps it reports the exit.
    pub fn kill_vmm(&self) {
        if let Err(e) = self.qemu.signal(libc::SIGKILL) {
            log::warn!("{e}");
        }
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.qemu.pid()
    }

    /// virtiofsd's pid, when there is a share.
    pub fn virtiofsd_pid(&self) -> Option<u32> {
        self.virtiofsd.as_ref().map(Virtiofsd::pid)
    }

    /// Reclaims QEMU's own copies of the kernel and initramfs, once the guest booted from
    /// them: QEMU keeps both files mapped to load them again at a reset, which
    /// `-no-reboot` turns into an exit, and they are a quarter of its memory (68 of 262 MB
    /// here). Read again from the files should anything touch them. The bytes reclaimed.
    pub fn page_out_boot_files(&self) -> Result<usize> {
        let files: Vec<PathBuf> = self
            .boot_files
            .iter()
            .filter_map(|f| fs::canonicalize(f).ok())
            .collect();
        let maps_path = format!("/proc/{}/maps", self.qemu.pid());
        let maps = fs::read_to_string(&maps_path).with_context(|| format!("read {maps_path}"))?;
        let ranges = file_mappings(&maps, &files);
        self.qemu.page_out(&ranges).map_err(|e| Error::Io {
            context: "process_madvise(MADV_PAGEOUT) QEMU's kernel and initramfs".into(),
            source: e,
        })
    }

    /// The acceleration in use, and why.
    pub fn accel(&self) -> &AccelChoice {
        &self.accel
    }

    /// The serial console's log (guest kernel and agent output).
    pub fn console_log(&self) -> &Path {
        &self.console
    }

    /// The last `max` bytes of the console log.
    pub fn console_tail(&self, max: u64) -> String {
        tail(&self.console, max)
    }

    /// QEMU's stderr and the console's tail, for an error message.
    pub fn diagnostics(&self) -> String {
        let err = tail(&self.stderr, 2048);
        let con = tail(&self.console, 2048);
        format!(
            "qemu stderr: {}; console: {}",
            if err.trim().is_empty() {
                "(empty)"
            } else {
                err.trim()
            },
            if con.trim().is_empty() {
                "(empty)"
            } else {
                con.trim()
            }
        )
    }

    /// Whether QEMU has exited (the guest powered off or panicked).
    pub fn has_exited(&mut self) -> bool {
        self.qemu.has_exited()
    }

    /// Waits up to `timeout` for QEMU to exit by itself (a guest poweroff).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<bool> {
        self.qemu.wait_timeout(timeout)
    }

    /// Asks QEMU to quit over QMP and waits up to `timeout`; kills it if it is still there.
    pub fn shutdown(mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let asked = if self.qemu.has_exited() {
            Ok(())
        } else {
            qmp_quit(&self.qmp, timeout)
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if !self.qemu.wait_timeout(left)? {
            log::warn!("QEMU did not quit within {timeout:?}: killing it");
            self.qemu.kill()?;
        }
        self.cleanup();
        if let Err(e) = asked {
            log::warn!("QMP quit: {e}");
        }
        Ok(())
    }

    /// SIGKILL, then cleanup.
    pub fn kill(mut self) -> Result<()> {
        self.qemu.kill()?;
        self.cleanup();
        Ok(())
    }

    fn cleanup(&mut self) {
        if let Some(v) = self.virtiofsd.take() {
            let _ = v.stop(Duration::from_secs(1));
        }
        // Serves QEMU after QEMU after QEMU: it never exits by itself.
        self.vsock.take();
        for s in [&self.agent, &self.qmp] {
            let _ = fs::remove_file(s);
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        self.cleanup();
    }
}

fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// `qmp_capabilities`, then `quit`.
fn qmp_quit(socket: &Path, timeout: Duration) -> Result<()> {
    let what = || format!("QMP {}", socket.display());
    let stream = UnixStream::connect(socket).with_context(what)?;
    stream.set_read_timeout(Some(timeout)).with_context(what)?;
    let mut writer = stream.try_clone().with_context(what)?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    // The greeting, then one answer per command (events may come in between).
    let mut expect_return = |reader: &mut BufReader<UnixStream>, greeting: bool| -> Result<()> {
        loop {
            line.clear();
            if reader.read_line(&mut line).with_context(what)? == 0 {
                return Err(Error::Unavailable(format!("{}: closed", what())));
            }
            if (greeting && line.contains("\"QMP\"")) || line.contains("\"return\"") {
                return Ok(());
            }
            if line.contains("\"error\"") {
                return Err(Error::Runtime(format!("{}: {}", what(), line.trim())));
            }
        }
    };
    expect_return(&mut reader, true)?;
    writer
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .with_context(what)?;
    expect_return(&mut reader, false)?;
    writer
        .write_all(b"{\"execute\":\"quit\"}\n")
        .with_context(what)?;
    // QEMU may close before answering; either way it is on its way out.
    let _ = expect_return(&mut reader, false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_boot_files_mappings_are_picked() {
        let maps = "\
55ee0328d000-55ee03694000 r--p 00000000 fe:01 1 /usr/bin/qemu-system-x86_64
7fb490a00000-7fb493cc7000 r--p 00000000 fe:01 2                          /img/vmlinux
7fb493e00000-7fb4a3e00000 rw-s 00000000 00:01 3                          /memfd:mem (deleted)
7fb4ea000000-7fb4eb22a000 r--p 00000000 fe:01 4                          /img/initramfs.cpio
7fb4eb22a000-7fb4eb22b000 rw-p 00000000 00:00 0 ";
        let files = [PathBuf::from("/img/vmlinux"), "/img/initramfs.cpio".into()];
        assert_eq!(
            file_mappings(maps, &files),
            vec![
                (0x7fb490a00000, 0x7fb493cc7000 - 0x7fb490a00000),
                (0x7fb4ea000000, 0x7fb4eb22a000 - 0x7fb4ea000000)
            ]
        );
    }

    #[test]
    fn tcg_takes_the_translation_cache_size_and_kvm_ignores_it() {
        assert_eq!(accel_arg(Accel::Tcg, Some(32)), "tcg,tb-size=32");
        assert_eq!(accel_arg(Accel::Tcg, None), "tcg");
        assert_eq!(accel_arg(Accel::Kvm, Some(32)), "kvm");
    }

    #[test]
    fn this_machine_uses_tcg_because_of_kvm_pvm() {
        let choice = Accel::detect();
        if Path::new("/sys/module/kvm_pvm").exists() {
            assert_eq!(choice.accel, Accel::Tcg);
            assert!(choice.reason.contains("kvm_pvm"), "{}", choice.reason);
        }
        assert!(!choice.reason.is_empty());
    }

    #[test]
    fn a_missing_kernel_names_the_path_and_make_guest() {
        let dir = tempfile::tempdir().unwrap();
        let image = GuestImage {
            kernel: dir.path().join("vmlinux"),
            initrd: dir.path().join("initramfs.cpio"),
        };
        let e = Vm::start(&VmConfig::new(&image, dir.path().join("vm")))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&image.kernel.display().to_string()), "{e}");
        assert!(e.contains("make guest"), "{e}");
    }

    #[test]
    fn a_missing_qemu_names_the_binary_and_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let image = GuestImage {
            kernel: dir.path().join("vmlinux"),
            initrd: dir.path().join("initramfs.cpio"),
        };
        std::fs::write(&image.kernel, b"").unwrap();
        std::fs::write(&image.initrd, b"").unwrap();
        let mut config = VmConfig::new(&image, dir.path().join("vm"));
        config.qemu = "/nonexistent/qemu-system-x86_64".into();
        let e = Vm::start(&config).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/qemu-system-x86_64"), "{e}");
        assert!(e.contains("qemu-system-x86"), "{e}");
    }

    #[test]
    fn commas_in_paths_are_doubled() {
        assert_eq!(opt_path(Path::new("/a,b/c")), "/a,,b/c");
    }
}
