//! The ttrpc server: one poll loop for the listener and all connections.

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ttrpc::proto::{Code, Codec, ResponseInit, MESSAGE_TYPE_REQUEST, MESSAGE_TYPE_RESPONSE};
use ttrpc::{MessageHeader, Request, Response};

use super::frame;
use super::pool::{Job, Pool};
use crate::error::{Context, Result};
use crate::trace::{Carried, RpcSpan};

/// A method: it gets the request and answers through the [`Reply`], now or later. A call
/// that waits for something (a task's `Wait`) then costs no thread while it waits.
pub type Handler = Box<dyn Fn(Request, Reply) + Send + Sync>;

/// Handlers by `/service/method`.
pub type Methods = HashMap<String, Handler>;

/// A handler for a unary method that answers before it returns: decodes the request
/// (`InvalidArgument` if it cannot), calls `f`, encodes what it answers.
pub fn unary<Req, Res, F>(f: F) -> Handler
where
    Req: protobuf::Message,
    Res: protobuf::Message,
    F: Fn(Req) -> ttrpc::Result<Res> + Send + Sync + 'static,
{
    Box::new(move |req, reply| reply.send(decode(&req).and_then(&f)))
}

/// A request's payload as `M`; `InvalidArgument` naming the method if it does not decode.
pub fn decode<M: protobuf::Message>(req: &Request) -> ttrpc::Result<M> {
    M::parse_from_bytes(&req.payload).map_err(|e| {
        ttrpc::Error::RpcStatus(ttrpc::get_status(
            Code::INVALID_ARGUMENT,
            format!("{}.{}: decode request: {e}", req.service, req.method),
        ))
    })
}

/// The way back to the caller; answer exactly once. One dropped unanswered (its handler
/// panicked, or forgot it) answers `Internal`, so no caller waits forever.
pub struct Reply {
    stream: Arc<Stream>,
    stream_id: u32,
    sent: bool,
    /// The request's span, ended with the answer (when tracing is on).
    span: Option<RpcSpan>,
}

impl Drop for Reply {
    fn drop(&mut self) {
        if !self.sent {
            let msg = "the shim failed to answer this request (see its log)";
            self.end_span(Code::INTERNAL, msg);
            answer_status(&self.stream, self.stream_id, Code::INTERNAL, msg);
        }
    }
}

impl Reply {
    /// Whether the connection this answer would go to has closed: a peer that reconnects
    /// never sees it. A handler that hands something over in its answer (the next queued
    /// event) keeps it for a later caller instead.
    pub fn peer_gone(&self) -> bool {
        self.stream.closed.load(Ordering::Acquire)
    }

    fn end_span(&mut self, code: Code, message: &str) {
        if let Some(span) = self.span.take() {
            span.end(code, message);
        }
    }

    /// Sends `res`: OK status and payload, or the error's status.
    pub fn send<M: protobuf::Message>(mut self, res: ttrpc::Result<M>) {
        self.sent = true;
        let response = match res.and_then(|m| {
            m.write_to_bytes()
                .map_err(|e| ttrpc::Error::Others(format!("encode response: {e}")))
        }) {
            Ok(payload) => Response {
                status: protobuf::MessageField::some(ttrpc::get_status(Code::OK, "")),
                payload,
                ..Default::default()
            },
            Err(ttrpc::Error::RpcStatus(s)) => Response::init_status(s),
            Err(e) => Response::init_status(ttrpc::get_status(Code::UNKNOWN, format!("{e:?}"))),
        };
        if self.span.is_some() {
            let status = response.status.as_ref();
            let code = status.map_or(Code::OK, |s| s.code());
            self.end_span(code, status.map_or("", |s| s.message.as_str()));
        }
        match <Response as Codec>::encode(&response) {
            Ok(payload) => self.stream.send(self.stream_id, &payload),
            Err(e) => log::warn!("encode ttrpc response: {e}"),
        }
    }
}

/// Tells when a spawned server has answered every request it took.
pub struct Idle(Arc<Pool>);

impl Idle {
    /// Waits until no request is being handled, or `timeout` passed; whether it got there.
    /// A process about to exit calls it so the answers in flight (the `Shutdown` that ends
    /// it, a `Delete` that raced it) reach their callers instead of a closed connection.
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        self.0.wait_idle(timeout)
    }
}

