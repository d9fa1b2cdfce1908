//! A ttrpc client that carries many calls at once over one connection.
//!
//! A micro-VM's host talks to its guest agent over a single virtio-serial stream, and
//! forwards containerd's task calls on it several at a time — among them `Wait`, which stays
//! open for as long as the task runs. So calls must not wait for each other's answers: each
//! takes the next odd stream id and writes its request as one whole frame (writers take
//! turns only for that), and one reader thread per client hands each response to the call
//! waiting on its id. A call's timeout covers its write and its answer; one that times out
//! forgets its id, so a late reply is dropped rather than given to someone else. A
//! connection that closes or breaks fails every call in flight, and every later one, at once.
//!
//! ```no_run
//! use std::os::unix::net::UnixStream;
//! use std::time::Duration;
//! use protobuf::well_known_types::wrappers::StringValue;
//! use shim_common::{rpc::Client, Context};
//!
//! # fn main() -> shim_common::Result<()> {
//! let agent = UnixStream::connect("/run/vm/agent.sock").context("connect to the agent")?;
//! let client = Client::new(agent.into())?;
//! let req = StringValue { value: "c1".into(), ..Default::default() };
//! std::thread::scope(|s| {
//!     // Open for minutes; the other calls go on beside it.
//!     let wait = s.spawn(|| client.call("t.Task", "Wait", &req, Duration::MAX));
//!     let _: StringValue = client.call_as("t.Task", "State", &req, Duration::from_secs(5))?;
//!     wait.join().map_err(|_| shim_common::Error::Runtime("Wait panicked".into()))?.map(drop)
//! })
//! # }
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ttrpc::proto::{Code, Codec, MESSAGE_TYPE_REQUEST, MESSAGE_TYPE_RESPONSE};
use ttrpc::{MessageHeader, Request, Response};

use super::frame;
use crate::error::{Context, Error, Result};

/// Bytes read from the connection per wakeup.
const READ_CHUNK: usize = 16 * 1024;
/// The reader only splits frames and hands them over; it needs little stack.
const READER_STACK: usize = 128 * 1024;

/// A ttrpc client over one connected byte stream, shared by any number of threads.
///
/// Calls made at once from several threads (`&Client` is `Sync`) are in flight together;
/// a slow one (`Wait`) holds up none of the others. Dropping the client stops its reader
/// thread and closes the connection.
///
/// ```no_run
/// use std::time::Duration;
/// use protobuf::well_known_types::empty::Empty;
/// use shim_common::rpc::Client;
///
/// # fn main() -> shim_common::Result<()> {
/// let client = Client::connect("unix:///run/containerd/containerd.sock.ttrpc")?;
/// let _: Empty = client.call_as("t.Health", "Check", &Empty::new(), Duration::from_secs(5))?;
/// # Ok(()) }
/// ```
pub struct Client {
    conn: Arc<Conn>,
    reader: Option<JoinHandle<()>>,
}

/// What the callers and the reader share.
struct Conn {
    /// Non-blocking. Read only by the reader; written by callers, one whole frame per turn.
    file: File,
    /// Whether a caller is writing a frame now; the others wait for `turn`, or their deadline.
    writing: Mutex<bool>,
    turn: Condvar,
    state: Mutex<State>,
    /// Shut down to stop the reader; its peer end is in the reader's poll set.
    wake: UnixStream,
}

struct State {
    next_id: u32,
    /// Calls waiting for their response, by stream id.
    pending: HashMap<u32, SyncSender<Vec<u8>>>,
    /// Why the connection can no longer be used, once it cannot.
    closed: Option<String>,
}

impl Client {
    /// Connects to `address`: a socket path, optionally prefixed with `unix://`.
    pub fn connect(address: &str) -> Result<Client> {
        let path = address.strip_prefix("unix://").unwrap_or(address);
        let stream = UnixStream::connect(path).context(format!("connect to {path}"))?;
        Client::new(stream.into())
    }

    /// A client on `fd`, a connected byte stream (a unix socket, a virtio-serial port) with
    /// a ttrpc server at the other end. Starts the reader thread; the fd is made
    /// non-blocking, so that no write outlasts its call's deadline.
    pub fn new(fd: OwnedFd) -> Result<Client> {
        Client::with_first_stream_id(fd, 1)
    }

