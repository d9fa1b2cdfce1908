//! Spans out: a queue that request threads push ended spans onto, and one thread that sends
//! them in batches as OTLP/HTTP protobuf POSTs (plain HTTP/1.1 over a TCP stream; one request
//! per connection, a batch every few seconds at most). Settings are the standard `OTEL_*`
//! ones, read once.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::otlp::{self, Attributes, Finished};

/// Where and how spans are sent.
#[derive(Debug)]
pub(super) struct Config {
    pub endpoint: Endpoint,
    /// `OTEL_EXPORTER_OTLP_(TRACES_)HEADERS`.
    pub headers: Vec<(String, String)>,
    /// `OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT`: the longest one export may take.
    pub timeout: Duration,
    /// `OTEL_BSP_SCHEDULE_DELAY`: how long an ended span may wait for its batch.
    pub delay: Duration,
    /// `OTEL_BSP_MAX_QUEUE_SIZE`: spans beyond it are dropped (and counted).
    pub max_queue: usize,
    /// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`.
    pub max_batch: usize,
    pub resource: Attributes,
}

/// An `http://host[:port]/path` URL, split for the request. The host is an IP address or
/// `localhost`: a static binary has no resolver worth linking (glibc's `getaddrinfo` and
/// its NSS machinery would be ~100 KB of code resident in every shim), and a shim's
/// collector is a node-local agent.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Endpoint {
    /// `host:port`, to name in `Host`.
    pub authority: String,
    /// What `host` names, to connect to.
    pub addrs: Vec<SocketAddr>,
    pub path: String,
}

impl Endpoint {
    /// `url` as given (`..._TRACES_ENDPOINT`), or with the traces path appended to it
    /// (`OTEL_EXPORTER_OTLP_ENDPOINT`, the collector's base URL).
    #[cold]
    pub fn parse(url: &str, append_traces_path: bool) -> Result<Endpoint, String> {
        let url = url.trim();
        let scheme_end = url.find("://").ok_or(format!("{url:?} is not a URL"))?;
        match url[..scheme_end].to_ascii_lowercase().as_str() {
            "http" => {}
            "https" => {
                return Err(format!(
                    "{url}: https is not built in (an OTLP/HTTP collector on http://, e.g. a local agent)"
                ))
            }
            other => return Err(format!("{url}: scheme {other} is not http")),
        }
        let rest = &url[scheme_end + 3..];
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
        if authority.is_empty() || authority.contains(['?', '#', ' ']) {
            return Err(format!("{url}: no host"));
        }
        // A port is what follows the last `:`, unless that is inside an IPv6 `[...]`.
        let has_port = authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.contains(']') && !p.is_empty());
        let authority = if has_port {
            authority.to_string()
        } else {
            format!("{}:80", authority.trim_end_matches(':'))
        };
        let mut path = if path.is_empty() { "/" } else { path }.to_string();
        if append_traces_path {
            path = format!("{}/v1/traces", path.trim_end_matches('/'));
        }
        let addrs = addresses(&authority).ok_or_else(|| {
            format!(
                "{url}: the host must be an IP address or localhost (the shim resolves no names)"
            )
        })?;
        Ok(Endpoint {
            authority,
            addrs,
            path,
        })
    }
}

/// The addresses of `host:port` where the host is an IP literal or `localhost`.
#[cold]
fn addresses(authority: &str) -> Option<Vec<SocketAddr>> {
    if let Ok(addr) = authority.parse::<SocketAddr>() {
        return Some(vec![addr]);
    }
    let (host, port) = authority.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    host.eq_ignore_ascii_case("localhost").then(|| {
        vec![
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
        ]
    })
}

/// The exporting thread's side of the queue, and how to stop it.
pub(super) struct Exporter {
    shared: Arc<Shared>,
    done: Mutex<Option<mpsc::Receiver<()>>>,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    max_queue: usize,
    max_batch: usize,
}

