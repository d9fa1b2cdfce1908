//! The guest's half of stdio: for each process, fifos that the guest task service opens as
//! if they were containerd's, and the agent's calls that carry their bytes to the host.
//!
//! Output is pulled: the host keeps one `ReadStdio` pending per stream, answered as soon
//! as the fifo has bytes (all that gathered meanwhile, up to [`CHUNK`]). A host that
//! stops asking leaves at most [`BUFFERED`] bytes here, then the fifo fills and the guest
//! task service's copy waits: nothing is dropped. Input is pushed: `WriteStdin` is
//! answered at once while fewer than [`BUFFERED`] bytes wait for the process, later
//! otherwise. Pending answers cost no thread ([`Reply`]).
//!
//! Both directions count bytes, so a call repeated on a new connection (the host dialled
//! again after its connection was cut, not knowing whether the answer was sent) neither
//! loses nor doubles any: `ReadStdio` names how much of the stream the host has, and the
//! agent keeps its last answer until a call asks past it; `WriteStdin` names where its
//! bytes start, and what the agent already took is not taken again.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use protobuf::well_known_types::empty::Empty;
use protocol::agent::{
    OpenStdioRequest, OpenStdioResponse, ReadStdioRequest, ReadStdioResponse, StdioRequest,
    StdioWrittenResponse, Stream, WriteStdinRequest,
};
use shim_common::rpc::{self, decode, Methods, Reply};
use shim_common::{Context, Error, Result};

use crate::stoppable::{wait_readable, Woke};

/// The most one `ReadStdio` answer carries.
pub const CHUNK: usize = 1 << 20;
/// Bytes of one stream held in the agent, beyond the fifo's own buffer.
pub const BUFFERED: usize = 4 << 20;

/// The size asked for each output fifo's buffer.
const FIFO_SIZE: usize = 1 << 20;

/// One process: its container and exec id (empty for the init).
type Key = (String, String);

/// The stdio of every process, by container and exec id.
pub struct Streams {
    dir: PathBuf,
    procs: Mutex<HashMap<Key, Arc<Carried>>>,
}

/// What one process's stdio is carried through.
struct Carried {
    dir: PathBuf,
    stdin: Option<Arc<Inbound>>,
    stdout: Option<Arc<Outbound>>,
    stderr: Option<Arc<Outbound>>,
}

impl Streams {
    /// Stdio whose fifos live under `dir` (a tmpfs of the guest).
    pub fn new(dir: &Path) -> Arc<Streams> {
        Arc::new(Streams {
            dir: dir.to_path_buf(),
            procs: Mutex::new(HashMap::new()),
        })
    }

    /// The agent's stdio methods, to serve beside the task service.
    pub fn methods(self: &Arc<Self>) -> Methods {
        let mut m = Methods::new();
        let method = |name: &str| format!("/{}/{name}", protocol::AGENT_SERVICE);
        let me = self.clone();
        m.insert(
            method("OpenStdio"),
            rpc::unary(move |req: OpenStdioRequest| Ok(me.open(&req)?)),
        );
        let me = self.clone();
        m.insert(
            method("ReadStdio"),
            Box::new(move |req, reply| match decode::<ReadStdioRequest>(&req) {
                Ok(req) => me.read(&req, reply),
                Err(e) => reply.send::<Empty>(Err(e)),
            }),
        );
        let me = self.clone();
        m.insert(
            method("StdioWritten"),
            rpc::unary(move |req: StdioRequest| {
                let carried = me.get(&req.container_id, &req.exec_id)?;
                let written = |s: &Option<Arc<Outbound>>| s.as_ref().map_or(0, |s| s.written());
                Ok(StdioWrittenResponse {
                    stdout: written(&carried.stdout),
                    stderr: written(&carried.stderr),
                    ..Default::default()
                })
            }),
        );
        let me = self.clone();
        m.insert(
            method("WriteStdin"),
            Box::new(move |req, reply| match decode::<WriteStdinRequest>(&req) {
                Ok(req) => me.write(req, reply),
                Err(e) => reply.send::<Empty>(Err(e)),
            }),
        );
        let me = self.clone();
        m.insert(
            method("CloseStdin"),
            rpc::unary(move |req: StdioRequest| {
                let carried = me.get(&req.container_id, &req.exec_id)?;
                if let Some(stdin) = &carried.stdin {
                    stdin.close();
                }
                Ok(Empty::new())
            }),
        );
        let me = self.clone();
        m.insert(
            method("CloseStdio"),
            rpc::unary(move |req: StdioRequest| {
                match req.exec_id.is_empty() {
                    true => me.forget_container(&req.container_id),
                    false => me.forget(&req.container_id, &req.exec_id),
                }
                Ok(Empty::new())
            }),
        );
        m
    }

