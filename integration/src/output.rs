//! Every byte of a process's output, counted and checksummed where it lands: the stress of
//! issue 17 item 1 ("output lost under concurrent execs"), shared by `tests/output.rs` and
//! `shim-bench`.
//!
//! Each exec runs `seq first last` on stdout and the same numbers through
//! `tr '0-9\n' 'A-K'` on stderr, both at once. The two streams use disjoint alphabets, so
//! even where they share one destination (`file://`) each can be told apart byte by byte;
//! each exec's numbers are its own, so output delivered to the wrong exec is caught too.
//!
//! What is checked is the promise containerd's clients build on: once `Wait` answers, all
//! of the process's output is at its destination. A fifo reader here holds its fifo open
//! read-write (it never sees EOF) and, when `Wait` returns, takes what the fifo holds
//! without blocking: a byte that arrives later counts as lost. A `file://` log is read
//! the moment `Wait` returns. A logging binary owns its own flushing: its files are read
//! once `Delete` (which ends the logger) has returned.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use protocol::shim::*;
use protocol::shim_ttrpc::TaskClient;
use sha2::{Digest, Sha256};

use crate::shim_client::{ctx, process_spec};

/// Bytes seen on one stream and their sha256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    pub bytes: u64,
    pub sha256: String,
}

impl Tally {
    /// The tally of `data`.
    pub fn of(data: &[u8]) -> Tally {
        let mut c = Counter::default();
        c.add(data);
        c.tally()
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes, sha256 {}", self.bytes, &self.sha256[..16])
    }
}

/// A running [`Tally`].
#[derive(Default)]
struct Counter {
    bytes: u64,
    hash: Sha256,
}

impl Counter {
    fn add(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        self.hash.update(data);
    }

    fn tally(self) -> Tally {
        Tally {
            bytes: self.bytes,
            sha256: crate::image::hex(&self.hash.finalize()),
        }
    }
}

/// What one process writes: `seq first last` on stdout, the same through
/// `tr '0-9\n' 'A-K'` on stderr.
#[derive(Debug, Clone, Copy)]
pub struct Pattern {
    pub first: u64,
    pub last: u64,
}

impl Pattern {
    /// `n` patterns of `lines` numbers each, the `k`th writing `k*lines + 1 ..= (k+1)*lines`:
    /// no two processes write the same numbers.
    pub fn series(n: usize, lines: u64) -> Vec<Pattern> {
        (0..n as u64)
            .map(|k| Pattern {
                first: k * lines + 1,
                last: (k + 1) * lines,
            })
            .collect()
    }

    /// The shell command (busybox `sh -c`) that writes both streams at once.
    pub fn script(&self) -> String {
        let (f, l) = (self.first, self.last);
        format!("seq {f} {l} & seq {f} {l} | tr '0-9\\n' 'A-K' >&2; wait")
    }

    /// Exactly what stdout must carry.
    pub fn stdout(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for i in self.first..=self.last {
            let _ = writeln!(out, "{i}");
        }
        out
    }

    /// Exactly what stderr must carry.
    pub fn stderr(&self) -> Vec<u8> {
        self.stdout().into_iter().map(to_stderr_alphabet).collect()
    }
}

fn to_stderr_alphabet(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b'A' + (b - b'0'),
        _ => b'K',
    }
}

/// Splits what one `file://` log holds back into the stdout and stderr of [`Pattern`]s.
pub fn split_streams(log: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for &b in log {
        match b {
            b'0'..=b'9' | b'\n' => out.push(b),
            b'A'..=b'K' => err.push(b),
            // Neither alphabet: count it as stdout, where it makes the checksum fail.
            _ => out.push(b),
        }
    }
    (out, err)
}

/// Where an exec's output goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// One fifo per stream, as containerd's clients make them.
    Fifo,
    /// `file:///...`: both streams appended to one file.
    File,
    /// `binary:///.../test-logger?raw=1`: a logging binary per exec.
    Binary,
}

/// One stream of one exec that did not arrive whole.
#[derive(Debug, Clone)]
pub struct Loss {
    pub exec: String,
    pub stream: &'static str,
    pub want: Tally,
    pub got: Tally,
}

impl Loss {
    /// Bytes missing (0 if it got as many bytes, but the wrong ones).
    pub fn missing(&self) -> u64 {
        self.want.bytes.saturating_sub(self.got.bytes)
    }
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: got {}, want {}",
            self.exec, self.stream, self.got, self.want
        )
    }
}

/// `n` concurrent execs of `lines` numbers each, with their expected tallies computed once.
pub struct ExecStress {
    patterns: Vec<Pattern>,
    want: Vec<[Tally; 2]>,
    logger: PathBuf,
}

impl ExecStress {
    /// Exec `k` of each round writes the numbers `k*lines + 1 ..= (k+1)*lines`; `logger` is
    /// the `test-logger` binary for [`Dest::Binary`].
    pub fn new(n: usize, lines: u64, logger: PathBuf) -> ExecStress {
        let patterns = Pattern::series(n, lines);
        let want = patterns
            .iter()
            .map(|p| [Tally::of(&p.stdout()), Tally::of(&p.stderr())])
            .collect();
        ExecStress {
            patterns,
            want,
            logger,
        }
    }

    /// Bytes one round writes (both streams of every exec).
    pub fn bytes_per_round(&self) -> u64 {
        self.want.iter().map(|[o, e]| o.bytes + e.bytes).sum()
    }