#[derive(Default)]
struct Queue {
    spans: Vec<Finished>,
    /// Export requests encoded elsewhere (a guest agent's), sent with the next batch:
    /// protobuf messages concatenated are one message with their repeated fields joined.
    encoded: Vec<Vec<u8>>,
    dropped: u64,
    stopping: bool,
}

#[cold]
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Exporter {
    /// Starts the exporting thread.
    #[cold]
    pub fn start(config: Config) -> std::io::Result<Exporter> {
        let shared = Arc::new(Shared {
            queue: Mutex::default(),
            wake: Condvar::new(),
            max_queue: config.max_queue,
            max_batch: config.max_batch,
        });
        let (done_tx, done) = mpsc::channel();
        let queue = shared.clone();
        std::thread::Builder::new()
            .name("otlp-export".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                run(&queue, &config);
                let _ = done_tx.send(());
            })?;
        Ok(Exporter {
            shared,
            done: Mutex::new(Some(done)),
        })
    }

    /// Queues an ended span; never waits for the network.
    #[cold]
    pub fn push(&self, span: Finished) {
        let mut q = lock(&self.shared.queue);
        if q.stopping || q.spans.len() >= self.shared.max_queue {
            q.dropped += 1;
            return;
        }
        q.spans.push(span);
        if q.spans.len() == self.shared.max_batch {
            self.shared.wake.notify_one();
        }
    }

    /// Queues an export request encoded elsewhere, to go with the next batch.
    #[cold]
    pub fn push_encoded(&self, request: Vec<u8>) {
        let mut q = lock(&self.shared.queue);
        if q.stopping || q.encoded.len() >= self.shared.max_queue {
            q.dropped += 1;
            return;
        }
        q.encoded.push(request);
    }

    /// Sends what is queued and stops; waits for that at most `wait`.
    #[cold]
    pub fn shutdown(&self, wait: Duration) -> bool {
        lock(&self.shared.queue).stopping = true;
        self.shared.wake.notify_one();
        let done = lock(&self.done).take();
        done.is_some_and(|d| d.recv_timeout(wait).is_ok())
    }
}

/// The exporting thread: a batch when one is full, when the oldest span has waited the
/// schedule delay, or when stopping; until stopped with nothing left.
#[cold]
fn run(shared: &Shared, config: &Config) {
    loop {
        let (batch, encoded, dropped, stopping) = {
            let q = lock(&shared.queue);
            let (mut q, _) = shared
                .wake
                .wait_timeout_while(q, config.delay, |q| {
                    !q.stopping && q.spans.len() < config.max_batch
                })
                .unwrap_or_else(PoisonError::into_inner);
            let n = q.spans.len().min(config.max_batch);
            let batch: Vec<Finished> = q.spans.drain(..n).collect();
            let encoded = std::mem::take(&mut q.encoded);
            (batch, encoded, std::mem::take(&mut q.dropped), q.stopping)
        };
        if dropped > 0 {
            log::warn!("tracing: {dropped} spans dropped (export queue full)");
        }
        if !batch.is_empty() || !encoded.is_empty() {
            let mut body = match batch.is_empty() {
                true => Vec::new(),
                false => otlp::encode(&config.resource, super::SCOPE, &batch),
            };
            encoded.iter().for_each(|e| body.extend_from_slice(e));
            if let Err(e) = post(config, &body) {
                let n = batch.len() + encoded.len();
                log::warn!("tracing: an export of {n} spans or span batches failed: {e}");
            }
        }
        if stopping && lock(&shared.queue).spans.is_empty() {
            return;
        }
    }
}

