//! `shim-installer` on a "node": a private containerd 1.6.20 with CRI, whose config already
//! holds unrelated settings and runtimes (the harness's), restarted by the installer through
//! a restart command as a service manager would. Handlers are checked by running pods.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use integration::cri::CriClient;
use integration::cri_fixture::{delete_pod, run_pod, sleeper};
use integration::{dist, target_bin_dir, Containerd};

const INSTALLER: &str = "shim-installer";

/// A release directory as `make dist` lays it out, with `files` of the build.
fn release(dir: &Path, files: &[&str]) -> PathBuf {
    let rel = dir.join("release");
    let copied = dist::release_dir(&target_bin_dir(), files, &rel).expect("release directory");
    assert_eq!(
        copied.len(),
        files.len(),
        "build first (make build): {files:?}"
    );
    rel
}

/// A private containerd with CRI whose `PATH` starts with `links` (the node's
/// /usr/local/bin), then the build's binaries (`pause`, the harness's own handlers).
fn node_containerd(links: &Path) -> Containerd {
    integration::require_root();
    assert!(
        target_bin_dir().join(INSTALLER).exists(),
        "build first (make build)"
    );
    Containerd::builder()
        .bin_dirs([links.to_path_buf(), target_bin_dir()])
        .cri(true)
        .start()
        .expect("start containerd with CRI")
}

/// The installer on the node that `c` is, with the release in `rel`.
struct Node<'a> {
    c: &'a Containerd,
    rel: PathBuf,
    links: PathBuf,
    restart: String,
}