    /// [`Client::new`], numbering its calls' streams from `first` (made odd, as a client's
    /// are) instead of 1. A peer that may still answer calls of an earlier connection on
    /// the same byte stream (a virtio-serial port that the next host opens before the guest
    /// saw the last one go) then answers stream ids this client never used, and those
    /// answers are dropped instead of taken for its own.
    pub fn with_first_stream_id(fd: OwnedFd, first: u32) -> Result<Client> {
        set_nonblocking(&fd)?;
        let (wake, woken) = UnixStream::pair().context("create ttrpc client wakeup pair")?;
        let conn = Arc::new(Conn {
            file: File::from(fd),
            writing: Mutex::new(false),
            turn: Condvar::new(),
            state: Mutex::new(State {
                // Client-initiated streams have odd ids.
                next_id: first | 1,
                pending: HashMap::new(),
                closed: None,
            }),
            wake,
        });
        let reader = {
            let conn = conn.clone();
            std::thread::Builder::new()
                .name("ttrpc-client".into())
                .stack_size(READER_STACK)
                .spawn(move || {
                    let why = conn.read_responses(&woken);
                    conn.fail(why);
                })
                .context("spawn ttrpc client reader")?
        };
        Ok(Client {
            conn,
            reader: Some(reader),
        })
    }

    /// Calls `/service/method` with `req` and returns the response payload.
    ///
    /// Waits up to `timeout` to send the request and get the answer (it goes along as the
    /// request's deadline), then fails with [`Error::DeadlineExceeded`]; `Duration::MAX`
    /// waits as long as the connection lives. A server's error status is [`Error::Remote`]
    /// with its code; a closed or broken connection is [`Error::Unavailable`]. A peer that
    /// stops reading in the middle of a request, for all of its `timeout`, leaves half a
    /// frame on the wire: that ends the connection for every call.
    pub fn call(
        &self,
        service: &str,
        method: &str,
        req: &impl protobuf::Message,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        // Within a traced request, the call is a client span, and carries it along (a
        // guest agent's span joins it).
        let span = crate::trace::client_span(service, method);
        let _current = span.enter();
        let res = self.call_untraced(service, method, req, timeout);
        span.answered(&res);
        res
    }

    fn call_untraced(
        &self,
        service: &str,
        method: &str,
        req: &impl protobuf::Message,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let what = format!("/{service}/{method}");
        let mut metadata = Vec::new();
        crate::trace::inject(&mut metadata);
        let request = Request {
            service: service.to_string(),
            method: method.to_string(),
            payload: req.write_to_bytes().context(format!("encode {what}"))?,
            // ttrpc's "no deadline" is 0.
            timeout_nano: i64::try_from(timeout.as_nanos()).unwrap_or(0),
            metadata,
            ..Default::default()
        };
        let payload = <Request as Codec>::encode(&request)
            .map_err(|e| Error::Runtime(format!("encode {what}: {e}")))?;
        // The server would close the connection on it, failing every other call too.
        if payload.len() > frame::MAX_PAYLOAD {
            let (n, max) = (payload.len(), frame::MAX_PAYLOAD);
            let msg = format!("{what}: request of {n} bytes exceeds ttrpc's {max}");
            return Err(Error::InvalidArgument(msg));
        }
        let deadline = Instant::now().checked_add(timeout);
        let late = || Error::DeadlineExceeded(format!("{what}: no reply within {timeout:?}"));
        let (tx, rx) = mpsc::sync_channel(1);
        let id = self
            .conn
            .register(tx)
            .map_err(|why| unavailable(&what, &why))?;
        match self.conn.send(id, &payload, deadline) {
            Ok(()) => {}
            Err(Unsent::Late) => {
                self.conn.forget(id);
                return Err(late());
            }
            Err(Unsent::Lost(why)) => return Err(unavailable(&what, &why)),
        }
        let got = match deadline {
            Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let body = match got {
            Ok(body) => body,
            Err(RecvTimeoutError::Timeout) => {
                self.conn.forget(id);
                // The answer may have come between the timeout and forgetting the id.
                match rx.try_recv() {
                    Ok(body) => body,
                    Err(_) => return Err(late()),
                }
            }
            // The reader dropped our sender: the connection is gone.
            Err(RecvTimeoutError::Disconnected) => {
                return Err(unavailable(&what, &self.conn.why_closed()))
            }
        };
        let res = <Response as Codec>::decode(&body)
            .map_err(|e| Error::Runtime(format!("decode {what} reply: {e}")))?;
        let status = res.status.as_ref();
        let code = status.map(|s| s.code()).unwrap_or(Code::OK);
        if code != Code::OK {
            let msg = status.map(|s| s.message.clone()).unwrap_or_default();
            return Err(Error::Remote {
                code,
                message: format!("{what}: {code:?}: {msg}"),
            });
        }
        Ok(res.payload)
    }

    /// [`call`](Client::call), with the response decoded as `M`.
    pub fn call_as<M: protobuf::Message>(
        &self,
        service: &str,
        method: &str,
        req: &impl protobuf::Message,
        timeout: Duration,
    ) -> Result<M> {
        let payload = self.call(service, method, req, timeout)?;
        M::parse_from_bytes(&payload).context(format!("decode /{service}/{method} response"))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.conn.fail("the client was dropped".into());
        if let Some(reader) = self.reader.take() {
            if reader.join().is_err() {
                log::error!("ttrpc client reader panicked");
            }
        }
    }
}

impl Conn {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A stream id for a new call, whose response goes to `tx`; why not, if closed.
    fn register(&self, tx: SyncSender<Vec<u8>>) -> Result<u32, String> {
        let mut st = self.state();
        if let Some(why) = &st.closed {
            return Err(why.clone());
        }
        // After 2^31 calls the ids wrap; skip any still waiting.
        let mut id = st.next_id;
        while st.pending.contains_key(&id) {
            id = id.wrapping_add(2);
        }
        st.next_id = id.wrapping_add(2);
        st.pending.insert(id, tx);
        Ok(id)
    }

