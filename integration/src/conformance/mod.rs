//! Playing containerd to a shim binary, without containerd: the pieces of the
//! `shim-conformance` runner, reusable from tests.
//!
//! A [`Playground`] holds what containerd would have prepared: a temp dir with a busybox
//! rootfs (laid out from `/usr/bin/busybox`, no snapshotter and no mounts — `root.path`
//! points at it), a bundle with `config.json` and the `log` fifo, a ttrpc events service
//! (`containerd.services.events.ttrpc.v1.Events/Forward`) on its own socket, and stdio
//! fifos. It runs the shim's `start` with the flags, env and stdin of one containerd
//! [`Generation`], parses the answer as that generation would, and talks the task API
//! (`containerd.task.v2.Task` or `v3`, as the answer selects). [`run_lifecycle`] walks one
//! container through create, start, exec, kill, wait, delete and shutdown, then the `delete`
//! action, and reports a [`Step`] per check.

mod events;
mod generation;
mod layers;
mod lifecycle;
mod playground;
mod report;
mod sandbox;
mod task_api;

pub use events::{EventSink, ForwardedEvent};
pub use generation::{parse_answer, Answer, AnswerForm, Generation};
pub use layers::{check_layers, leftover_mounts, loop_devices_left, loop_devices_of, LOOP_RELEASE};
pub use lifecycle::{run_lifecycle, stats_after_exit, Config, RootfsLayout, DIR_PREFIX, NAMESPACE};
pub use playground::{busybox_rootfs, process_alive, spec, Playground, StartOutput};
pub use report::{Report, Step};
pub use sandbox::run_sandbox_pod;
pub use task_api::{describe, TaskApi, CALL_TIMEOUT};