impl<'a> Node<'a> {
    fn new(c: &'a Containerd, links: &Path, files: &[&str]) -> Node<'a> {
        Node {
            c,
            rel: release(c.dir(), files),
            links: links.to_path_buf(),
            restart: c.restart_command().expect("restart script"),
        }
    }

    fn bin_dir(&self) -> PathBuf {
        self.c.dir().join("node-bin")
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(target_bin_dir().join(INSTALLER))
            .args(args)
            .arg("--release")
            .arg(&self.rel)
            .arg("--config")
            .arg(self.c.config_path())
            .arg("--address")
            .arg(self.c.address())
            .arg("--bin-dir")
            .arg(self.bin_dir())
            .arg("--link-dir")
            .arg(&self.links)
            .arg("--state-dir")
            .arg(self.c.dir().join("installer-state"))
            .arg("--containerd")
            .arg("/usr/bin/containerd")
            .arg("--restart-command")
            .arg(&self.restart)
            .output()
            .expect("run shim-installer");
        eprintln!(
            "shim-installer {args:?}: {}\nstdout:\n{}stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "shim-installer {args:?} failed\n--- containerd log ---\n{}",
            self.c.log_tail(30)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "shim-installer {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// Files beside containerd's config whose names mention `needle` (the installer's
/// temporary and candidate files must not outlive it).
fn left_beside(c: &Containerd, needle: &str) -> Vec<String> {
    fs::read_dir(c.dir())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(needle))
        .collect()
}

/// The executables of this containerd's running shims.
fn shim_exes(c: &Containerd) -> Vec<PathBuf> {
    c.shim_pids()
        .into_iter()
        .filter_map(|pid| fs::read_link(format!("/proc/{pid}/exe")).ok())
        .collect()
}

#[test]
fn install_runs_pods_on_new_handlers_and_uninstall_restores_the_config() {
    let links = tempfile::tempdir().unwrap();
    let c = node_containerd(links.path());
    let node = Node::new(
        &c,
        links.path(),
        &[
            INSTALLER,
            "containerd-shim-runc-v2",
            "containerd-shim-wasm-v2",
        ],
    );
    let original = fs::read_to_string(c.config_path()).unwrap();

    let out = node.ok(&["install", "--shims", "runc,wasm"]);
    assert!(out.contains("handler rs-runc: ran a probe pod"), "{out}");
    assert!(out.contains("handler rs-wasm: ran a probe pod"), "{out}");
    assert_eq!(c.restarts(), 1);
    // Every byte of the admin's config is still there, in place; ours follows it.
    let installed = fs::read_to_string(c.config_path()).unwrap();
    assert!(installed.starts_with(original.trim_end()), "{installed}");
    assert!(
        installed.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.rs-wasm]")
    );
    assert_eq!(left_beside(&c, "shim-installer"), Vec::<String>::new());

    // A pod on each handler runs our installed binaries, not the ones on containerd's PATH.
    let cri = CriClient::connect(c.address()).unwrap();
    let pod = run_pod(&c, &cri, "installed", "rs-runc");
    sleeper(&cri, &pod, "app");
    let wasm_pod = run_pod(&c, &cri, "installed-wasm", "rs-wasm");
    // The Wasm shim runs native entrypoints too.
    sleeper(&cri, &wasm_pod, "native");
    let exes = shim_exes(&c);
    for shim in ["containerd-shim-runc-v2", "containerd-shim-wasm-v2"] {
        assert!(
            exes.contains(&node.bin_dir().join(shim)),
            "{shim} not run from {}: {exes:?}",
            node.bin_dir().display()
        );
    }

    // Twice: nothing changes, nothing restarts.
    let out = node.ok(&["install", "--shims", "runc,wasm"]);
    assert!(out.contains("not restarted"), "{out}");
    assert_eq!(c.restarts(), 1);
    assert_eq!(fs::read_to_string(c.config_path()).unwrap(), installed);

    // The installer is on the node too, for later status and uninstall.
    assert!(node.bin_dir().join(INSTALLER).exists());
    let status = node.ok(&["status"]);
    assert!(
        status.contains("shim runc: containerd-shim-runc-v2: Version:"),
        "{status}"
    );
    assert!(
        status.contains("handler rs-wasm (wasm): in containerd's config"),
        "{status}"
    );
    assert!(
        !status.contains("MISSING") && !status.contains("CHANGED"),
        "{status}"
    );

    // Pods on the handlers: uninstall refuses and names them.
    let err = node.fails(&["uninstall"]);
    for name in ["installed", "installed-wasm"] {
        assert!(err.contains(&format!("/{name}-")), "{err}");
    }
    assert_eq!(fs::read_to_string(c.config_path()).unwrap(), installed);
    assert!(node.bin_dir().join("containerd-shim-runc-v2").exists());

    delete_pod(&cri, &pod);
    delete_pod(&cri, &wasm_pod);
    let out = node.ok(&["uninstall"]);
    assert!(out.contains("restarted containerd"), "{out}");
    assert_eq!(c.restarts(), 2);
    assert_eq!(fs::read_to_string(c.config_path()).unwrap(), original);
    assert!(
        !node.bin_dir().exists(),
        "{:?}",
        fs::read_dir(node.bin_dir()).map(|d| d.count())
    );
    assert_eq!(fs::read_dir(links.path()).unwrap().count(), 0);
    assert!(!c.dir().join("installer-state").exists());
    // containerd came back on the original config and still runs pods.
    let cri = CriClient::connect(c.address()).unwrap();
    let pod = run_pod(&c, &cri, "after", "runc");
    delete_pod(&cri, &pod);
    assert!(node.ok(&["uninstall"]).contains("nothing installed"));
}

#[test]
fn an_invalid_merge_is_refused_before_containerd_restarts() {
    let links = tempfile::tempdir().unwrap();
    let c = node_containerd(links.path());
    let node = Node::new(&c, links.path(), &["containerd-shim-wasm-v2"]);
    let original = fs::read_to_string(c.config_path()).unwrap();

    // A setting of the wrong type: valid TOML, which only containerd's own decoding refuses.
    let err = node.fails(&[
        "install",
        "--shims",
        "wasm",
        "--set",
        "rs-wasm.privileged_without_host_devices=\"yes\"",
    ]);
    assert!(
        err.contains("containerd refuses the merged config"),
        "{err}"
    );
    assert!(err.contains("yes"), "{err}");
    assert_eq!(fs::read_to_string(c.config_path()).unwrap(), original);
    assert_eq!(c.restarts(), 0);
    assert_eq!(left_beside(&c, "candidate"), Vec::<String>::new());
    // The binaries this attempt copied went with it.
    assert!(!node.bin_dir().exists());
    assert_eq!(fs::read_dir(links.path()).unwrap().count(), 0);
    assert!(!c.dir().join("installer-state").exists());

    // A name another runtime has is a conflict, named before anything is written.
    let err = node.fails(&["install", "--shims", "wasm", "--handler", "wasm=runc"]);
    assert!(
        err.contains("runtime handler \"runc\" already exists"),
        "{err}"
    );
    assert_eq!(fs::read_to_string(c.config_path()).unwrap(), original);

    // Bad input: unknown shim, a release file that does not match its checksum.
    assert!(node
        .fails(&["install", "--shims", "nope"])
        .contains("unknown shim"));
    fs::write(node.rel.join("containerd-shim-wasm-v2"), b"tampered").unwrap();
    let err = node.fails(&["install", "--shims", "wasm"]);
    assert!(err.contains("SHA256SUMS says"), "{err}");
    assert_eq!(fs::read_to_string(c.config_path()).unwrap(), original);
    assert!(!node.bin_dir().join("containerd-shim-wasm-v2").exists());
    assert_eq!(c.restarts(), 0);
}

/// The DaemonSet's image, run by the node's containerd as a container with the host's root
/// at /host (as deploy/shim-installer.yaml mounts it): the same install from inside, then
/// `status --probe` from inside reaches CRI through the mounted socket.
#[test]
fn the_installer_image_installs_from_a_container() {
    let links = tempfile::tempdir().unwrap();
    let mut c = node_containerd(links.path());
    let rel = release(c.dir(), &[INSTALLER, "containerd-shim-runc-v2"]);
    let archive = dist::installer_image(&rel, &c.dir().join("installer.oci.tar")).unwrap();
    c.ctr_ok(&["images", "import", &archive.to_string_lossy()]);
    let original = fs::read_to_string(c.config_path()).unwrap();

    let host = |p: &Path| p.to_string_lossy().into_owned();
    let bin_dir = c.dir().join("node-bin");
    let state = c.dir().join("installer-state");
    let run = |c: &Containerd, name: &str, args: &[&str]| {
        let mut argv = vec![
            "run",
            "--rm",
            "--privileged",
            "--mount",
            "type=bind,src=/,dst=/host,options=rbind:rw",
            dist::INSTALLER_IMAGE,
            name,
            "/release/shim-installer",
        ];
        argv.extend_from_slice(args);
        let common = [
            "--host-root".to_string(),
            "/host".into(),
            "--config".into(),
            host(&c.config_path()),
            "--address".into(),
            host(c.address()),
            "--bin-dir".into(),
            host(&bin_dir),
            "--link-dir".into(),
            host(links.path()),
            "--state-dir".into(),
            host(&state),
        ];
        argv.extend(common.iter().map(String::as_str));
        let out = c.ctr(&argv);
        eprintln!("ctr {argv:?}: {}\n{}{}", out.status, out.stdout, out.stderr);
        out
    };

    // No restart from inside the container: a restarting containerd would take the attached
    // `ctr run` with it. The restart itself is the host test's; here containerd is restarted
    // by the harness, as systemd would be asked to.
    let out = run(
        &c,
        "installer",
        &["install", "--release", "/release", "--no-restart"],
    );
    assert!(out.success());
    assert!(
        out.stdout.contains("added handlers rs-runc"),
        "{}",
        out.stdout
    );
    // The host paths got the files, the link and the handler; the container saw them as /host.
    let installed = fs::read_to_string(c.config_path()).unwrap();
    assert!(installed.starts_with(original.trim_end()));
    assert!(installed.contains("runtimes.rs-runc]"), "{installed}");
    assert_eq!(
        fs::read_link(links.path().join("containerd-shim-rs-runc-v2")).unwrap(),
        bin_dir.join("containerd-shim-runc-v2")
    );
    assert!(state.join("installed.json").exists());

    c.restart_containerd().expect("restart containerd");
    let out = run(&c, "installer-status", &["status", "--probe"]);
    assert!(out.success());
    assert!(
        out.stdout
            .contains("handler rs-runc (runc): in containerd's config, ran a probe pod"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("file ") && !out.stdout.contains("MISSING"),
        "{}",
        out.stdout
    );
}

/// deploy/shim-installer.yaml runs the image `make dist` builds, with options the installer
/// has: the manifest and the binary cannot drift apart unnoticed.
#[test]
fn the_daemonset_runs_the_image_and_options_we_build() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/shim-installer.yaml");
    let text = fs::read_to_string(&manifest).unwrap();
    let image = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("image: "))
        .expect("an image");
    assert_eq!(image, dist::INSTALLER_IMAGE);
    let args: Vec<&str> = text
        .lines()
        .skip_while(|l| l.trim() != "args:")
        .skip(1)
        .map_while(|l| l.trim().strip_prefix("- "))
        .collect();
    assert_eq!(args.first(), Some(&"install"), "{args:?}");
    let help = Command::new(target_bin_dir().join(INSTALLER))
        .arg("--help")
        .output()
        .expect("shim-installer --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for opt in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            help.contains(&format!("{opt} ")),
            "{opt} is not an option:\n{help}"
        );
    }
    assert!(
        args.contains(&"--host-root") && args.contains(&"--wait"),
        "{args:?}"
    );
}