/// Bytes read from a connection per wakeup.
const READ_CHUNK: usize = 16 * 1024;

/// Serves ttrpc services on a listener and/or already-connected streams.
pub struct Server {
    methods: Arc<Methods>,
    pool: Arc<Pool>,
}

/// One connection: reads happen only in the poll loop; writes come from workers, one whole
/// frame at a time under the lock.
struct Conn {
    stream: Arc<Stream>,
    buf: Vec<u8>,
}

struct Stream {
    file: File,
    write: Mutex<()>,
    /// Set when the poll loop dropped the connection. The fd may still reach a peer: a
    /// virtio-serial port's next host reads what is written to it, and answers meant for
    /// the last one must not reach it.
    closed: AtomicBool,
}

impl Stream {
    fn send(&self, stream_id: u32, payload: &[u8]) {
        let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
        if self.closed.load(Ordering::Acquire) {
            log::debug!("ttrpc: dropped an answer on stream {stream_id} of a closed connection");
            return;
        }
        if let Err(e) = frame::write(&self.file, stream_id, MESSAGE_TYPE_RESPONSE, payload) {
            // The peer went away; the poll loop notices and drops the connection.
            log::debug!("ttrpc response on fd {}: {e}", self.file.as_raw_fd());
        }
    }
}

impl Server {
    /// A server for `methods`; nothing is served until [`Server::spawn`].
    pub fn new(methods: Methods) -> Server {
        Server {
            methods: Arc::new(methods),
            pool: Pool::new(),
        }
    }

    /// Tells when this server has answered every request it took; for a caller that runs
    /// [`Server::run`] on a thread of its own.
    pub fn idle(&self) -> Idle {
        Idle(self.pool.clone())
    }

    /// Serves on a new thread until the process exits: connections accepted on `listener`,
    /// plus `streams` already connected (a guest agent's port, a socketpair).
    pub fn spawn(self, listener: Option<UnixListener>, streams: Vec<OwnedFd>) -> Result<Idle> {
        let idle = Idle(self.pool.clone());
        std::thread::Builder::new()
            .name("ttrpc".into())
            .spawn(move || self.run(listener, streams))
            .context("spawn ttrpc server")?;
        Ok(idle)
    }

    /// The poll loop. Returns when there is no listener and the last stream has closed.
    pub fn run(&self, listener: Option<UnixListener>, streams: Vec<OwnedFd>) {
        let mut conns: Vec<Conn> = streams.into_iter().map(Conn::new).collect();
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            if listener.is_none() && conns.is_empty() {
                return;
            }
            let mut fds: Vec<libc::pollfd> = listener
                .iter()
                .map(|l| l.as_raw_fd())
                .chain(conns.iter().map(|c| c.stream.file.as_raw_fd()))
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != ErrorKind::Interrupted {
                    log::error!("ttrpc poll: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                continue;
            }
            let (accept, ready) = match listener {
                Some(_) => (fds[0].revents != 0, &fds[1..]),
                None => (false, &fds[..]),
            };
            let mut ready = ready.iter().map(|p| p.revents != 0);
            conns.retain_mut(|c| {
                let open = !ready.next().unwrap_or(false) || self.read(c, &mut chunk);
                if !open {
                    c.stream.closed.store(true, Ordering::Release);
                }
                open
            });
            if let (true, Some(l)) = (accept, &listener) {
                match l.accept() {
                    Ok((s, _)) => conns.push(Conn::new(OwnedFd::from(s))),
                    Err(e) => log::warn!("ttrpc accept: {e}"),
                }
            }
        }
    }

    /// Reads what is there and dispatches complete requests; false when the connection is done.
    fn read(&self, c: &mut Conn, chunk: &mut [u8]) -> bool {
        let fd = c.stream.file.as_raw_fd();
        match (&c.stream.file).read(chunk) {
            Ok(0) => return false,
            Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted || e.kind() == ErrorKind::WouldBlock => {
                return true
            }
            Err(e) => {
                log::debug!("ttrpc read on fd {fd}: {e}");
                return false;
            }
        }
        match frame::split(&mut c.buf) {
            Ok(frames) => {
                for (mh, payload) in frames {
                    self.dispatch(&c.stream, mh, &payload);
                }
                true
            }
            Err(e) => {
                log::warn!("ttrpc connection on fd {fd}: {e}; closing it");
                false
            }
        }
    }

