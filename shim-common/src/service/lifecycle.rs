//! containerd's task state machine for one process, as a value with no I/O: which call may
//! run in which state, and what state it leaves. The service asks it before every call and
//! tells it what happened, so the rules live here once and are tested here.
//!
//! A call that runs an external command (`runc start`, `runc pause`, `runc delete`, ...)
//! runs without the container's lock: the process is marked [`Busy`] meanwhile, which
//! refuses a conflicting call and lets the others (`State`, `Pids`, exits) go on.

use protocol::task::Status;

use crate::error::{Error, Result};

/// A backend call in flight on a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Busy {
    Starting,
    Pausing,
    Resuming,
    Deleting,
}

impl Busy {
    fn doing(self) -> &'static str {
        match self {
            Busy::Starting => "starting",
            Busy::Pausing => "pausing",
            Busy::Resuming => "resuming",
            Busy::Deleting => "being deleted",
        }
    }
}

/// A process's state as containerd sees it, and the call in flight on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Lifecycle {
    /// "container c1" or "exec e1", for errors.
    what: String,
    status: Status,
    busy: Option<Busy>,
    /// Reaped, its exit waiting for its output: its pid may belong to another process now.
    reaped: bool,
}

impl Lifecycle {
    /// A container's init, created.
    pub(super) fn init(id: &str) -> Self {
        Self::new(format!("container {id}"))
    }

    /// An exec, added.
    pub(super) fn exec(exec_id: &str) -> Self {
        Self::new(format!("exec {exec_id}"))
    }

    fn new(what: String) -> Self {
        Lifecycle {
            what,
            status: Status::CREATED,
            busy: None,
            reaped: false,
        }
    }

    pub(super) fn status(&self) -> Status {
        self.status
    }

    /// "running", "created (starting)", "stopped (reaped)": for the state report.
    #[cold]
    pub(super) fn describe(&self) -> String {
        let mut s = format!("{:?}", self.status).to_lowercase();
        if let Some(busy) = self.busy {
            s = format!("{s} ({})", busy.doing());
        }
        if self.reaped && self.status != Status::STOPPED {
            s.push_str(" (reaped)");
        }
        s
    }

    /// Reaped (or its exit reported): its pid is not to be signalled.
    pub(super) fn is_reaped(&self) -> bool {
        self.reaped
    }

    /// Running and not reaped: its pid is still its own.
    pub(super) fn live(&self) -> bool {
        self.status == Status::RUNNING && !self.reaped
    }

    fn refuse(&self, why: &str) -> Error {
        Error::FailedPrecondition(format!("{} {why}", self.what))
    }

    fn idle(&self) -> Result<()> {
        match self.busy {
            Some(b) => Err(self.refuse(&format!("is {}", b.doing()))),
            None => Ok(()),
        }
    }

    /// `Start`: only a created process, once.
    pub(super) fn begin_start(&mut self) -> Result<()> {
        self.idle()?;
        if self.status != Status::CREATED {
            return Err(self.refuse("is already started"));
        }
        self.busy = Some(Busy::Starting);
        Ok(())
    }

    /// `Pause`: only a running process.
    pub(super) fn begin_pause(&mut self) -> Result<()> {
        self.idle()?;
        match self.status {
            Status::RUNNING => {
                self.busy = Some(Busy::Pausing);
                Ok(())
            }
            Status::PAUSED => Err(self.refuse("is already paused")),
            _ => Err(self.refuse("is not running")),
        }
    }

    /// `Resume`: only a paused process.
    pub(super) fn begin_resume(&mut self) -> Result<()> {
        self.idle()?;
        match self.status {
            Status::PAUSED => {
                self.busy = Some(Busy::Resuming);
                Ok(())
            }
            _ => Err(self.refuse("is not paused")),
        }
    }

    /// `Delete`: a process that is not running (created, or stopped).
    pub(super) fn check_delete(&self) -> Result<()> {
        self.idle()?;
        match self.status {
            Status::RUNNING | Status::PAUSED => Err(self.refuse("is running; kill it first")),
            _ => Ok(()),
        }
    }

    /// `Delete` of an init, whose backend call runs unlocked.
    pub(super) fn begin_delete(&mut self) -> Result<()> {
        self.check_delete()?;
        self.busy = Some(Busy::Deleting);
        Ok(())
    }

    /// The call begun last is over: on success the process moves on, unless it exited
    /// meanwhile (a stopped process stays stopped).
    pub(super) fn end(&mut self, ok: bool) {
        let Some(busy) = self.busy.take() else {
            return;
        };
        if !ok {
            return;
        }
        self.status = match (busy, self.status) {
            (Busy::Starting, Status::CREATED) => Status::RUNNING,
            (Busy::Pausing, Status::RUNNING) => Status::PAUSED,
            (Busy::Resuming, Status::PAUSED) => Status::RUNNING,
            (_, status) => status,
        };
    }