    /// Drops a call that stopped waiting, so its late response is dropped too.
    fn forget(&self, id: u32) {
        self.state().pending.remove(&id);
    }

    fn why_closed(&self) -> String {
        self.state()
            .closed
            .clone()
            .unwrap_or_else(|| "the connection closed".into())
    }

    /// Writes one request frame, whole, by `deadline`. A write that failed, or stalled
    /// past the deadline after it began, has left part of a frame on the wire: that ends the
    /// connection for every call.
    fn send(&self, id: u32, payload: &[u8], deadline: Option<Instant>) -> Result<(), Unsent> {
        let frame = frame::encode(id, MESSAGE_TYPE_REQUEST, payload);
        let Some(_turn) = self.take_turn(deadline) else {
            return Err(Unsent::Late);
        };
        let mut at = 0;
        while at < frame.len() {
            let why = match (&self.file).write(&frame[at..]) {
                Ok(0) => "write to the connection: wrote nothing".to_string(),
                Ok(n) => {
                    at += n;
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => match self.writable(deadline) {
                    Ok(true) => continue,
                    Ok(false) if at == 0 => return Err(Unsent::Late),
                    Ok(false) => {
                        self.fail("the server stopped reading in the middle of a request".into());
                        return Err(Unsent::Late);
                    }
                    Err(e) => format!("poll the connection: {e}"),
                },
                Err(e) => format!("write to the connection: {e}"),
            };
            self.fail(why.clone());
            return Err(Unsent::Lost(why));
        }
        Ok(())
    }

    /// The right to write one frame, once the caller before is done; `None` if `deadline`
    /// passes first.
    fn take_turn(&self, deadline: Option<Instant>) -> Option<Turn<'_>> {
        let mut busy = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        while *busy {
            busy = match deadline.map(|d| d.saturating_duration_since(Instant::now())) {
                None => self.turn.wait(busy).unwrap_or_else(|e| e.into_inner()),
                Some(left) if left.is_zero() => return None,
                Some(left) => {
                    let waited = self.turn.wait_timeout(busy, left);
                    waited.unwrap_or_else(|e| e.into_inner()).0
                }
            };
        }
        *busy = true;
        Some(Turn(self))
    }