/// One `POST` of an export request; `Ok` when the collector answered 2xx.
#[cold]
fn post(config: &Config, body: &[u8]) -> Result<(), String> {
    let ep = &config.endpoint;
    let deadline = Instant::now() + config.timeout;
    let mut last = format!("{}: no address", ep.authority);
    let mut stream = None;
    for addr in &ep.addrs {
        match TcpStream::connect_timeout(addr, config.timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("connect {addr}: {e}"),
        }
    }
    let mut stream = stream.ok_or(last)?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let io = |e: std::io::Error| format!("{}: {e}", ep.authority);
    stream.set_write_timeout(Some(left)).map_err(io)?;
    stream.set_read_timeout(Some(left)).map_err(io)?;
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\nUser-Agent: containerd-shim/{}\r\nConnection: close\r\n",
        ep.path,
        ep.authority,
        body.len(),
        env!("CARGO_PKG_VERSION"),
    );
    for (k, v) in &config.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).map_err(io)?;
    stream.write_all(body).map_err(io)?;
    let mut status = String::new();
    // The status line is all that matters; at most 1 KiB of it is read.
    BufReader::new(Read::take(&stream, 1024))
        .read_line(&mut status)
        .map_err(io)?;
    let code = status.split(' ').nth(1).unwrap_or_default();
    if code.starts_with('2') && code.len() == 3 {
        Ok(())
    } else {
        Err(format!(
            "{}{} answered {:?}",
            ep.authority,
            ep.path,
            status.trim_end()
        ))
    }
}

/// `k1=v1,k2=v2` with percent-encoded values, as `OTEL_EXPORTER_OTLP_HEADERS` and
/// `OTEL_RESOURCE_ATTRIBUTES` are written. A pair that is not one, or that would not make a
/// clean header, is left out and named.
#[cold]
pub(super) fn pairs(var: &str, value: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let pair = item
            .split_once('=')
            .map(|(k, v)| (percent_decode(k.trim()), percent_decode(v.trim())));
        match pair {
            Some((k, v))
                if !k.is_empty()
                    && !k.contains(|c: char| c.is_control() || c == ':' || c == ' ')
                    && !v.contains(|c: char| c.is_control()) =>
            {
                out.push((k, v))
            }
            _ => log::warn!("tracing: {var}: {item:?} is not key=value; left out"),
        }
    }
    out
}

#[cold]
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_split_for_the_request() {
        let ep = |u, append| Endpoint::parse(u, append);
        let v4 = ep("http://127.0.0.1:4318", true).unwrap();
        assert_eq!(
            (v4.authority.as_str(), v4.path.as_str()),
            ("127.0.0.1:4318", "/v1/traces")
        );
        assert_eq!(v4.addrs, ["127.0.0.1:4318".parse().unwrap()]);
        let local = ep("http://LOCALHOST/otlp/", true).unwrap();
        assert_eq!(
            (local.authority.as_str(), local.path.as_str()),
            ("LOCALHOST:80", "/otlp/v1/traces")
        );
        assert_eq!(
            local.addrs,
            [
                "127.0.0.1:80".parse::<SocketAddr>().unwrap(),
                "[::1]:80".parse().unwrap()
            ]
        );
        let v6 = ep("HTTP://[::1]:4318/custom", false).unwrap();
        assert_eq!(
            (v6.authority.as_str(), v6.path.as_str()),
            ("[::1]:4318", "/custom")
        );
        assert_eq!(ep("http://[::1]", false).unwrap().authority, "[::1]:80");
        assert!(ep("https://127.0.0.1:4318", true)
            .unwrap_err()
            .contains("https is not built in"));
        assert!(ep("http://collector.example:4318", true)
            .unwrap_err()
            .contains("IP address or localhost"));
        assert!(ep("127.0.0.1:4318", true).is_err());
        assert!(ep("grpc://127.0.0.1:4317", true).is_err());
        assert!(ep("http:///v1/traces", false).is_err());
        assert!(ep("http://127.0.0.1:99999", false).is_err());
    }

    #[test]
    fn headers_and_attributes_are_comma_separated_pairs() {
        assert_eq!(
            pairs("H", "api-key=a%20b, x=y=z ,bad, =v,k=%zz"),
            [
                ("api-key".to_string(), "a b".to_string()),
                ("x".into(), "y=z".into()),
                ("k".into(), "%zz".into()),
            ]
        );
        assert!(pairs("H", "k=a%0d%0aInjected: 1").is_empty());
    }
}