/// The VM shim installed from a release: its helpers and guest image go beside it (where it
/// looks, through its resolved path), and a pod on `rs-vm` boots a micro-VM from them.
#[test]
fn the_vm_handler_runs_pods_in_micro_vms_from_the_installed_guest() {
    let files = [
        INSTALLER,
        "containerd-shim-vm-v2",
        "virtiofsd",
        "vhost-device-vsock",
        "vm-guest/vmlinux",
        "vm-guest/initramfs.cpio",
    ];
    let links = tempfile::tempdir().unwrap();
    let c = node_containerd(links.path());
    let node = Node::new(&c, links.path(), &files);
    let original = fs::read_to_string(c.config_path()).unwrap();

    let out = node.ok(&["install", "--shims", "vm"]);
    assert!(out.contains("handler rs-vm: ran a probe pod"), "{out}");
    for f in &files[1..] {
        assert!(node.bin_dir().join(f).exists(), "{f} not installed");
    }
    let installed = fs::read_to_string(c.config_path()).unwrap();
    assert!(
        installed.contains("pod_annotations = [\"io.containerd.vm.*\"]"),
        "{installed}"
    );

    let cri = CriClient::connect(c.address()).unwrap();
    let pod = run_pod(&c, &cri, "vm", "rs-vm");
    let app = sleeper(&cri, &pod, "app");
    let out = cri.exec_sync(&app, &["cat", "/proc/cmdline"], 60).unwrap();
    assert_eq!(out.exit_code, 0);
    assert!(
        shim_exes(&c).contains(&node.bin_dir().join("containerd-shim-vm-v2")),
        "{:?}",
        shim_exes(&c)
    );
    // The guest's kernel is the one installed beside the shim.
    let qemu: Vec<String> = integration::checks::processes_mentioning("qemu-system")
        .into_iter()
        .map(|(_, cmd)| cmd)
        .filter(|cmd| cmd.contains(&*node.bin_dir().join("vm-guest/vmlinux").to_string_lossy()))
        .collect();
    assert_eq!(qemu.len(), 1, "{qemu:?}");

    delete_pod(&cri, &pod);
    node.ok(&["uninstall"]);
    assert_eq!(fs::read_to_string(c.config_path()).unwrap(), original);
    assert!(!node.bin_dir().exists());
}

