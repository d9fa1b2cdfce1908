//! Checkpoint and restore. Debian's CRIU cannot dump on this kernel ("vdso: Unexpected rt
//! vDSO area bounds"), so: the real `criu check` failure must reach the user clearly, and
//! the mapping of containerd's options onto runc's flags is checked against the recording
//! runc stand-in, with a stand-in `criu` whose `check` passes.

use std::path::{Path, PathBuf};
use std::process::Command;

use integration::shim_client::{bundle, code, connect, ctx};
use integration::{require_root, target_bin_dir, unique_id, Containerd, BUSYBOX_REF};
use protocol::options::{CheckpointOptions, Options};
use protocol::shim::*;

fn containerd(extra_bin: Option<&Path>) -> Containerd {
    require_root();
    let mut b = Containerd::builder().bin_dir(target_bin_dir());
    if let Some(dir) = extra_bin {
        b = b.bin_dir(dir);
    }
    let c = b.start().expect("start containerd");
    c.import_busybox().expect("import busybox");
    c
}

#[test]
fn failing_criu_check_is_a_clear_error() {
    let c = containerd(None);
    let id = unique_id("ckpt");
    c.ctr_ok(&["run", "-d", BUSYBOX_REF, &id, "sleep", "1000"]);
    let criu_works = Command::new("criu")
        .arg("check")
        .output()
        .is_ok_and(|o| o.status.success());
    let out = c.ctr(&["task", "checkpoint", &id]);
    if criu_works {
        assert!(
            out.success(),
            "criu check passes here, so checkpoint must work: {out:?}"
        );
    } else {
        assert!(!out.success());
        assert!(
            out.stderr.contains("needs CRIU"),
            "unclear error: {}",
            out.stderr
        );
        // The container is untouched.
        let ls = c.ctr_ok(&["task", "ls"]).stdout;
        assert!(
            ls.lines()
                .any(|l| l.starts_with(&id) && l.contains("RUNNING")),
            "{ls}"
        );
    }
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
}

/// A directory with a `criu` whose `check` passes and the recording runc wrapper.
fn stand_ins(dir: &Path, conf: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let criu = dir.join("criu");
    std::fs::write(&criu, "#!/bin/sh\nexit 0\n").unwrap();
    Command::new("chmod").arg("+x").arg(&criu).status().unwrap();
    let runc = dir.join("runc");
    std::fs::copy(target_bin_dir().join("runc-wrapper"), &runc).unwrap();
    std::fs::write(dir.join("runc-wrapper.conf"), conf).unwrap();
    runc
}

fn calls(runc: &Path, sub: &str) -> Vec<String> {
    std::fs::read_to_string(runc.with_file_name("runc-calls.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == sub))
        .map(str::to_string)
        .collect()
}

#[test]
fn checkpoint_options_map_onto_runc_flags() {
    let dir = std::env::temp_dir().join(unique_id("standins"));
    let runc = stand_ins(&dir, "fake checkpoint 0\n");
    let c = containerd(Some(&dir));
    let id = unique_id("map");
    c.ctr_ok(&[
        "run",
        "-d",
        "--runc-binary",
        runc.to_str().unwrap(),
        BUSYBOX_REF,
        &id,
        "sleep",
        "1000",
    ]);
    let shim = connect(&c, &id);
    let opts = CheckpointOptions {
        exit: true,
        open_tcp: true,
        external_unix_sockets: true,
        terminal: true,
        file_locks: true,
        empty_namespaces: vec!["network".into()],
        cgroups_mode: "soft".into(),
        work_path: "/tmp/ckpt-work".into(),
        ..Default::default()
    };
    let req = CheckpointTaskRequest {
        id: id.clone(),
        path: "/tmp/ckpt-image".into(),
        options: protobuf::MessageField::some(protocol::pack(&opts).unwrap()),
        ..Default::default()
    };
    shim.checkpoint(ctx(), &req).unwrap();
    let line = calls(&runc, "checkpoint")
        .pop()
        .expect("runc checkpoint was not called");
    let want = format!(
        "checkpoint --image-path /tmp/ckpt-image --work-path /tmp/ckpt-work --tcp-established --ext-unix-sk --shell-job --file-locks --empty-ns network --manage-cgroups-mode soft {id}"
    );
    assert!(line.ends_with(&want), "got: {line}\nwant: ...{want}");
    // Without `exit` the container keeps running; work dir defaults into the bundle.
    let req = CheckpointTaskRequest {
        id: id.clone(),
        path: "/tmp/ckpt-image2".into(),
        ..Default::default()
    };
    shim.checkpoint(ctx(), &req).unwrap();
    let line = calls(&runc, "checkpoint").pop().unwrap();
    let work = bundle(&c, &id).join("criu-work");
    assert!(
        line.ends_with(&format!(
            "checkpoint --image-path /tmp/ckpt-image2 --work-path {} --leave-running {id}",
            work.display()
        )),
        "{line}"
    );
    // An options type that is not runc's is refused before runc runs.
    let bogus = CheckpointTaskRequest {
        id: id.clone(),
        path: "/tmp/x".into(),
        options: protobuf::MessageField::some(protobuf::well_known_types::any::Any {
            type_url: "example.com/Nope".into(),
            value: vec![1],
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(
        code(&shim.checkpoint(ctx(), &bogus)),
        Some(ttrpc::Code::INVALID_ARGUMENT)
    );
    assert_eq!(calls(&runc, "checkpoint").len(), 2);
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn restore_runs_runc_restore_at_start() {
    let dir = std::env::temp_dir().join(unique_id("standins"));
    let runc = stand_ins(&dir, "fake restore 0\n");
    let c = containerd(Some(&dir));
    let id = unique_id("host");
    c.ctr_ok(&["run", "-d", BUSYBOX_REF, &id, "sleep", "1000"]);
    let shim = connect(&c, &id);
    // A second container in the same shim, restored from an image directory.
    let restored = unique_id("restored");
    let b = c.dir().join(&restored);
    std::fs::create_dir_all(b.join("rootfs")).unwrap();
    std::fs::copy(bundle(&c, &id).join("config.json"), b.join("config.json")).unwrap();
    let options = Options {
        binary_name: runc.to_string_lossy().into(),
        ..Default::default()
    };
    let create = CreateTaskRequest {
        id: restored.clone(),
        bundle: b.to_string_lossy().into(),
        checkpoint: "/tmp/ckpt-image".into(),
        options: protobuf::MessageField::some(protocol::pack(&options).unwrap()),
        ..Default::default()
    };
    assert_eq!(
        shim.create(ctx(), &create).unwrap().pid,
        0,
        "a restore has no process before start"
    );
    assert!(
        calls(&runc, "restore").is_empty(),
        "restore happens at start, not create"
    );
    // The stand-in writes no pid file, so start fails — after runc got the right flags.
    let start = shim.start(
        ctx(),
        &StartRequest {
            id: restored.clone(),
            ..Default::default()
        },
    );
    assert!(format!("{start:?}").contains("init.pid"), "{start:?}");
    let line = calls(&runc, "restore")
        .pop()
        .expect("runc restore was not called");
    let want = format!(
        "restore --detach --bundle {b} --pid-file {b}/init.pid --image-path /tmp/ckpt-image --work-path {b}/criu-work {restored}",
        b = b.display()
    );
    assert!(line.ends_with(&want), "got: {line}\nwant: ...{want}");
    shim.delete(
        ctx(),
        &DeleteRequest {
            id: restored.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
    let _ = std::fs::remove_dir_all(&dir);
}
