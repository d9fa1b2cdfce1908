//! A process's stdio from the service's side: staged before the runtime runs, finished
//! once it created the process.

use super::*;

/// The shim's side of a process's stdio.
pub(super) enum Io {
    Pipes(ProcessIo),
    Console(Console),
    /// The backend's ([`Backend::HOST_STDIO`] `= false`).
    Carried(Drain),
}

impl Io {
    pub(super) fn drain(&self) -> &Drain {
        match self {
            Io::Pipes(io) => io.drain(),
            Io::Console(console) => console.drain(),
            Io::Carried(drain) => drain,
        }
    }
}

/// Stdio set up before the runtime runs: pipes are ready; a terminal arrives later through
/// the console socket.
pub(super) enum PendingIo {
    Pipes(ProcessIo),
    Console(ConsoleSocket),
    Carried(CarriedStdio),
}

impl PendingIo {
    /// `host`: [`Backend::HOST_STDIO`]; otherwise nothing is opened here.
    pub(super) fn open(
        host: bool,
        paths: &StdioPaths,
        owner: IoOwner,
        ctx: IoContext<'_>,
    ) -> Result<(PendingIo, ChildStdio)> {
        if !host {
            let carried = CarriedStdio::new(paths.clone());
            return Ok((PendingIo::Carried(carried), ChildStdio::default()));
        }
        if paths.terminal {
            return Ok((
                PendingIo::Console(ConsoleSocket::new()?),
                ChildStdio::default(),
            ));
        }
        let (io, stdio) = ProcessIo::open(paths, owner, ctx)?;
        Ok((PendingIo::Pipes(io), stdio))
    }

    pub(super) fn console_socket(&self) -> Option<&std::path::Path> {
        match self {
            PendingIo::Console(s) => Some(s.path()),
            PendingIo::Pipes(_) | PendingIo::Carried(_) => None,
        }
    }

    /// The backend's share of stdio it carries itself.
    pub(super) fn carried(&self) -> Option<CarriedStdio> {
        match self {
            PendingIo::Carried(c) => Some(c.clone()),
            _ => None,
        }
    }

    /// Completes the set-up once the runtime created the process.
    pub(super) fn finish(self, paths: &StdioPaths) -> Result<Io> {
        match self {
            PendingIo::Pipes(io) => Ok(Io::Pipes(io)),
            PendingIo::Carried(c) => Ok(Io::Carried(c.drain().clone())),
            PendingIo::Console(sock) => {
                let master = sock.receive_master(std::time::Duration::from_secs(10))?;
                Ok(Io::Console(Console::start(master, paths)?))
            }
        }
    }
}