    fn dispatch(&self, stream: &Arc<Stream>, mh: MessageHeader, payload: &[u8]) {
        if mh.type_ != MESSAGE_TYPE_REQUEST {
            return;
        }
        let req = match <Request as Codec>::decode(payload) {
            Ok(r) => r,
            Err(e) => return answer_status(stream, mh.stream_id, Code::INVALID_ARGUMENT, e),
        };
        let path = format!("/{}/{}", req.service, req.method);
        if !self.methods.contains_key(&path) {
            // What Go's ttrpc answers, and what a client probing for a service expects.
            let msg = format!("{path} is not implemented");
            return answer_status(stream, mh.stream_id, Code::UNIMPLEMENTED, msg);
        }
        let methods = self.methods.clone();
        let span = RpcSpan::start(&req.service, &req.method, &req.metadata);
        let current = span
            .as_ref()
            .map_or_else(Carried::default, RpcSpan::carried);
        let reply = Reply {
            stream: stream.clone(),
            stream_id: mh.stream_id,
            sent: false,
            span,
        };
        // A bug in one request costs that request (its `Reply` answers `Internal` as the
        // panic unwinds), not the shim serving the rest of the pod.
        let job: Job = Box::new(move || {
            if let Some(h) = methods.get(&path) {
                let _current = current.enter();
                if catch_unwind(AssertUnwindSafe(|| h(req, reply))).is_err() {
                    log::error!("{path} panicked (above); answered Internal");
                }
            }
        });
        self.pool.submit(job);
    }
}

fn answer_status(stream: &Stream, stream_id: u32, code: Code, msg: impl ToString) {
    let res = Response::init_status(ttrpc::get_status(code, msg));
    match <Response as Codec>::encode(&res) {
        Ok(payload) => stream.send(stream_id, &payload),
        Err(e) => log::warn!("encode ttrpc status: {e}"),
    }
}