    /// Waits until the connection takes more bytes (or has failed, which the next write
    /// reports); false if `deadline` passed first.
    fn writable(&self, deadline: Option<Instant>) -> io::Result<bool> {
        loop {
            let ms = match deadline.map(|d| d.saturating_duration_since(Instant::now())) {
                None => -1,
                Some(left) if left.is_zero() => return Ok(false),
                // Rounded up, so the wait does not end just short of the deadline.
                Some(left) => i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX),
            };
            let mut fd = libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: `fd` is one valid pollfd struct.
            match unsafe { libc::poll(&mut fd, 1, ms) } {
                n if n > 0 => return Ok(true),
                0 => continue,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Marks the connection unusable (the first reason sticks), fails the calls waiting
    /// (dropping their senders wakes them) and stops the reader.
    fn fail(&self, why: String) {
        let pending = {
            let mut st = self.state();
            st.closed.get_or_insert(why);
            std::mem::take(&mut st.pending)
        };
        drop(pending);
        // Its peer end turns readable (EOF) in the reader's poll set.
        let _ = self.wake.shutdown(Shutdown::Both);
    }

    /// The reader: routes responses to their calls until the connection ends or `woken`
    /// turns readable; returns why it stopped.
    fn read_responses(&self, woken: &UnixStream) -> String {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            let mut fds = [self.file.as_raw_fd(), woken.as_raw_fd()].map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return format!("poll the connection: {e}");
            }
            if fds[1].revents != 0 {
                return "the client was closed".into();
            }
            if fds[0].revents == 0 {
                continue;
            }
            // Readable, so this read does not block.
            match (&self.file).read(&mut chunk) {
                Ok(0) => return "the server closed the connection".into(),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {
                    continue
                }
                Err(e) => return format!("read from the connection: {e}"),
            }
            match frame::split(&mut buf) {
                Ok(frames) => frames
                    .into_iter()
                    .for_each(|(mh, body)| self.deliver(mh, body)),
                Err(e) => return format!("bad frame from the server: {e}"),
            }
        }
    }

    /// Hands a response to its call; one nobody waits for (timed out) is dropped.
    fn deliver(&self, mh: MessageHeader, body: Vec<u8>) {
        if mh.type_ != MESSAGE_TYPE_RESPONSE {
            return;
        }
        let waiting = self.state().pending.remove(&mh.stream_id);
        match waiting {
            // The one slot is this call's; it never blocks.
            Some(tx) => drop(tx.try_send(body)),
            None => log::debug!("ttrpc: dropped a late reply on stream {}", mh.stream_id),
        }
    }
}

/// Why a request was not sent.
enum Unsent {
    /// Its deadline passed first.
    Late,
    /// The connection failed, for this reason.
    Lost(String),
}

/// One caller's turn to write; the next caller's begins when it is dropped.
struct Turn<'a>(&'a Conn);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        *self.0.writing.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.0.turn.notify_one();
    }
}

fn unavailable(what: &str, why: &str) -> Error {
    Error::Unavailable(format!("{what}: connection lost: {why}"))
}