    /// `Kill`: a finished process is `NotFound`, unless `all` (its container's others may
    /// live on); an exec must have started.
    pub(super) fn check_kill(&self, all: bool) -> Result<()> {
        let gone = || Error::NotFound(format!("{}: process already finished", self.what));
        if self.status == Status::STOPPED && !all {
            return Err(gone());
        }
        if self.what.starts_with("exec ") {
            if self.reaped {
                return Err(gone());
            }
            if self.status == Status::CREATED {
                return Err(self.refuse("is not started"));
            }
        }
        Ok(())
    }

    /// Reaped: never signalled again.
    pub(super) fn reap(&mut self) {
        self.reaped = true;
    }

    /// Its exit is applied.
    pub(super) fn stop(&mut self) {
        self.status = Status::STOPPED;
    }

    /// An exit reaped now is applied only after the call in flight published its event
    /// (a start's exit after its start).
    pub(super) fn holds_exits(&self) -> bool {
        self.busy == Some(Busy::Starting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: Result<()>) -> ttrpc::Code {
        r.unwrap_err().code()
    }

    fn running() -> Lifecycle {
        let mut p = Lifecycle::init("c");
        p.begin_start().unwrap();
        p.end(true);
        p
    }

    #[test]
    fn start_once_from_created_and_only_when_idle() {
        let mut p = Lifecycle::init("c");
        assert_eq!(p.status(), Status::CREATED);
        p.begin_start().unwrap();
        assert!(p.holds_exits());
        let again = p.begin_start().unwrap_err().to_string();
        assert!(again.contains("container c is starting"), "{again}");
        assert_eq!(code(p.check_delete()), ttrpc::Code::FAILED_PRECONDITION);
        p.end(true);
        assert_eq!(p.status(), Status::RUNNING);
        assert!(!p.holds_exits());
        let again = p.begin_start().unwrap_err().to_string();
        assert!(again.contains("already started"), "{again}");
    }

    #[test]
    fn a_failed_call_leaves_the_state_as_it_was() {
        let mut p = Lifecycle::exec("e");
        p.begin_start().unwrap();
        p.end(false);
        assert_eq!(p.status(), Status::CREATED);
        p.begin_start().unwrap();
        let mut p = running();
        p.begin_pause().unwrap();
        p.end(false);
        assert_eq!(p.status(), Status::RUNNING);
    }

    #[test]
    fn pause_and_resume_in_turn() {
        let mut p = running();
        assert_eq!(code(p.begin_resume()), ttrpc::Code::FAILED_PRECONDITION);
        p.begin_pause().unwrap();
        let busy = p.begin_resume().unwrap_err().to_string();
        assert!(busy.contains("is pausing"), "{busy}");
        p.end(true);
        assert_eq!(p.status(), Status::PAUSED);
        let again = p.begin_pause().unwrap_err().to_string();
        assert!(again.contains("already paused"), "{again}");
        assert_eq!(code(p.check_delete()), ttrpc::Code::FAILED_PRECONDITION);
        p.begin_resume().unwrap();
        p.end(true);
        assert_eq!(p.status(), Status::RUNNING);
        let created = Lifecycle::init("c").begin_pause().unwrap_err().to_string();
        assert!(created.contains("is not running"), "{created}");
    }

    #[test]
    fn an_exit_during_a_call_wins_over_its_outcome() {
        let mut starting = Lifecycle::init("c");
        starting.begin_start().unwrap();
        let mut pausing = running();
        pausing.begin_pause().unwrap();
        for mut p in [starting, pausing] {
            p.reap();
            p.stop();
            p.end(true);
            assert_eq!(p.status(), Status::STOPPED);
        }
        let mut p = running();
        p.begin_pause().unwrap();
        p.end(true);
        p.begin_resume().unwrap();
        p.stop();
        p.end(true);
        assert_eq!(p.status(), Status::STOPPED);
    }

    #[test]
    fn delete_only_what_is_not_running_and_not_twice_at_once() {
        let mut p = Lifecycle::init("c");
        p.begin_delete().unwrap();
        let twice = p.begin_delete().unwrap_err().to_string();
        assert!(twice.contains("container c is being deleted"), "{twice}");
        let start = p.begin_start().unwrap_err().to_string();
        assert!(start.contains("being deleted"), "{start}");
        let mut p = running();
        let r = p.begin_delete().unwrap_err().to_string();
        assert!(r.contains("is running; kill it first"), "{r}");
        p.stop();
        p.begin_delete().unwrap();
    }

    #[test]
    fn kill_refuses_what_is_finished_or_not_started() {
        let mut init = running();
        init.check_kill(false).unwrap();
        init.stop();
        assert_eq!(code(init.check_kill(false)), ttrpc::Code::NOT_FOUND);
        init.check_kill(true).unwrap();
        let mut exec = Lifecycle::exec("e");
        assert_eq!(
            code(exec.check_kill(false)),
            ttrpc::Code::FAILED_PRECONDITION
        );
        exec.begin_start().unwrap();
        exec.end(true);
        exec.check_kill(false).unwrap();
        assert!(exec.live());
        exec.reap();
        assert!(!exec.live());
        let gone = exec.check_kill(true).unwrap_err().to_string();
        assert!(gone.contains("exec e: process already finished"), "{gone}");
    }
}
