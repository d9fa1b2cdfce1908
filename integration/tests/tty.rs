//! Terminals through a real containerd: `ctr run -t` and `ctr task exec -t` with ctr's own
//! terminal being a pty this test holds, so the test types and reads like a user; and the
//! Go client's exec with a terminal, which ctr cannot send, on the shim's socket.

use std::fs::File;
use std::io::Read;
use std::time::Duration;

use integration::checks::wait_until;
use integration::fixture::with_our_shims;
use integration::shim_client::{connect, ctx, process_spec};
use integration::terminal::Terminal;
use integration::{unique_id, BUSYBOX_REF};
use protocol::shim::{
    DeleteRequest, ExecProcessRequest, ResizePtyRequest, StartRequest, StateRequest, WaitRequest,
};

#[test]
fn run_with_a_terminal_sizes_it_and_takes_input() {
    let c = with_our_shims();
    let id = unique_id("tty");
    // ctr resizes right after Start, so wait for a size before printing it.
    let script = "until stty size 2>/dev/null | grep -qv '^0 '; do sleep 0.1; done; stty size; tty; read l; echo got-$l; exit 6";
    let mut t = Terminal::run(
        &c,
        &["run", "-t", "--rm", BUSYBOX_REF, &id, "sh", "-c", script],
        33,
        101,
    );
    // ctr sends its own size with ResizePty as soon as the task starts.
    assert!(t.wait_for("33 101"), "size not applied: {:?}", t.screen());
    assert!(t.wait_for("/dev/pts/"), "not a terminal: {:?}", t.screen());
    t.type_line("hello");
    assert!(t.wait_for("got-hello"), "input lost: {:?}", t.screen());
    assert_eq!(t.exit_code(), Some(6), "{:?}", t.screen());
    assert!(
        c.shim_pids().is_empty()
            || wait_until(Duration::from_secs(10), || c.shim_pids().is_empty())
    );
}

const WAIT_SIZE_THEN_EXIT_3: &str =
    "until stty size 2>/dev/null | grep -qv '^0 '; do sleep 0.1; done; stty size; tty; exit 3";

#[test]
fn exec_with_a_terminal() {
    let c = with_our_shims();
    let id = unique_id("ttyexec");
    c.ctr_ok(&["run", "-d", BUSYBOX_REF, &id, "sleep", "1000"]);
    let mut t = Terminal::run(
        &c,
        &[
            "task",
            "exec",
            "-t",
            "--exec-id",
            "sh1",
            &id,
            "sh",
            "-c",
            WAIT_SIZE_THEN_EXIT_3,
        ],
        24,
        80,
    );
    assert!(t.wait_for("24 80"), "{:?}", t.screen());
    assert!(t.wait_for("/dev/pts/"), "{:?}", t.screen());
    assert_eq!(t.exit_code(), Some(3), "{:?}", t.screen());
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
}

/// The Go client's `task.Exec` with `cio.WithTerminal` (containerd's own
/// `TestContainerExecLargeOutputWithTTY`): `terminal` is set on the request, while the
/// process spec keeps the container's `terminal: false`. The request decides, as in
/// containerd's runc shim, which sets the spec's `terminal` from it.
#[test]
fn exec_with_a_terminal_on_the_request_only() {
    let c = with_our_shims();
    let id = unique_id("ttyreq");
    c.ctr_ok(&["run", "-d", BUSYBOX_REF, &id, "sleep", "1000"]);
    let shim = connect(&c, &id);
    let spec = process_spec(&["sh", "-c", WAIT_SIZE_THEN_EXIT_3]);
    let fields: serde_json::Value = serde_json::from_slice(&spec.value).unwrap();
    assert!(fields.get("terminal").is_none(), "Go omits terminal: false");
    // cio's FIFO set for a terminal: stdout only, no stderr.
    let stdout = c.dir().join(format!("{id}-stdout"));
    nix::unistd::mkfifo(&stdout, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let reader = {
        let path = stdout.clone();
        std::thread::spawn(move || {
            let mut out = String::new();
            File::open(path).unwrap().read_to_string(&mut out).unwrap();
            out
        })
    };
    let exec = ExecProcessRequest {
        id: id.clone(),
        exec_id: "goclient".into(),
        terminal: true,
        stdout: stdout.to_string_lossy().into(),
        spec: protobuf::MessageField::some(spec),
        ..Default::default()
    };
    shim.exec(ctx(), &exec).expect("exec with a terminal");
    let start = StartRequest {
        id: id.clone(),
        exec_id: "goclient".into(),
        ..Default::default()
    };
    shim.start(ctx(), &start)
        .expect("start an exec with a terminal");
    let state = StateRequest {
        id: id.clone(),
        exec_id: "goclient".into(),
        ..Default::default()
    };
    assert!(shim.state(ctx(), &state).unwrap().terminal);
    // The Go client resizes right after Start, as ctr does.
    let resize = ResizePtyRequest {
        id: id.clone(),
        exec_id: "goclient".into(),
        width: 91,
        height: 27,
        ..Default::default()
    };
    shim.resize_pty(ctx(), &resize)
        .expect("resize the exec's terminal");
    let wait = WaitRequest {
        id: id.clone(),
        exec_id: "goclient".into(),
        ..Default::default()
    };
    assert_eq!(shim.wait(ctx(), &wait).unwrap().exit_status, 3);
    let screen = reader.join().unwrap();
    assert!(screen.contains("27 91"), "size not applied: {screen:?}");
    assert!(screen.contains("/dev/pts/"), "not a terminal: {screen:?}");
    let delete = DeleteRequest {
        id: id.clone(),
        exec_id: "goclient".into(),
        ..Default::default()
    };
    assert_eq!(shim.delete(ctx(), &delete).unwrap().exit_status, 3);
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
}