    /// Makes the process's fifos and starts carrying them. A second open of one process
    /// replaces the first (a Create retried after a failure).
    fn open(&self, req: &OpenStdioRequest) -> Result<OpenStdioResponse> {
        let key = (req.container_id.clone(), req.exec_id.clone());
        self.forget(&key.0, &key.1);
        let exec = if req.exec_id.is_empty() {
            "init"
        } else {
            &req.exec_id
        };
        for part in [&req.container_id, &req.exec_id] {
            if part.contains('/') || part.starts_with('.') {
                return Err(Error::InvalidArgument(format!("bad process id {part:?}")));
            }
        }
        let dir = self.dir.join(&req.container_id).join(exec);
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let opened = (|| -> Result<(Carried, OpenStdioResponse)> {
            let mut res = OpenStdioResponse::new();
            let mut carried = Carried {
                dir: dir.clone(),
                stdin: None,
                stdout: None,
                stderr: None,
            };
            if req.stdin {
                let path = make_fifo(&dir, "stdin")?;
                carried.stdin = Some(Inbound::start(path.clone())?);
                res.stdin = path_string(&path);
            }
            if req.stdout {
                let path = make_fifo(&dir, "stdout")?;
                carried.stdout = Some(Outbound::start(&path)?);
                res.stdout = path_string(&path);
            }
            if req.stderr {
                let path = make_fifo(&dir, "stderr")?;
                carried.stderr = Some(Outbound::start(&path)?);
                res.stderr = path_string(&path);
            }
            Ok((carried, res))
        })();
        match opened {
            Ok((carried, res)) => {
                lock(&self.procs).insert(key, Arc::new(carried));
                Ok(res)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn get(&self, container: &str, exec: &str) -> Result<Arc<Carried>> {
        lock(&self.procs)
            .get(&(container.to_string(), exec.to_string()))
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("stdio of {container}/{exec:?}")))
    }

    fn read(&self, req: &ReadStdioRequest, reply: Reply) {
        let stream = self.get(&req.container_id, &req.exec_id).and_then(|c| {
            let s = match req.stream.enum_value_or_default() {
                Stream::STDOUT => c.stdout.clone(),
                Stream::STDERR => c.stderr.clone(),
            };
            s.ok_or_else(|| Error::NotFound(format!("{:?} of {}", req.stream, req.container_id)))
        });
        match stream {
            Ok(stream) => stream.ask(req.offset, reply),
            Err(e) => reply.send::<Empty>(Err(e.into())),
        }
    }

    fn write(&self, req: WriteStdinRequest, reply: Reply) {
        let stdin = self.get(&req.container_id, &req.exec_id).and_then(|c| {
            c.stdin
                .clone()
                .ok_or_else(|| Error::NotFound(format!("stdin of {}", req.container_id)))
        });
        match stdin {
            Ok(stdin) => stdin.push(req.offset, req.data, reply),
            Err(e) => reply.send::<Empty>(Err(e.into())),
        }
    }

    /// Stops carrying a process's stdio and removes its fifos.
    fn forget(&self, container: &str, exec: &str) {
        let gone = lock(&self.procs).remove(&(container.to_string(), exec.to_string()));
        if let Some(carried) = gone {
            carried.forget();
        }
    }

    /// [`Streams::forget`] for the container's every process (the container is deleted:
    /// an exec it still had is gone with it), and its directory.
    fn forget_container(&self, container: &str) {
        let gone: Vec<Arc<Carried>> = {
            let mut procs = lock(&self.procs);
            let keys: Vec<Key> = procs.keys().filter(|k| k.0 == container).cloned().collect();
            keys.iter().filter_map(|k| procs.remove(k)).collect()
        };
        for carried in gone {
            carried.forget();
        }
        if !container.is_empty() && !container.contains('/') && !container.starts_with('.') {
            let _ = fs::remove_dir_all(self.dir.join(container));
        }
    }
}

impl Carried {
    fn forget(&self) {
        if let Some(s) = &self.stdin {
            s.abandon();
        }
        for s in [&self.stdout, &self.stderr].into_iter().flatten() {
            s.abandon();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn make_fifo(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    let _ = fs::remove_file(&path);
    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(std::io::Error::from)
        .with_context(|| format!("mkfifo {}", path.display()))?;
    Ok(path)
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One output stream: a fifo the task service writes, read here until every writer closed.
struct Outbound {
    state: Mutex<Out>,
    room: Condvar,
    /// The fifo's reading end: whoever reads it holds this until the bytes are in `state`,
    /// so two readers (the reader thread, a `StdioWritten`) never reorder them.
    reader: Mutex<Reader>,
    /// Written to (or closed) to stop the reader early.
    stop: File,
}

struct Reader {
    fifo: File,
    chunk: Vec<u8>,
}

/// What one read of the fifo found.
enum Pulled {
    Bytes,
    Nothing,
    /// Every writer closed it (or it failed): the stream is over.
    End,
}

#[derive(Default)]
struct Out {
    /// Bytes read and not yet asked for. A `Vec`, not a ring: every copy in and out is one
    /// `memcpy`, which matters under TCG, where a byte-by-byte copy costs ~50 ns.
    buf: Vec<u8>,
    /// The last answer's bytes, kept until the host asks past them.
    sent: Vec<u8>,
    /// Where `sent` starts in the stream.
    sent_at: u64,
    eof: bool,
    /// The host's pending `ReadStdio`.
    waiting: Option<Reply>,
    abandoned: bool,
}

impl Outbound {
    /// Opens `path` for reading (without waiting for a writer) and starts the reader.
    fn start(path: &Path) -> Result<Arc<Outbound>> {
        let fifo = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .with_context(|| format!("open {}", path.display()))?;
        // Fewer, larger handovers between the task service's copy and ours: each wakeup is
        // a context switch on a TCG vCPU. Best effort (the default is 64 KiB).
        let _ = shim_common::set_pipe_size(&fifo, FIFO_SIZE);
        let polled = fifo.try_clone().context("duplicate the stdio fifo")?;
        let (stop_r, stop_w) = std::io::pipe().context("create stop pipe")?;
        let out = Arc::new(Outbound {
            state: Mutex::new(Out::default()),
            room: Condvar::new(),
            reader: Mutex::new(Reader {
                fifo,
                chunk: vec![0u8; FIFO_SIZE],
            }),
            stop: File::from(std::os::fd::OwnedFd::from(stop_w)),
        });
        let me = out.clone();
        let name = format!("out:{}", path.display());
        std::thread::Builder::new()
            .name(name)
            .spawn(move || me.carry(polled, stop_r))
            .context("spawn stdio reader")?;
        Ok(out)
    }

    /// Reads the fifo (`polled` is its duplicate to wait on) until its writers are gone
    /// (the process and everything sharing its output exited). Before the first writer, a
    /// fifo polls neither readable nor hung up.
    fn carry(&self, polled: File, stop: std::io::PipeReader) {
        // Woken by the task service's copy without preempting it (see
        // `shim_common::stdio::batch_output`), then one read takes all it wrote.
        if let Err(e) = shim_common::batch_this_thread() {
            log::debug!("{e}");
        }
        loop {
            match wait_readable(polled.as_fd(), stop.as_fd()) {
                Ok(Woke::Readable) => {}
                Ok(Woke::Stopped) => break,
                Err(e) => {
                    log::warn!("poll stdio fifo: {e}");
                    break;
                }
            }
            match self.pull(&mut lock(&self.reader)) {
                Pulled::Bytes => {}
                Pulled::Nothing => continue,
                Pulled::End => break,
            }
            let mut s = lock(&self.state);
            while s.buf.len() >= BUFFERED && !s.abandoned {
                s = self.room.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            if s.abandoned {
                break;
            }
        }
        let mut s = lock(&self.state);
        s.eof = true;
        if let Some(reply) = s.waiting.take() {
            reply.send(Ok(Self::take(&mut s)));
        }
    }

    /// One read of the fifo into `buf`, answering a waiting `ReadStdio` with it.
    fn pull(&self, r: &mut Reader) -> Pulled {
        let n = match r.fifo.read(&mut r.chunk) {
            Ok(0) => return Pulled::End,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Pulled::Nothing,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Pulled::Nothing,
            Err(e) => {
                log::warn!("read stdio fifo: {e}");
                return Pulled::End;
            }
        };
        let mut s = lock(&self.state);
        s.buf.extend_from_slice(&r.chunk[..n]);
        if let Some(reply) = s.waiting.take() {
            reply.send(Ok(Self::take(&mut s)));
        }
        Pulled::Bytes
    }

    /// How many bytes of the stream the agent has had, once it read what the fifo holds
    /// now (bounded, should writers keep writing). A fifo without writers reads as empty
    /// here; the reader thread tells its end.
    fn written(&self) -> u64 {
        {
            let mut r = lock(&self.reader);
            for _ in 0..64 {
                if !matches!(self.pull(&mut r), Pulled::Bytes) {
                    break;
                }
            }
        }
        let s = lock(&self.state);
        s.sent_at + (s.sent.len() + s.buf.len()) as u64
    }

    /// Up to [`CHUNK`] of what gathered, kept as `sent` (which was let go of); eof once
    /// nothing is left after it.
    fn take(s: &mut Out) -> ReadStdioResponse {
        let data = if s.buf.len() <= CHUNK {
            std::mem::take(&mut s.buf)
        } else {
            let rest = s.buf.split_off(CHUNK);
            std::mem::replace(&mut s.buf, rest)
        };
        s.sent_at += s.sent.len() as u64;
        s.sent = data.clone();
        ReadStdioResponse {
            data,
            eof: s.eof && s.buf.is_empty(),
            offset: s.sent_at,
            ..Default::default()
        }
    }

    /// A `ReadStdio` from a host that has `offset` bytes: the last answer again if it did
    /// not get it, else answered now if there is something to say, else when there is. A
    /// second one replaces the first, whose caller gave up on it.
    fn ask(&self, offset: u64, reply: Reply) {
        let mut s = lock(&self.state);
        let sent_end = s.sent_at + s.sent.len() as u64;
        if offset == sent_end {
            s.sent_at = sent_end;
            s.sent.clear();
        } else if offset != s.sent_at {
            let msg = format!(
                "ReadStdio from byte {offset}: the agent holds bytes {}..{sent_end} of the stream",
                s.sent_at
            );
            drop(s);
            return reply.send::<Empty>(Err(Error::InvalidArgument(msg).into()));
        }
        if !s.sent.is_empty() {
            let res = ReadStdioResponse {
                data: s.sent.clone(),
                eof: s.eof && s.buf.is_empty(),
                offset: s.sent_at,
                ..Default::default()
            };
            drop(s);
            reply.send(Ok(res));
        } else if !s.buf.is_empty() || s.eof {
            let res = Self::take(&mut s);
            drop(s);
            self.room.notify_all();
            reply.send(Ok(res));
        } else {
            s.waiting = Some(reply);
        }
    }

    fn abandon(&self) {
        let mut s = lock(&self.state);
        s.abandoned = true;
        s.buf.clear();
        s.sent.clear();
        drop(s);
        self.room.notify_all();
        let _ = (&self.stop).write_all(b"x");
    }
}

/// A process's stdin: bytes from the host written into the fifo the task service reads.
struct Inbound {
    path: PathBuf,
    state: Mutex<In>,
    changed: Condvar,
}

#[derive(Default)]
struct In {
    queue: VecDeque<Vec<u8>>,
    queued: usize,
    /// Bytes taken from the host so far: where the next `WriteStdin` starts.
    taken: u64,
    /// A `WriteStdin` answered once the queue is below [`BUFFERED`].
    parked: Option<Reply>,
    closed: bool,
    /// The process's side is gone: what comes is dropped.
    broken: bool,
}

impl Inbound {
    fn start(path: PathBuf) -> Result<Arc<Inbound>> {
        let me = Arc::new(Inbound {
            path,
            state: Mutex::new(In::default()),
            changed: Condvar::new(),
        });
        let it = me.clone();
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || it.carry())
            .context("spawn stdin writer")?;
        Ok(me)
    }

    fn carry(&self) {
        // Waits for the task service to open its reader (at Create or Exec).
        let mut fifo = match OpenOptions::new().write(true).open(&self.path) {
            Ok(f) => Some(f),
            Err(e) => {
                log::warn!("open {}: {e}", self.path.display());
                None
            }
        };
        loop {
            let mut s = lock(&self.state);
            while s.queue.is_empty() && !s.closed {
                s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            let Some(data) = s.queue.pop_front() else {
                break; // closed, and everything written
            };
            drop(s);
            let ok = match fifo.as_mut() {
                Some(f) => f.write_all(&data).is_ok(),
                None => false,
            };
            let mut s = lock(&self.state);
            s.queued -= data.len();
            if !ok {
                s.broken = true;
                s.queue.clear();
                s.queued = 0;
            }
            if s.queued < BUFFERED {
                if let Some(reply) = s.parked.take() {
                    reply.send(Ok(Empty::new()));
                }
            }
        }
        // Dropping the writer: the task service's copy sees EOF once its own is closed.
        drop(fifo);
    }

    /// `data`, which starts at byte `offset` of the stream: only what was not taken before.
    fn push(&self, offset: u64, mut data: Vec<u8>, reply: Reply) {
        let mut s = lock(&self.state);
        if s.closed {
            drop(s);
            let msg = format!("{}: stdin is closed", self.path.display());
            return reply.send::<Empty>(Err(Error::FailedPrecondition(msg).into()));
        }
        if offset > s.taken {
            let msg = format!(
                "WriteStdin from byte {offset}: the agent has {} bytes of this stdin",
                s.taken
            );
            drop(s);
            return reply.send::<Empty>(Err(Error::InvalidArgument(msg).into()));
        }
        let already = usize::try_from(s.taken - offset).unwrap_or(usize::MAX);
        if already >= data.len() {
            drop(s);
            return reply.send(Ok(Empty::new()));
        }
        data.drain(..already);
        s.taken += data.len() as u64;
        if !s.broken {
            s.queued += data.len();
            s.queue.push_back(data);
        }
        let full = s.queued >= BUFFERED;
        if full {
            s.parked = Some(reply);
            drop(s);
            self.changed.notify_all();
        } else {
            drop(s);
            self.changed.notify_all();
            reply.send(Ok(Empty::new()));
        }
    }

    fn close(&self) {
        lock(&self.state).closed = true;
        self.changed.notify_all();
    }

    /// Ends the writer even if no reader ever came: a reader of our own lets its open
    /// return.
    fn abandon(&self) {
        {
            let mut s = lock(&self.state);
            s.closed = true;
            s.broken = true;
            s.queue.clear();
            s.queued = 0;
        }
        self.changed.notify_all();
        let _ = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shim_common::rpc::{Client, Server};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    const T: Duration = Duration::from_secs(20);

    fn serve(dir: &Path) -> Client {
        let (ours, theirs) = UnixStream::pair().unwrap();
        Server::new(Streams::new(dir).methods())
            .spawn(None, vec![theirs.into()])
            .unwrap();
        Client::new(ours.into()).unwrap()
    }

    fn call<M: protobuf::Message>(c: &Client, method: &str, req: &impl protobuf::Message) -> M {
        c.call_as(protocol::AGENT_SERVICE, method, req, T).unwrap()
    }

    fn read_all(c: &Client, container: &str, stream: Stream) -> Vec<u8> {
        let mut all = Vec::new();
        loop {
            let req = ReadStdioRequest {
                container_id: container.into(),
                stream: stream.into(),
                offset: all.len() as u64,
                ..Default::default()
            };
            let got: ReadStdioResponse = call(c, "ReadStdio", &req);
            assert_eq!(got.offset, all.len() as u64);
            all.extend(got.data);
            if got.eof {
                return all;
            }
        }
    }

    /// The error a `ReadStdio` of `container`'s stdout from `offset` gets.
    fn read_error(c: &Client, container: &str, offset: u64) -> String {
        let req = ReadStdioRequest {
            container_id: container.into(),
            offset,
            ..Default::default()
        };
        c.call(protocol::AGENT_SERVICE, "ReadStdio", &req, T)
            .unwrap_err()
            .to_string()
    }

    fn open(c: &Client, id: &str) -> OpenStdioResponse {
        call(
            c,
            "OpenStdio",
            &OpenStdioRequest {
                container_id: id.into(),
                stdin: true,
                stdout: true,
                stderr: true,
                ..Default::default()
            },
        )
    }

    /// Plays the guest task service's side of an output fifo.
    fn writer(path: &str) -> File {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .and_then(|f| {
                nix::fcntl::fcntl(
                    std::os::fd::AsRawFd::as_raw_fd(&f),
                    nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_WRONLY),
                )?;
                Ok(f)
            })
            .unwrap()
    }

    #[test]
    fn output_reaches_the_host_whole_and_in_order_then_eof() {
        let tmp = tempfile::tempdir().unwrap();
        let c = serve(tmp.path());
        let paths = open(&c, "c1");
        let (out, err) = (paths.stdout.clone(), paths.stderr.clone());
        // 12 MiB: three times what the agent buffers, so the writer waits for the host.
        let data: Vec<u8> = (0..12u32 << 20).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let w = std::thread::spawn(move || {
            let mut f = writer(&out);
            f.write_all(&data).unwrap();
            writer(&err).write_all(b"oops\n").unwrap();
        });
        assert_eq!(read_all(&c, "c1", Stream::STDOUT), expected);
        assert_eq!(read_all(&c, "c1", Stream::STDERR), b"oops\n");
        w.join().unwrap();
    }

    #[test]
    fn stdin_is_written_in_order_and_ends_at_close_stdin() {
        let tmp = tempfile::tempdir().unwrap();
        let c = serve(tmp.path());
        let paths = open(&c, "c1");
        let mut reader = OpenOptions::new().read(true).open(&paths.stdin).unwrap();
        let mut offset = 0u64;
        let mut req = |data: &[u8]| {
            offset += data.len() as u64;
            WriteStdinRequest {
                container_id: "c1".into(),
                data: data.to_vec(),
                offset: offset - data.len() as u64,
                ..Default::default()
            }
        };
        let big = vec![7u8; 6 << 20];
        let got = std::thread::spawn(move || {
            let mut all = Vec::new();
            reader.read_to_end(&mut all).unwrap();
            all
        });
        let _: Empty = call(&c, "WriteStdin", &req(b"first "));
        // More than the agent queues (no reader yet): the last answers wait for room.
        for piece in big.chunks(1 << 20) {
            let _: Empty = call(&c, "WriteStdin", &req(piece));
        }
        let _: Empty = call(&c, "WriteStdin", &req(b" last"));
        let close = StdioRequest {
            container_id: "c1".into(),
            ..Default::default()
        };
        let _: Empty = call(&c, "CloseStdin", &close);
        let all = got.join().unwrap();
        assert_eq!(all.len(), 6 + big.len() + 5);
        assert!(all.starts_with(b"first ") && all.ends_with(b" last"));
        let e = c
            .call(protocol::AGENT_SERVICE, "WriteStdin", &req(b"late"), T)
            .unwrap_err()
            .to_string();
        assert!(e.contains("stdin is closed"), "{e}");
    }

    #[test]
    fn stdio_written_counts_what_the_fifos_hold_before_anyone_read_it() {
        let tmp = tempfile::tempdir().unwrap();
        let c = serve(tmp.path());
        let paths = open(&c, "c1");
        let req = StdioRequest {
            container_id: "c1".into(),
            ..Default::default()
        };
        let none: StdioWrittenResponse = call(&c, "StdioWritten", &req);
        assert_eq!((none.stdout, none.stderr), (0, 0));
        let (mut out, mut err) = (writer(&paths.stdout), writer(&paths.stderr));
        // More than one read of the fifo takes, and a little on stderr.
        let big = vec![7u8; FIFO_SIZE + 12_345];
        let w = std::thread::spawn(move || out.write_all(&big).map(|_| out));
        err.write_all(b"oops").unwrap();
        let out = w.join().unwrap().unwrap();
        let written: StdioWrittenResponse = call(&c, "StdioWritten", &req);
        assert_eq!(written.stdout, (FIFO_SIZE + 12_345) as u64);
        assert_eq!(written.stderr, 4);
        drop((out, err));
        assert_eq!(read_all(&c, "c1", Stream::STDOUT).len(), FIFO_SIZE + 12_345);
        assert_eq!(read_all(&c, "c1", Stream::STDERR), b"oops");
    }

    #[test]
    fn an_exec_is_forgotten_alone_and_the_container_with_all_its_processes() {
        let tmp = tempfile::tempdir().unwrap();
        let c = serve(tmp.path());
        let init = open(&c, "c1");
        let exec = |id: &str| -> OpenStdioResponse {
            let req = OpenStdioRequest {
                container_id: "c1".into(),
                exec_id: id.into(),
                stdout: true,
                ..Default::default()
            };
            call(&c, "OpenStdio", &req)
        };
        let (e1, e2) = (exec("e1"), exec("e2"));
        let forget = |exec: &str| {
            let req = StdioRequest {
                container_id: "c1".into(),
                exec_id: exec.into(),
                ..Default::default()
            };
            let _: Empty = call(&c, "CloseStdio", &req);
        };
        forget("e1");
        assert!(!Path::new(&e1.stdout).exists());
        assert!(Path::new(&e2.stdout).exists() && Path::new(&init.stdout).exists());
        // The id can be opened again, as containerd does when an exec id is reused.
        let again = exec("e1");
        assert_eq!(again.stdout, e1.stdout);
        forget("");
        for p in [&again.stdout, &e2.stdout, &init.stdout] {
            assert!(!Path::new(p).exists(), "{p} left");
        }
        assert!(!tmp.path().join("c1").exists());
    }

    #[test]
    fn forgetting_a_process_answers_its_pending_read_and_removes_its_fifos() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Arc::new(serve(tmp.path()));
        let paths = open(&c, "c1");
        // No writer ever comes (the Create failed): a pending read is answered at forget.
        let c2 = c.clone();
        let pending = std::thread::spawn(move || {
            let req = ReadStdioRequest {
                container_id: "c1".into(),
                ..Default::default()
            };
            c2.call_as::<ReadStdioResponse>(protocol::AGENT_SERVICE, "ReadStdio", &req, T)
        });
        let forget = StdioRequest {
            container_id: "c1".into(),
            ..Default::default()
        };
        // The read may not have arrived yet: forget answers it (eof), or it finds the
        // process gone (NotFound); either way nobody waits.
        let _: Empty = call(&c, "CloseStdio", &forget);
        match pending.join().unwrap() {
            Ok(got) => assert!(got.eof && got.data.is_empty(), "{got:?}"),
            Err(e) => assert!(e.to_string().contains("not found"), "{e}"),
        }
        assert!(!Path::new(&paths.stdout).exists());
        let e = read_error(&c, "c1", 0);
        assert!(e.contains("not found"), "{e}");
        let bad = OpenStdioRequest {
            container_id: "../x".into(),
            stdout: true,
            ..Default::default()
        };
        let e = c
            .call(protocol::AGENT_SERVICE, "OpenStdio", &bad, T)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad process id"), "{e}");
    }

    /// What a host that lost its connection does: asks again from where it was. Each
    /// byte arrives once, whichever answers were lost.
    #[test]
    fn calls_repeated_after_a_lost_answer_neither_lose_nor_double_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let c = serve(tmp.path());
        let paths = open(&c, "c1");
        let out = paths.stdout.clone();
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 253) as u8).collect();
        let expected = data.clone();
        let w = std::thread::spawn(move || writer(&out).write_all(&data).unwrap());
        let read = |offset: u64| -> ReadStdioResponse {
            let req = ReadStdioRequest {
                container_id: "c1".into(),
                offset,
                ..Default::default()
            };
            call(&c, "ReadStdio", &req)
        };
        let mut all: Vec<u8> = Vec::new();
        let mut answers = 0;
        loop {
            let got = read(all.len() as u64);
            answers += 1;
            if answers % 2 == 1 {
                // This answer "was lost": the same call again gets the same bytes.
                let again = read(all.len() as u64);
                assert_eq!((again.offset, &again.data), (got.offset, &got.data));
            }
            assert_eq!(got.offset, all.len() as u64);
            all.extend(&got.data);
            if got.eof {
                break;
            }
        }
        assert_eq!(all, expected);
        w.join().unwrap();
        let e = read_error(&c, "c1", 1);
        assert!(e.contains("from byte 1"), "{e}");

        let mut reader = OpenOptions::new().read(true).open(&paths.stdin).unwrap();
        let got = std::thread::spawn(move || {
            let mut all = Vec::new();
            reader.read_to_end(&mut all).unwrap();
            all
        });
        let write = |offset: u64, data: &[u8]| {
            let req = WriteStdinRequest {
                container_id: "c1".into(),
                data: data.to_vec(),
                offset,
                ..Default::default()
            };
            c.call(protocol::AGENT_SERVICE, "WriteStdin", &req, T)
        };
        write(0, b"hello ").unwrap();
        write(0, b"hello ").unwrap(); // repeated whole
        write(3, b"lo world").unwrap(); // repeated in part, with new bytes
        let e = write(100, b"gap").unwrap_err().to_string();
        assert!(e.contains("has 11 bytes"), "{e}");
        let close = StdioRequest {
            container_id: "c1".into(),
            ..Default::default()
        };
        let _: Empty = call(&c, "CloseStdin", &close);
        let _: Empty = call(&c, "CloseStdin", &close);
        assert_eq!(got.join().unwrap(), b"hello world");
    }
}