impl Conn {
    fn new(fd: OwnedFd) -> Conn {
        Conn {
            stream: Arc::new(Stream {
                file: File::from(fd),
                write: Mutex::new(()),
                closed: AtomicBool::new(false),
            }),
            buf: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::Client;
    use protobuf::well_known_types::wrappers::StringValue;
    use protobuf::Message;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Echoes a `StringValue`; "fail" answers NOT_FOUND.
    fn echo_value(v: StringValue) -> ttrpc::Result<StringValue> {
        if v.value == "fail" {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                Code::NOT_FOUND,
                "no such thing",
            )));
        }
        Ok(v)
    }

    fn string(s: &str) -> StringValue {
        StringValue {
            value: s.into(),
            ..Default::default()
        }
    }

    fn serve() -> (tempfile::TempDir, String, mpsc::Sender<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s").to_string_lossy().into_owned();
        let (tx, rx) = mpsc::channel();
        let mut methods: Methods = HashMap::new();
        methods.insert("/t.E/Echo".into(), unary(echo_value));
        // Blocks a worker until released, like a `Wait` done the blocking way.
        let release = Mutex::new(rx);
        let block = move |v| {
            let _ = release.lock().unwrap().recv();
            echo_value(v)
        };
        methods.insert("/t.E/Block".into(), unary(block));
        // Answers from another thread after the handler has returned.
        let later: Handler = Box::new(|req, reply| {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                reply.send(decode::<StringValue>(&req))
            });
        });
        methods.insert("/t.E/Later".into(), later);
        let bug: Handler = Box::new(|_, _| panic!("a bug in one request"));
        methods.insert("/t.E/Bug".into(), bug);
        let listener = UnixListener::bind(&path).unwrap();
        Server::new(methods)
            .spawn(Some(listener), Vec::new())
            .unwrap();
        (dir, path, tx)
    }

    fn echo(c: &Client, method: &str, s: &str) -> Result<String> {
        let out = c.call("t.E", method, &string(s), Duration::from_secs(5))?;
        Ok(StringValue::parse_from_bytes(&out).unwrap().value)
    }

    #[test]
    fn a_panicking_request_is_answered_internal_and_the_server_goes_on() {
        let (_dir, path, _release) = serve();
        let c = Client::connect(&format!("unix://{path}")).unwrap();
        for _ in 0..3 {
            let e = echo(&c, "Bug", "x").unwrap_err();
            assert_eq!(e.code(), Code::INTERNAL, "{e}");
            assert_eq!(echo(&c, "Echo", "still here").unwrap(), "still here");
        }
    }

    #[test]
    fn answers_calls_statuses_and_unknown_methods() {
        let (_dir, path, _release) = serve();
        let c = Client::connect(&format!("unix://{path}")).unwrap();
        assert_eq!(echo(&c, "Echo", "hi").unwrap(), "hi");
        assert_eq!(echo(&c, "Later", "deferred").unwrap(), "deferred");
        let e = echo(&c, "Echo", "fail").unwrap_err().to_string();
        assert!(
            e.contains("NOT_FOUND") && e.contains("no such thing"),
            "{e}"
        );
        let e = echo(&c, "Nope", "x").unwrap_err().to_string();
        assert!(
            e.contains("UNIMPLEMENTED") && e.contains("/t.E/Nope"),
            "{e}"
        );
        // The crate's own client speaks the same wire format.
        let tc = ttrpc::Client::connect(&format!("unix://{path}")).unwrap();
        let res = tc
            .request(Request {
                service: "t.E".into(),
                method: "Echo".into(),
                payload: string("both").write_to_bytes().unwrap(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            StringValue::parse_from_bytes(&res.payload).unwrap().value,
            "both"
        );
        // A payload that is not the method's request message: INVALID_ARGUMENT, by name.
        let res = tc.request(Request {
            service: "t.E".into(),
            method: "Echo".into(),
            payload: vec![0xff, 0xff, 0xff],
            ..Default::default()
        });
        let Err(ttrpc::Error::RpcStatus(s)) = res else {
            panic!("{res:?}")
        };
        assert_eq!(s.code(), Code::INVALID_ARGUMENT);
        assert!(s.message().contains("t.E.Echo: decode request"), "{s:?}");
    }

    /// A blocked call (`Wait`) on one connection holds up neither that connection's other
    /// calls nor other connections.
    #[test]
    fn blocked_calls_do_not_hold_up_others() {
        let (_dir, path, release) = serve();
        let blocked = {
            let path = path.clone();
            std::thread::spawn(move || {
                let c = Client::connect(&path).unwrap();
                echo(&c, "Block", "late").unwrap()
            })
        };
        let tc = ttrpc::Client::connect(&format!("unix://{path}")).unwrap();
        let call = |method: &str, s: &str| {
            tc.request(Request {
                service: "t.E".into(),
                method: method.into(),
                payload: string(s).write_to_bytes().unwrap(),
                timeout_nano: 5_000_000_000,
                ..Default::default()
            })
        };
        std::thread::scope(|s| {
            let waiting = s.spawn(|| call("Block", "second"));
            std::thread::sleep(Duration::from_millis(50));
            for i in 0..20 {
                let c = Client::connect(&path).unwrap();
                assert_eq!(echo(&c, "Echo", &i.to_string()).unwrap(), i.to_string());
                assert!(call("Echo", "same connection").is_ok());
            }
            release.send(()).unwrap();
            release.send(()).unwrap();
            assert!(waiting.join().unwrap().is_ok());
        });
        assert_eq!(blocked.join().unwrap(), "late");
    }

    /// Garbage on a connection closes that connection only.
    #[test]
    fn malformed_frames_close_only_their_connection() {
        use std::io::Write;
        let (_dir, path, _release) = serve();
        let mut bad = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let mut huge = vec![0xffu8; 4];
        huge.extend_from_slice(&[0, 0, 0, 1, 1, 0]);
        bad.write_all(&huge).unwrap();
        bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(
            bad.read(&mut buf).unwrap(),
            0,
            "server closes the connection"
        );
        // A request whose payload is not a ttrpc Request gets INVALID_ARGUMENT.
        let mut junk = std::os::unix::net::UnixStream::connect(&path).unwrap();
        junk.write_all(&frame::encode(1, MESSAGE_TYPE_REQUEST, &[0xff, 0xff, 0xff]))
            .unwrap();
        let (mh, body) = frame::read(&junk).unwrap();
        assert_eq!(mh.stream_id, 1);
        let res = <Response as Codec>::decode(&body).unwrap();
        assert_eq!(res.status.code(), Code::INVALID_ARGUMENT);
        let c = Client::connect(&path).unwrap();
        assert_eq!(echo(&c, "Echo", "still here").unwrap(), "still here");
    }
}