/// Both the reader and the writers poll before they touch the fd: a writer facing a full
/// stream waits for room only until its deadline.
fn set_nonblocking(fd: &OwnedFd) -> Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a valid fd we own only change its status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error()).context("make the ttrpc client fd non-blocking");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::{decode, unary, Handler, Methods, Reply, Server};
    use protobuf::well_known_types::wrappers::StringValue;

    /// Generous bound on a wait that should end at once: a failing test fails, not hangs.
    const HANG: Duration = Duration::from_secs(30);

    fn string(s: &str) -> StringValue {
        StringValue {
            value: s.into(),
            ..Default::default()
        }
    }

    /// A request the server has taken and not answered yet, like a task's `Wait`.
    type Held = (Request, Reply);

    /// The SDK's own server on one end of a socketpair and a client on the other.
    struct Peer {
        client: Client,
        /// `/t.E/Hold` requests, answered when the test says so.
        held: mpsc::Receiver<Held>,
        /// The server's end, to shut it down from the test.
        server_end: UnixStream,
        /// Ends when the server's last (only) connection closes.
        served: JoinHandle<()>,
    }

    fn peer() -> Peer {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let server_end = theirs.try_clone().unwrap();
        let (tx, held) = mpsc::channel::<Held>();
        let tx = Mutex::new(tx);
        let mut methods: Methods = HashMap::new();
        methods.insert("/t.E/Echo".into(), unary(Ok::<StringValue, _>));
        let hold: Handler = Box::new(move |req, reply| {
            let _ = tx.lock().unwrap().send((req, reply));
        });
        methods.insert("/t.E/Hold".into(), hold);
        let server = Server::new(methods);
        let served = std::thread::spawn(move || server.run(None, vec![theirs.into()]));
        Peer {
            client: Client::new(ours.into()).unwrap(),
            held,
            server_end,
            served,
        }
    }

    fn echo(c: &Client, method: &str, s: &str, timeout: Duration) -> Result<String> {
        c.call_as::<StringValue>("t.E", method, &string(s), timeout)
            .map(|v| v.value)
    }

    /// Answers a held request with its own payload.
    fn release((req, reply): Held) {
        reply.send(decode::<StringValue>(&req));
    }

    /// (a), 20 rounds: 16 threads × 50 calls at once over one client, each answered its own.
    #[test]
    fn concurrent_calls_get_their_own_answers() {
        for round in 0..20 {
            let p = peer();
            std::thread::scope(|s| {
                for t in 0..16 {
                    let c = &p.client;
                    s.spawn(move || {
                        for i in 0..50 {
                            let v = format!("r{round}-t{t}-c{i}");
                            assert_eq!(echo(c, "Echo", &v, HANG).unwrap(), v);
                        }
                    });
                }
            });
        }
    }

    /// (b): calls held open (two `Wait`s) do not hold up the calls made after them, and
    /// each completes with its own answer, in whatever order they are answered.
    #[test]
    fn a_long_call_does_not_hold_up_others() {
        let p = peer();
        std::thread::scope(|s| {
            let first = s.spawn(|| echo(&p.client, "Hold", "first", Duration::MAX));
            let one = p.held.recv_timeout(HANG).unwrap();
            let second = s.spawn(|| echo(&p.client, "Hold", "second", Duration::MAX));
            let two = p.held.recv_timeout(HANG).unwrap();
            for i in 0..100 {
                let v = i.to_string();
                assert_eq!(echo(&p.client, "Echo", &v, HANG).unwrap(), v);
            }
            release(two);
            assert_eq!(second.join().unwrap().unwrap(), "second");
            assert_eq!(echo(&p.client, "Echo", "between", HANG).unwrap(), "between");
            release(one);
            assert_eq!(first.join().unwrap().unwrap(), "first");
        });
    }

    /// (c): a call that times out says so; its late reply goes to nobody, and the next call
    /// gets its own.
    #[test]
    fn a_timed_out_call_fails_and_its_late_reply_is_dropped() {
        let p = peer();
        let e = echo(&p.client, "Hold", "late", Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.code(), Code::DEADLINE_EXCEEDED, "{e}");
        assert!(e.to_string().contains("/t.E/Hold"), "{e}");
        // The late reply is on the wire before the next request is sent.
        release(p.held.recv_timeout(HANG).unwrap());
        assert_eq!(echo(&p.client, "Echo", "next", HANG).unwrap(), "next");
        let e = echo(&p.client, "Hold", "late again", Duration::from_millis(1)).unwrap_err();
        assert_eq!(e.code(), Code::DEADLINE_EXCEEDED, "{e}");
        let held = p.held.recv_timeout(HANG).unwrap();
        let after = std::thread::scope(|s| {
            let after = s.spawn(|| echo(&p.client, "Hold", "after", HANG));
            let mine = p.held.recv_timeout(HANG).unwrap();
            release(held);
            release(mine);
            after.join().unwrap()
        });
        assert_eq!(after.unwrap(), "after");
    }

    /// (d), 20 rounds: the server's end closing fails the calls it holds and the calls
    /// racing it with `Unavailable` (not after their timeout), and every later call too.
    #[test]
    fn a_closed_connection_fails_pending_and_new_calls() {
        for _ in 0..20 {
            let p = peer();
            let c = &p.client;
            std::thread::scope(|s| {
                let holding: Vec<_> = (0..8)
                    .map(|i| s.spawn(move || echo(c, "Hold", &i.to_string(), HANG)))
                    .collect();
                let busy: Vec<_> = (0..4)
                    .map(|_| {
                        s.spawn(move || loop {
                            if let Err(e) = echo(c, "Echo", "busy", HANG) {
                                return e;
                            }
                        })
                    })
                    .collect();
                let held: Vec<Held> = (0..8).map(|_| p.held.recv_timeout(HANG).unwrap()).collect();
                p.server_end.shutdown(Shutdown::Both).unwrap();
                for h in holding {
                    let e = h.join().unwrap().unwrap_err();
                    assert_eq!(e.code(), Code::UNAVAILABLE, "{e}");
                }
                for b in busy {
                    let e = b.join().unwrap();
                    assert_eq!(e.code(), Code::UNAVAILABLE, "{e}");
                }
                drop(held);
            });
            let e = echo(&p.client, "Echo", "too late", HANG).unwrap_err();
            assert_eq!(e.code(), Code::UNAVAILABLE, "{e}");
            assert!(e.to_string().contains("connection lost"), "{e}");
        }
    }

    /// Dropping the client stops its reader and closes the connection: the server sees its
    /// only connection end.
    #[test]
    fn dropping_the_client_closes_the_connection() {
        let p = peer();
        assert_eq!(echo(&p.client, "Echo", "hi", HANG).unwrap(), "hi");
        drop(p.client);
        p.served.join().unwrap();
    }

    /// An OK response carrying `v`, as a frame payload.
    fn response(v: &str) -> Vec<u8> {
        use protobuf::Message;
        let res = Response {
            status: protobuf::MessageField::some(ttrpc::get_status(Code::OK, "")),
            payload: string(v).write_to_bytes().unwrap(),
            ..Default::default()
        };
        <Response as Codec>::encode(&res).unwrap()
    }

    /// Against a hand-written server: a reply to a stream nobody opened, and frames that
    /// are not responses, reach no call; garbage ends the connection for the call waiting
    /// and the ones after it.
    #[test]
    fn stray_frames_are_dropped_and_garbage_fails_every_call() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let client = Client::new(ours.into()).unwrap();
        std::thread::scope(|s| {
            let call = s.spawn(|| echo(&client, "Echo", "x", HANG));
            let (mh, _) = frame::read(&theirs).unwrap();
            assert_eq!(mh.stream_id % 2, 1, "client streams are odd");
            frame::write(
                &theirs,
                mh.stream_id + 2,
                MESSAGE_TYPE_RESPONSE,
                &response("stray"),
            )
            .unwrap();
            frame::write(
                &theirs,
                mh.stream_id,
                MESSAGE_TYPE_REQUEST,
                &response("request"),
            )
            .unwrap();
            frame::write(
                &theirs,
                mh.stream_id,
                MESSAGE_TYPE_RESPONSE,
                &response("mine"),
            )
            .unwrap();
            assert_eq!(call.join().unwrap().unwrap(), "mine");

            let call = s.spawn(|| echo(&client, "Echo", "y", HANG));
            let (mh, _) = frame::read(&theirs).unwrap();
            let oversized = MessageHeader {
                length: u32::MAX,
                stream_id: mh.stream_id,
                type_: MESSAGE_TYPE_RESPONSE,
                flags: 0,
            };
            (&theirs).write_all(&Vec::<u8>::from(oversized)).unwrap();
            let e = call.join().unwrap().unwrap_err();
            assert_eq!(e.code(), Code::UNAVAILABLE, "{e}");
            assert!(e.to_string().contains("bad frame"), "{e}");
        });
        let e = echo(&client, "Echo", "z", HANG).unwrap_err();
        assert_eq!(e.code(), Code::UNAVAILABLE, "{e}");
    }

    /// A peer that stops reading costs the calls their deadline, not a hang: one waiting
    /// for its turn to write gives up untouched; one stalled in the middle of its request
    /// gives up and ends the connection (half a frame is on the wire).
    #[test]
    fn a_peer_that_stops_reading_costs_calls_their_deadline() {
        // Far more than a socket buffer holds, within ttrpc's limit.
        let big = "x".repeat(3 << 20);
        let (ours, theirs) = UnixStream::pair().unwrap();
        let client = Client::new(ours.into()).unwrap();
        std::thread::scope(|s| {
            let stuck = s.spawn(|| echo(&client, "Echo", &big, Duration::MAX));
            // Its frame has begun, so it holds the turn to write.
            let mut head = [0u8; frame::HEADER_LEN];
            (&theirs).read_exact(&mut head).unwrap();
            let e = echo(&client, "Echo", "behind", Duration::from_millis(50)).unwrap_err();
            assert_eq!(e.code(), Code::DEADLINE_EXCEEDED, "{e}");
            drop(theirs);
            let e = stuck.join().unwrap().unwrap_err();
            assert_eq!(e.code(), Code::UNAVAILABLE, "{e}");
        });

        let (ours, _theirs) = UnixStream::pair().unwrap();
        let client = Client::new(ours.into()).unwrap();
        let e = echo(&client, "Echo", &big, Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.code(), Code::DEADLINE_EXCEEDED, "{e}");
        let e = echo(&client, "Echo", "next", HANG).unwrap_err();
        assert_eq!(e.code(), Code::UNAVAILABLE, "{e}");
        assert!(e.to_string().contains("stopped reading"), "{e}");
    }

    /// A request the server would refuse (closing the connection) is refused here.
    #[test]
    fn an_oversized_request_is_refused_and_the_connection_lives_on() {
        let p = peer();
        let e = echo(&p.client, "Echo", &"x".repeat(frame::MAX_PAYLOAD), HANG).unwrap_err();
        assert_eq!(e.code(), Code::INVALID_ARGUMENT, "{e}");
        assert_eq!(echo(&p.client, "Echo", "fine", HANG).unwrap(), "fine");
    }
}