    /// Runs one round in container `id` through `shim`: every exec at once, each checked as
    /// soon as its `Wait` (or, for a logger, its `Delete`) returns. Files go in `dir`,
    /// names start with `tag`. Returns the streams that were not delivered whole.
    ///
    /// Test support: **panics** if a request fails or an exec does not exit 0.
    pub fn round(
        &self,
        shim: &TaskClient,
        id: &str,
        dir: &Path,
        tag: &str,
        dest: Dest,
    ) -> Vec<Loss> {
        std::thread::scope(|s| {
            let handles: Vec<_> = self
                .patterns
                .iter()
                .zip(&self.want)
                .enumerate()
                .map(|(k, (pattern, want))| {
                    let exec_id = format!("{tag}-e{k}");
                    s.spawn(move || self.one(shim, id, dir, &exec_id, pattern, want, dest))
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|_| panic!("exec thread panicked")))
                .collect()
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn one(
        &self,
        shim: &TaskClient,
        id: &str,
        dir: &Path,
        exec_id: &str,
        pattern: &Pattern,
        want: &[Tally; 2],
        dest: Dest,
    ) -> Vec<Loss> {
        let base = dir.join(exec_id);
        let (stdout, stderr, fifos) = match dest {
            Dest::Fifo => {
                let (o, e) = (path_with(&base, "stdout"), path_with(&base, "stderr"));
                let readers = FifoReaders::open(&o, &e);
                (str_of(&o), str_of(&e), Some(readers))
            }
            Dest::File => {
                let uri = format!("file://{}", path_with(&base, "log").display());
                (uri.clone(), uri, None)
            }
            Dest::Binary => {
                let uri = format!(
                    "binary://{}?out={}&raw=1",
                    self.logger.display(),
                    path_with(&base, "logger").display()
                );
                (uri.clone(), uri, None)
            }
        };
        let req = ExecProcessRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            stdout,
            stderr,
            spec: protobuf::MessageField::some(process_spec(&["sh", "-c", &pattern.script()])),
            ..Default::default()
        };
        shim.exec(ctx(), &req)
            .unwrap_or_else(|e| panic!("exec {exec_id}: {e}"));
        let key = StartRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        shim.start(ctx(), &key)
            .unwrap_or_else(|e| panic!("start {exec_id}: {e}"));
        let wait = WaitRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        let status = shim
            .wait(ctx(), &wait)
            .unwrap_or_else(|e| panic!("wait {exec_id}: {e}"));
        // Right after `Wait`: what is there now is what the client can rely on.
        let got = match (dest, fifos) {
            (Dest::Fifo, Some(readers)) => Some(readers.finish()),
            (Dest::File, _) => {
                let log = read(&path_with(&base, "log"));
                let (o, e) = split_streams(&log);
                Some([Tally::of(&o), Tally::of(&e)])
            }
            _ => None,
        };
        let del = DeleteRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        shim.delete(ctx(), &del)
            .unwrap_or_else(|e| panic!("delete {exec_id}: {e}"));
        assert_eq!(status.exit_status, 0, "exec {exec_id} failed");
        // A logger has flushed and exited once `Delete` returned.
        let got = got.unwrap_or_else(|| {
            let logger = path_with(&base, "logger");
            [
                Tally::of(&read(&path_with(&logger, "stdout"))),
                Tally::of(&read(&path_with(&logger, "stderr"))),
            ]
        });
        for p in [
            path_with(&base, "stdout"),
            path_with(&base, "stderr"),
            path_with(&base, "log"),
            path_with(&base, "logger"),
            path_with(&path_with(&base, "logger"), "stdout"),
            path_with(&path_with(&base, "logger"), "stderr"),
        ] {
            let _ = std::fs::remove_file(p);
        }
        ["stdout", "stderr"]
            .into_iter()
            .zip(want.iter().zip(got))
            .filter(|(_, (w, g))| *w != g)
            .map(|(stream, (w, g))| Loss {
                exec: exec_id.to_string(),
                stream,
                want: w.clone(),
                got: g,
            })
            .collect()
    }
}

fn path_with(base: &Path, ext: &str) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

fn str_of(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_default()
}

/// A thread reading an exec's stdout and stderr fifos, which it holds open read-write so
/// that it never sees EOF: the only end of the output it knows is the one `Wait` gives.
struct FifoReaders {
    stop: std::io::PipeWriter,
    thread: std::thread::JoinHandle<[Tally; 2]>,
}

impl FifoReaders {
    fn open(stdout: &Path, stderr: &Path) -> FifoReaders {
        let fifos = [stdout, stderr].map(|p| {
            let _ = std::fs::remove_file(p);
            nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .unwrap_or_else(|e| panic!("mkfifo {}: {e}", p.display()));
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(p)
                .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
        });
        let (stop_r, stop) = std::io::pipe().unwrap_or_else(|e| panic!("pipe: {e}"));
        let thread = std::thread::spawn(move || read_until_stopped(fifos, stop_r));
        FifoReaders { stop, thread }
    }

    /// Everything the fifos held up to now (the reader drains them, then stops).
    fn finish(mut self) -> [Tally; 2] {
        let _ = self.stop.write_all(b"x");
        self.thread
            .join()
            .unwrap_or_else(|_| panic!("fifo reader panicked"))
    }
}

fn read_until_stopped(mut fifos: [File; 2], stop: std::io::PipeReader) -> [Tally; 2] {
    let mut counters = [Counter::default(), Counter::default()];
    let mut buf = vec![0u8; 64 * 1024];
    let mut drain = |f: &mut File, c: &mut Counter| loop {
        match f.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => c.add(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return, // WouldBlock: empty for now
        }
    };
    loop {
        let mut fds = [
            libc::pollfd {
                fd: fifos[0].as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: fifos[1].as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of three pollfd structs.
        if unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) } < 0 {
            continue;
        }
        let stopped = fds[2].revents != 0;
        for (f, c) in fifos.iter_mut().zip(counters.iter_mut()) {
            drain(f, c);
        }
        if stopped {
            return counters.map(Counter::tally);
        }
    }
}
