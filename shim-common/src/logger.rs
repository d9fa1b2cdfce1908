//! The shim's own log: logfmt lines on stderr, which the daemon points at the bundle's `log`
//! fifo so containerd copies them into its log (and a panic message lands there too).

use std::cell::RefCell;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::SystemTime;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger {
    level: LevelFilter,
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let level = match r.level() {
            Level::Error => "error",
            Level::Warn => "warning",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        };
        // One write per line, so lines from several threads never interleave.
        let mut line = format_line(level, &r.args().to_string());
        // A line written while a request is handled names its container and trace.
        let mut fields = SCOPE.with(|s| match s.borrow().as_str() {
            "" => String::new(),
            id => format!(" id={id}"),
        });
        if let Some(trace) = crate::trace::trace_id() {
            fields.push_str(&format!(" trace_id={trace}"));
        }
        line.insert_str(line.len() - 1, &fields);
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

thread_local! {
    /// The container the request handled on this thread is about.
    static SCOPE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// While it lives, log lines from this thread name container `id` (`id=c1`), and the
/// current trace span carries it as `container.id`.
pub struct Scope(String);

impl Scope {
    /// Enters the scope of container (or sandbox) `id`; an empty id names nothing.
    pub fn enter(id: String) -> Scope {
        if !id.is_empty() {
            crate::trace::annotate("container.id", id.clone());
        }
        Scope(SCOPE.with(|s| s.replace(id)))
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let previous = std::mem::take(&mut self.0);
        SCOPE.with(|s| *s.borrow_mut() = previous);
    }
}

/// One log line in the shim log's format (logfmt, newline-terminated), for processes that
/// write to the log without this logger — e.g. a container init that inherited the log fd.
///
/// ```
/// let line = shim_common::logger::format_line("error", "trap: \"unreachable\"");
/// assert!(line.contains(r#"level=error msg="trap: \"unreachable\"""#) && line.ends_with('\n'));
/// ```
pub fn format_line(level: &str, msg: &str) -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    // One line per message: a multi-line message (a trap's backtrace) keeps its newlines
    // escaped, as logfmt readers expect.
    let msg = msg
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!(
        "time=\"{}.{:09}\" level={level} msg=\"{msg}\" pid={}\n",
        now.as_secs(),
        now.subsec_nanos(),
        std::process::id()
    )
}

/// Installs the logger (once; later calls only change nothing).
pub fn init(debug: bool) {
    let level = if debug {
        LevelFilter::Debug
    } else {
        LevelFilter::Info
    };
    if log::set_boxed_logger(Box::new(Logger { level })).is_ok() {
        log::set_max_level(level);
    }
}

/// Points stderr at the bundle's `log` fifo when containerd has opened it for reading.
/// Without a reader (a shim run by hand), stderr stays where it was.
pub fn redirect_stderr_to_fifo(bundle: &std::path::Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let fifo = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(bundle.join("log"));
    let Ok(fifo) = fifo else { return };
    // Blocking writes from now on: a slow reader must not make us drop lines.
    let fd = fifo.as_raw_fd();
    // SAFETY: plain fcntl/dup2 on fds we own; fd 2 is replaced atomically.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        libc::dup2(fd, libc::STDERR_FILENO);
    }
}
