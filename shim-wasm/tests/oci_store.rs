//! `oci::Store` against a real, private containerd: Wasm layers of imported OCI archives,
//! the precompile cache's labels, and its collection together with the image.
//!
//! containerd 1.6's `ctr` refuses to create a container from an image whose config is
//! `application/vnd.wasm.config.v0+json` ("unknown image config media type"), so those
//! containers are created through the containers service directly, as a newer client or
//! CRI would; the plain Linux image goes through `ctr containers create`.

#[path = "../src/oci.rs"]
#[allow(dead_code)]
mod oci;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use protobuf::MessageField;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use shim_common::protocol::{containers, grpc};

use oci::Store;

const NS: &str = "ocitest";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const TAR_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const WASM_CONFIG: &str = "application/vnd.wasm.config.v0+json";
const COMPONENT_LAYER: &str = "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm";

/// A private containerd in its own directory; dropping it stops it and removes the directory.
struct Containerd {
    child: Child,
    dir: PathBuf,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = std::env::temp_dir().join(format!("oci-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("config.toml"),
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{d}/c.sock"
[ttrpc]
  address = "{d}/t.sock"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
                d = dir.display()
            ),
        )
        .unwrap();
        let child = Containerd::spawn(&dir);
        let c = Containerd { child, dir };
        c.wait_ready();
        c
    }

    fn spawn(dir: &Path) -> Child {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("containerd.log"))
            .unwrap();
        Command::new("/usr/bin/containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start /usr/bin/containerd")
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.ctr_ok(&["version"]) {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills containerd and starts it again on the same root and socket.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Containerd::spawn(&self.dir);
        self.wait_ready();
    }

    fn socket(&self) -> String {
        self.dir.join("c.sock").display().to_string()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    fn ctr_output(&self, args: &[&str]) -> std::process::Output {
        Command::new("/usr/bin/ctr")
            .args(["--address", &self.socket(), "-n", NS])
            .args(args)
            .output()
            .expect("run ctr")
    }

    fn ctr_ok(&self, args: &[&str]) -> bool {
        self.ctr_output(args).status.success()
    }

    fn ctr(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.ctr_bytes(args)).into_owned()
    }

    fn ctr_bytes(&self, args: &[&str]) -> Vec<u8> {
        let out = self.ctr_output(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// The `ctr content ls` line of `digest`, if the blob exists.
    fn content_line(&self, digest: &str) -> Option<String> {
        self.ctr(&["content", "ls"])
            .lines()
            .find(|l| l.starts_with(digest))
            .map(str::to_string)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// An OCI layout being written as a directory, then tarred for `ctr images import`.
struct Layout {
    dir: PathBuf,
    manifests: Vec<Value>,
}

impl Layout {
    fn new(dir: &Path) -> Layout {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        Layout {
            dir: dir.to_path_buf(),
            manifests: vec![],
        }
    }

    fn blob(&self, media_type: &str, bytes: &[u8]) -> Value {
        let d = digest(bytes);
        fs::write(self.dir.join("blobs/sha256").join(&d[7..]), bytes).unwrap();
        json!({"mediaType": media_type, "digest": d, "size": bytes.len()})
    }

    fn manifest(&self, config_type: &str, config: &Value, layers: &[(&str, &[u8])]) -> Value {
        let config = self.blob(config_type, config.to_string().as_bytes());
        let layers: Vec<Value> = layers.iter().map(|(t, b)| self.blob(t, b)).collect();
        let m = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers});
        self.blob(OCI_MANIFEST, m.to_string().as_bytes())
    }

    fn tag(&mut self, mut desc: Value, name: &str) {
        desc["annotations"] = json!({"io.containerd.image.name": name});
        self.manifests.push(desc);
    }

    fn archive(&self) -> PathBuf {
        fs::write(
            self.dir.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let index = json!({"schemaVersion": 2, "manifests": self.manifests});
        fs::write(self.dir.join("index.json"), index.to_string()).unwrap();
        let tar = self.dir.with_extension("tar");
        let ok = Command::new("tar")
            .arg("-C")
            .arg(&self.dir)
            .arg("-cf")
            .arg(&tar)
            .args(["oci-layout", "index.json", "blobs"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "tar of {}", self.dir.display());
        tar
    }
}

/// A module that is just the Wasm header plus a custom section making it unique.
fn module(tag: &str) -> Vec<u8> {
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    m.push(0); // custom section
    m.push((tag.len() + 1) as u8);
    m.push(tag.len() as u8);
    m.extend_from_slice(tag.as_bytes());
    m
}

/// A one-file uncompressed tar layer and its diff id.
fn tar_layer(dir: &Path) -> Vec<u8> {
    let src = dir.join("layer-src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("hello"), "hi").unwrap();
    let out = Command::new("tar")
        .arg("-C")
        .arg(&src)
        .args(["-cf", "-", "hello"])
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

/// Creates container `id` of `image` through the containers service (no snapshot, no task).
fn create_container(store: &Store, id: &str, image: &str) {
    let req = containers::CreateContainerRequest {
        container: MessageField::some(containers::Container {
            id: id.into(),
            image: image.into(),
            runtime: MessageField::some(containers::container::Runtime {
                name: "io.containerd.wasm.v2".into(),
                ..Default::default()
            }),
            spec: MessageField::some(protobuf::well_known_types::any::Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/Spec".into(),
                value: b"{}".to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    store
        .client()
        .unary::<_, containers::CreateContainerResponse>(grpc::CONTAINERS_CREATE, req, None)
        .unwrap_or_else(|s| panic!("create container {id}: {s}"));
}

#[test]
fn wasm_layers_and_precompile_cache_through_containerd() {
    let mut ctd = Containerd::start();
    let work = ctd.dir.join("images");

    // Wasm-config image, one application/wasm layer; a wasm-config image without one.
    let wasm_a = module("a");
    let mut layout = Layout::new(&work.join("wasm"));
    let m = layout.manifest(
        WASM_CONFIG,
        &json!({"architecture": "wasm", "os": "wasip1"}),
        &[("application/wasm", &wasm_a)],
    );
    layout.tag(m, "example.com/wasm/config:v1");
    let m = layout.manifest(
        WASM_CONFIG,
        &json!({"architecture": "wasm", "os": "wasip1"}),
        &[(TAR_LAYER, &tar_layer(&work))],
    );
    layout.tag(m, "example.com/wasm/nolayer:v1");
    // An index with a linux/amd64 manifest and an `architecture: wasm` OCI-config manifest
    // whose layer is a component.
    let wasm_b = module("b");
    let linux = layout.manifest(
        OCI_CONFIG,
        &json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}),
        &[],
    );
    let wasm = layout.manifest(
        OCI_CONFIG,
        &json!({"architecture": "wasm", "os": "wasip2", "rootfs": {"type": "layers", "diff_ids": []}}),
        &[(COMPONENT_LAYER, &wasm_b)],
    );
    let mut linux = linux;
    linux["platform"] = json!({"architecture": "amd64", "os": "linux"});
    let mut wasm = wasm;
    wasm["platform"] = json!({"architecture": "wasm", "os": "wasip2"});
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [linux, wasm]});
    let index = layout.blob(OCI_INDEX, index.to_string().as_bytes());
    layout.tag(index, "example.com/wasm/index:v1");
    let archive = layout.archive();
    ctd.ctr(&[
        "images",
        "import",
        "--no-unpack",
        "--all-platforms",
        archive.to_str().unwrap(),
    ]);

    // A plain Linux image, unpacked, and a container made by ctr.
    let layer = tar_layer(&work);
    let mut layout = Layout::new(&work.join("linux"));
    let m = layout.manifest(
        OCI_CONFIG,
        &json!({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/hello"]},
                "rootfs": {"type": "layers", "diff_ids": [digest(&layer)]}}),
        &[(TAR_LAYER, &layer)],
    );
    layout.tag(m, "example.com/linux/plain:v1");
    let archive = layout.archive();
    ctd.ctr(&[
        "images",
        "import",
        "--snapshotter",
        "native",
        archive.to_str().unwrap(),
    ]);
    ctd.ctr(&[
        "containers",
        "create",
        "--snapshotter",
        "native",
        "example.com/linux/plain:v1",
        "plain",
    ]);

    let store = Store::connect(&ctd.socket(), NS).expect("connect to containerd");
    create_container(&store, "wasm-a", "example.com/wasm/config:v1");
    create_container(&store, "wasm-b", "example.com/wasm/index:v1");
    create_container(&store, "nolayer", "example.com/wasm/nolayer:v1");
    create_container(&store, "gone", "example.com/never/imported:v1");

    // Where the module comes from.
    let a = store
        .wasm_layers("wasm-a")
        .unwrap()
        .expect("wasm-a is a wasm image");
    assert_eq!(a.name, "example.com/wasm/config:v1");
    assert_eq!(a.layers.len(), 1);
    assert_eq!(a.layers[0].bytes, wasm_a);
    assert_eq!(a.layers[0].digest, digest(&wasm_a));
    assert_eq!(a.layers[0].media_type, "application/wasm");
    let b = store
        .wasm_layers("wasm-b")
        .unwrap()
        .expect("wasm-b is a wasm image");
    assert_eq!(b.layers.len(), 1);
    assert_eq!(b.layers[0].bytes, wasm_b);
    assert_eq!(b.layers[0].media_type, COMPONENT_LAYER);
    assert!(store.wasm_layers("plain").unwrap().is_none());
    assert!(store.wasm_layers("gone").unwrap().is_none());
    match store.wasm_layers("nolayer") {
        Err(shim_common::Error::InvalidArgument(msg)) => assert!(
            msg.contains("image example.com/wasm/nolayer:v1 has a wasm config but no wasm layer"),
            "{msg}"
        ),
        other => panic!("wasm config without wasm layer: {other:?}"),
    }
    match store.wasm_layers("no-such-container") {
        Err(e @ shim_common::Error::NotFound(_)) => {
            assert_eq!(e.to_string(), "container no-such-container: not found")
        }
        other => panic!("missing container: {other:?}"),
    }

    // Precompile cache: miss, store, hit; labels on the layer; no lease left behind.
    let layer = &a.layers[0];
    let key = format!("{:x}", Sha256::digest(b"engine-hash"));
    assert!(store.precompiled(&a, layer, &key).unwrap().is_none());
    let artifact = b"\x7fELF precompiled artifact of a".repeat(100_000); // > 1 write chunk
    store.store_precompiled(&a, layer, &key, &artifact).unwrap();
    assert_eq!(
        store.precompiled(&a, layer, &key).unwrap().as_deref(),
        Some(&artifact[..])
    );
    let art = digest(&artifact);
    let line = ctd.content_line(&layer.digest).expect("layer blob listed");
    assert!(
        line.contains(&format!("io.containerd.shim.wasm/precompiled/{key}={art}")),
        "{line}"
    );
    assert!(
        line.contains(&format!(
            "containerd.io/gc.ref.content.wasm-precompiled/{key}={art}"
        )),
        "{line}"
    );
    assert!(ctd.content_line(&art).is_some(), "artifact blob listed");
    assert_eq!(ctd.ctr_bytes(&["content", "get", &art]), artifact);
    assert_eq!(
        ctd.ctr(&["leases", "ls", "-q"]).trim(),
        "",
        "lease left behind"
    );
    // Storing again (the blob exists) is fine; another key is a miss.
    store.store_precompiled(&a, layer, &key, &artifact).unwrap();
    assert!(store.precompiled(&a, layer, "other").unwrap().is_none());

    // A synchronous GC keeps the artifact (referenced from the layer the image holds)...
    let lease = ctd.ctr(&["leases", "create"]);
    let lease = lease
        .split_whitespace()
        .next()
        .expect("lease id")
        .to_string();
    ctd.ctr(&["leases", "delete", "--sync", &lease]);
    assert!(
        ctd.content_line(&art).is_some(),
        "artifact collected while its image exists"
    );
    // ...and removing the image collects it.
    ctd.ctr(&["images", "rm", "--sync", "example.com/wasm/config:v1"]);
    assert!(
        ctd.content_line(&art).is_none(),
        "artifact outlived its image"
    );
    assert!(
        ctd.content_line(&layer.digest).is_none(),
        "layer outlived its image"
    );

    // A blob damaged on disk is a miss, not bytes to deserialize.
    let layer = &b.layers[0];
    let artifact = b"artifact of b".to_vec();
    store.store_precompiled(&b, layer, &key, &artifact).unwrap();
    let art = digest(&artifact);
    let path = ctd
        .dir
        .join("root/io.containerd.content.v1.content/blobs/sha256")
        .join(&art[7..]);
    fs::write(&path, b"artifact of B").unwrap();
    assert!(store.precompiled(&b, layer, &key).unwrap().is_none());

    // Calls from several threads at once (the shim's request threads share one Store).
    std::thread::scope(|s| {
        let calls: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    store.wasm_layers("wasm-b").unwrap().unwrap().layers[0]
                        .bytes
                        .clone()
                })
            })
            .collect();
        for call in calls {
            assert_eq!(call.join().unwrap(), wasm_b);
        }
    });

    // A Store outlives a containerd restart (the shim keeps one for its lifetime).
    ctd.restart();
    let again = store
        .wasm_layers("wasm-b")
        .unwrap()
        .expect("wasm-b after restart");
    assert_eq!(again.layers[0].bytes, wasm_b);

    // What a container start pays (shown with --nocapture): connect, find the layer, load.
    let t = Instant::now();
    let fresh = Store::connect(&ctd.socket(), NS).unwrap();
    let connected = t.elapsed();
    let image = fresh.wasm_layers("wasm-b").unwrap().unwrap();
    let resolved = t.elapsed();
    fresh
        .store_precompiled(&image, &image.layers[0], "timing", &[1; 4 << 20])
        .unwrap();
    let t = Instant::now();
    assert!(fresh
        .precompiled(&image, &image.layers[0], "timing")
        .unwrap()
        .is_some());
    eprintln!(
        "oci::Store: connect {connected:?}, connect+wasm_layers {resolved:?}, \
         precompiled (4 MiB) {:?}",
        t.elapsed()
    );
    drop(fresh);

    // The runtime runs on the caller's thread only: the shim gains no thread, idle or not.
    assert_eq!(runtime_threads(), Vec::<String>::new());
    drop(store);
    assert_eq!(runtime_threads(), Vec::<String>::new());
}

/// Threads of this process that tokio started (its workers and blocking pool).
fn runtime_threads() -> Vec<String> {
    fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("tokio"))
        .collect()
}
