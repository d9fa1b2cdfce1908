//! The backends the capability tests run the same cases on: how to start a containerd that
//! runs each one's shim, which runtime and image its containers use, which programs play the
//! parts a case needs, and what of a container the backend itself may leave behind.
//!
//! A capability test is written once against [`Backend`] and instantiated per backend with
//! [`for_each_backend!`](crate::for_each_backend), so each backend's result is its own test
//! (`lifecycle::wasm::exec_output_and_exit_code`). What only one backend does stays in that
//! backend's own test file.

use std::path::{Path, PathBuf};

use crate::checks::runc_state;
use crate::fixture::{assert_nothing_left, with_our_shims, with_our_shims_and};
use crate::wasm_fixture::{with_wasm_shim, BUSYBOX_WASM_REF};
use crate::wasm_modules::HELLO_OUTPUT;
use crate::{target_bin_dir, Containerd, BUSYBOX_REF, OUR_RUNTIME, WASM_RUNTIME};

/// Where runj (and our stand-in) keeps a jail's state.
const RUNJ_STATE: &str = "/var/lib/runj/jails";

/// One backend, as the capability tests see it.
pub struct Backend {
    /// The test module's name: `runc`, `wasm`, `jail`.
    pub name: &'static str,
    /// The runtime type `ctr run --runtime` takes.
    pub runtime: &'static str,
    /// The image its containers run.
    pub image: &'static str,
    /// A program of the container's own that prints [`hello_output`](Self::hello_output) and
    /// exits 0.
    pub hello: &'static [&'static str],
    pub hello_output: &'static str,
    /// A program that exits 7.
    pub exit7: &'static [&'static str],
    /// A program that runs until it is killed.
    pub idle: &'static [&'static str],
    start: fn() -> Started,
    /// Where the backend's runtime keeps state of container `id` that must be gone after
    /// its delete.
    state_of: fn(&Containerd, &str) -> PathBuf,
}

/// A containerd for one backend, with what it needs alive beside it.
pub struct Started {
    pub containerd: Containerd,
    /// A directory on containerd's `PATH` (the jail backend's `runj` stand-in).
    _keep: Option<tempfile::TempDir>,
}

impl std::ops::Deref for Started {
    type Target = Containerd;
    fn deref(&self) -> &Containerd {
        &self.containerd
    }
}

impl Backend {
    /// A private containerd that runs this backend's shim, its image imported.
    pub fn start(&self) -> Started {
        (self.start)()
    }

    /// `ctr run [flags] --runtime <runtime> <image> <id> <args>`.
    pub fn run(&self, c: &Containerd, flags: &[&str], id: &str, args: &[&str]) -> crate::CtrOutput {
        let mut a = vec!["run", "--runtime", self.runtime];
        a.extend_from_slice(flags);
        a.push(self.image);
        a.push(id);
        a.extend_from_slice(args);
        c.ctr(&a)
    }

    /// Nothing of container `id` is left: no shim, mount or process, no runtime state, no
    /// container in containerd.
    pub fn assert_gone(&self, c: &Containerd, id: &str) {
        assert_nothing_left(c, id);
        let state = (self.state_of)(c, id);
        assert!(
            !state.exists(),
            "{}: {} of {id} left behind",
            self.name,
            state.display()
        );
        let containers = c.ctr(&["containers", "ls", "-q"]).stdout;
        assert!(
            !containers.lines().any(|l| l.trim() == id),
            "{}: container {id} left behind",
            self.name
        );
    }
}

/// Our runc shim, running busybox.
pub const RUNC: Backend = Backend {
    name: "runc",
    runtime: OUR_RUNTIME,
    image: BUSYBOX_REF,
    hello: &["echo", "hello from a container"],
    hello_output: "hello from a container\n",
    exit7: &["sh", "-c", "exit 7"],
    idle: &["sleep", "1000"],
    start: || Started {
        containerd: with_our_shims(),
        _keep: None,
    },
    state_of: |c, id| runc_state(c.namespace(), id),
};

/// Our Wasm shim, running the busybox-wasm image's modules.
pub const WASM: Backend = Backend {
    name: "wasm",
    runtime: WASM_RUNTIME,
    image: BUSYBOX_WASM_REF,
    hello: &["/hello.wasm"],
    hello_output: HELLO_OUTPUT,
    exit7: &["/ctool.wasm", "exit", "7"],
    idle: &["/idle.wasm"],
    start: || Started {
        containerd: with_wasm_shim(),
        _keep: None,
    },
    // youki's state, beside runc's.
    state_of: |c, id| {
        Path::new("/run/containerd/wasm")
            .join(c.namespace())
            .join(id)
    },
};

/// Our jail shim, with `runj` played by `runj-standin` (runj's CLI and state contract; the
/// process a chrooted Linux child: FreeBSD cannot run here).
pub const JAIL: Backend = Backend {
    name: "jail",
    runtime: "io.containerd.jail.v2",
    image: BUSYBOX_REF,
    hello: &["echo", "hello from a container"],
    hello_output: "hello from a container\n",
    exit7: &["sh", "-c", "exit 7"],
    idle: &["sleep", "1000"],
    start: || {
        let dir = runj_dir();
        Started {
            containerd: with_our_shims_and(&[dir.path()]),
            _keep: Some(dir),
        }
    },
    state_of: |_, id| Path::new(RUNJ_STATE).join(id),
};

/// A directory holding the stand-in as `runj`, for containerd's `PATH`.
pub fn runj_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a directory for runj");
    let standin = target_bin_dir().join("runj-standin");
    std::fs::copy(&standin, dir.path().join("runj"))
        .unwrap_or_else(|e| panic!("copy {} (build it first): {e}", standin.display()));
    dir
}

/// Instantiates capability tests for every backend: for each listed function
/// `fn case(b: &Backend)` of the calling file, a test `<backend>::case`.
///
/// ```ignore
/// fn output_and_exit_codes(b: &Backend) { ... }
/// integration::for_each_backend!(output_and_exit_codes);
/// ```
#[macro_export]
macro_rules! for_each_backend {
    ($($case:ident),* $(,)?) => {
        mod runc {
            $( #[test] fn $case() { super::$case(&$crate::backends::RUNC) } )*
        }
        mod wasm {
            $( #[test] fn $case() { super::$case(&$crate::backends::WASM) } )*
        }
        mod jail {
            $( #[test] fn $case() { super::$case(&$crate::backends::JAIL) } )*
        }
    };
}