/// `--force` removes the handlers while a pod uses one: the running shim keeps its (now
/// unlinked) binary and still serves the pod until it is deleted.
#[test]
fn a_forced_uninstall_leaves_running_pods_to_their_shims() {
    let links = tempfile::tempdir().unwrap();
    let c = node_containerd(links.path());
    let node = Node::new(&c, links.path(), &[INSTALLER, "containerd-shim-runc-v2"]);
    let original = fs::read_to_string(c.config_path()).unwrap();
    node.ok(&["install", "--shims", "runc"]);

    let cri = CriClient::connect(c.address()).unwrap();
    let pod = run_pod(&c, &cri, "forced", "rs-runc");
    let app = sleeper(&cri, &pod, "app");
    let err = node.fails(&["uninstall"]);
    assert!(
        err.contains("/forced-") && err.contains("(rs-runc)"),
        "{err}"
    );

    let out = node.ok(&["uninstall", "--force"]);
    assert!(out.contains("removed handlers rs-runc"), "{out}");
    assert_eq!(fs::read_to_string(c.config_path()).unwrap(), original);
    assert!(!node.bin_dir().exists());

    // The pod's shim answers on, from the binary it was started from.
    let cri = CriClient::connect(c.address()).unwrap();
    let out = cri.exec_sync(&app, &["echo", "still here"], 30).unwrap();
    assert_eq!(out.stdout, b"still here\n");
    delete_pod(&cri, &pod);
}
