//! The container init's last step, as libcontainer lets us replace it: run Wasm in-process,
//! or `execve` a native entrypoint exactly as youki would.

use oci_spec::runtime::Spec;

use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};

use crate::guest::{self, Guest};

#[derive(Clone)]
pub struct WasmExecutor {
    /// `None`: a native entrypoint (pause, busybox sidecars).
    pub guest: Option<Guest>,
}

impl Executor for WasmExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        match &self.guest {
            Some(g) => guest::run(g, spec),
            None => {
                reset_signals();
                DefaultExecutor {}.exec(spec)
            }
        }
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        match &self.guest {
            // The shim already checked the artifact against this engine and WASI.
            Some(_) => Ok(()),
            None => DefaultExecutor {}.validate(spec),
        }
    }
}

/// The init was cloned from a shim thread, whose mask blocks SIGTERM/SIGINT/SIGCHLD, and
/// Rust ignores SIGPIPE: a native program must start with a fresh process's signal state.
fn reset_signals() {
    // SAFETY: sigemptyset, sigprocmask and signal only change this process's signal state.
    unsafe {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigprocmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
