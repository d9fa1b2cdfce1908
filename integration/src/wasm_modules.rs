//! WebAssembly test programs, built from source when a test first asks for one.
//!
//! Nothing binary is checked in: WAT text goes through the `wat` crate, C through Debian's
//! `clang` with `wasi-libc` and `lld` (`clang --target=wasm32-wasi` finds both without a
//! sysroot flag), and preview 2 components are core modules wrapped by `wit-component`
//! with wasmtime's preview 1 adapter. Each output lands in the shared cache directory
//! under a name derived from its source, so a test run builds each program once and
//! later runs reuse it; writes go through a rename, so parallel tests never see half a
//! file.
//!
//! ```no_run
//! use integration::wasm_modules::{path, Program};
//! let hello = path(Program::Hello)?; // .../hello-<hash>.wasm
//! # Ok::<(), integration::Error>(())
//! ```

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext};

/// The C compiler for `wasm32-wasi` (Debian packages `clang`, `lld`, `wasi-libc`).
pub const CLANG: &str = "/usr/bin/clang";

/// What [`Program::Hello`] prints.
pub const HELLO_OUTPUT: &str = "hello from wasm\n";

/// What [`Program::Hello`]'s second export, `greet`, prints (run as `hello.wasm#greet`).
pub const GREET_OUTPUT: &str = "greetings from an exported function\n";

/// The exit status [`Program::Exit42`] passes to `proc_exit`.
pub const EXIT42_STATUS: i32 = 42;

/// The host function [`Program::UnknownImport`] imports, which no runtime provides.
pub const UNKNOWN_IMPORT: &str = "no_such_function";

/// Every test program. Core modules speak WASI preview 1; components `wasi:cli` 0.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Program {
    /// WAT: prints [`HELLO_OUTPUT`] and returns from `_start`; also exports `greet`.
    Hello,
    /// WAT: prints `arg=<a>` for each argument, then `env=<k=v>` for each variable.
    Echo,
    /// WAT: writes `tmp/wat-file.txt` under the first preopened directory (fd 3), reads
    /// it back and prints `read back: <text>`.
    FileIo,
    /// WAT: `proc_exit(42)`.
    Exit42,
    /// WAT: prints `busy` and spins forever without calling the host.
    Busy,
    /// WAT: prints `idle` and sleeps forever in `poll_oneoff` (an idle container).
    Idle,
    /// WAT: executes `unreachable`.
    Trap,
    /// WAT: imports `env.no_such_function`.
    UnknownImport,
    /// Plain text with a `.wasm` name: not a module at all.
    NotAModule,
    /// C: `ctool echo|write PATH TEXT|read PATH|exit N|busy|sleep SECS`.
    CTool,
    /// [`Program::Hello`] as a `wasi:cli/run` component (command adapter).
    HelloComponent,
    /// [`Program::CTool`] as a `wasi:cli/run` component.
    CToolComponent,
    /// A component exporting nothing: neither `wasi:cli/run` nor `incoming-handler`.
    NoRunComponent,
    /// A `wasi:http/incoming-handler` component answering every request with status 200
    /// and [`HTTP_BODY`]: hand-written WAT against the canonical ABI, componentized
    /// against the WASI 0.2.12 WIT in `integration/wit/wasi-http`.
    HttpComponent,
    /// A `wasi:http/incoming-handler` component whose handler spins forever.
    HttpBusyComponent,
}

impl Program {
    /// Every program, for tests that want them all built (and for the benchmark).
    pub const ALL: &'static [Program] = &[
        Program::Hello,
        Program::Echo,
        Program::FileIo,
        Program::Exit42,
        Program::Busy,
        Program::Idle,
        Program::Trap,
        Program::UnknownImport,
        Program::NotAModule,
        Program::CTool,
        Program::HelloComponent,
        Program::CToolComponent,
        Program::NoRunComponent,
        Program::HttpComponent,
        Program::HttpBusyComponent,
    ];

    /// File name inside a container's rootfs (`hello.wasm`).
    pub fn file_name(self) -> &'static str {
        match self {
            Program::Hello => "hello.wasm",
            Program::Echo => "echo.wasm",
            Program::FileIo => "fileio.wasm",
            Program::Exit42 => "exit42.wasm",
            Program::Busy => "busy.wasm",
            Program::Idle => "idle.wasm",
            Program::Trap => "trap.wasm",
            Program::UnknownImport => "unknown-import.wasm",
            Program::NotAModule => "not-a-module.wasm",
            Program::CTool => "ctool.wasm",
            Program::HelloComponent => "hello-component.wasm",
            Program::CToolComponent => "ctool-component.wasm",
            Program::NoRunComponent => "no-run-component.wasm",
            Program::HttpComponent => "http-component.wasm",
            Program::HttpBusyComponent => "http-busy-component.wasm",
        }
    }

    /// Whether the program is a preview 2 component rather than a core module.
    pub fn is_component(self) -> bool {
        matches!(
            self,
            Program::HelloComponent
                | Program::CToolComponent
                | Program::NoRunComponent
                | Program::HttpComponent
                | Program::HttpBusyComponent
        )
    }

    fn source(self) -> Source {
        match self {
            Program::Hello => Source::Wat(HELLO_WAT),
            Program::Echo => Source::Wat(ECHO_WAT),
            Program::FileIo => Source::Wat(FILEIO_WAT),
            Program::Exit42 => Source::Wat(EXIT42_WAT),
            Program::Busy => Source::Wat(BUSY_WAT),
            Program::Idle => Source::Wat(IDLE_WAT),
            Program::Trap => Source::Wat(TRAP_WAT),
            Program::UnknownImport => Source::Wat(UNKNOWN_IMPORT_WAT),
            Program::NotAModule => Source::Raw(b"this is plain text, not a WebAssembly module\n"),
            Program::CTool => Source::C(CTOOL_C),
            Program::HelloComponent => Source::Command(Program::Hello),
            Program::CToolComponent => Source::Command(Program::CTool),
            Program::NoRunComponent => Source::Empty,
            Program::HttpComponent => Source::Http(HTTP_WAT),
            Program::HttpBusyComponent => Source::Http(HTTP_BUSY_WAT),
        }
    }
}

enum Source {
    Wat(&'static str),
    C(&'static str),
    Raw(&'static [u8]),
    /// A core module wrapped as a `wasi:cli/run` component.
    Command(Program),
    /// An empty core module wrapped as a component.
    Empty,
    /// A handler module ([`HTTP_WAT`]) componentized against the `wasi:http` WIT.
    Http(&'static str),
}

/// The built program's path (building it on first use in this process, or reusing the
/// cached file of an earlier run built from the same source).
pub fn path(program: Program) -> Result<PathBuf, Error> {
    static BUILT: OnceLock<Mutex<HashMap<Program, Result<PathBuf, String>>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    // One program at a time: clang and wit-component are CPU-bound, and the lock keeps
    // two tests from compiling the same source in parallel.
    let mut map = built.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = map.get(&program) {
        return r.clone().map_err(|msg| build_error(program, msg));
    }
    let r = build_cached(program).map_err(|e| e.to_string());
    map.insert(program, r.clone());
    r.map_err(|msg| build_error(program, msg))
}

/// The WAT text of [`Program::Hello`] (the shim also runs `.wat` files).
pub fn hello_wat() -> &'static str {
    HELLO_WAT
}

/// The built program's bytes.
pub fn bytes(program: Program) -> Result<Vec<u8>, Error> {
    let p = path(program)?;
    fs::read(&p).ctx_path("reading", &p)
}

/// `module` with a custom section `name` holding `payload` appended: the same program under
/// another digest. Caches keyed by digest (the shim's precompile cache) then see a module
/// no other test or run has used.
pub fn with_custom_section(module: &[u8], name: &str, payload: &[u8]) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut body = Vec::new();
    leb128(name.len(), &mut body);
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(payload);
    let mut out = module.to_vec();
    out.push(0); // custom section id
    leb128(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

fn build_error(program: Program, msg: String) -> Error {
    Error::io(
        format!("building test program {}", program.file_name()),
        std::io::Error::other(msg),
    )
}

fn build_cached(program: Program) -> Result<PathBuf, Error> {
    let key = cache_key(program)?;
    let dir = crate::image::cache_dir().join("wasm");
    fs::create_dir_all(&dir).ctx_path("creating cache dir", &dir)?;
    let stem = program.file_name().trim_end_matches(".wasm");
    let out = dir.join(format!("{stem}-{key}.wasm"));
    if out.is_file() {
        return Ok(out);
    }
    let data = build(program)?;
    write_atomically(&out, &data)?;
    Ok(out)
}

/// Hash of everything the output depends on: the source text, and for C the compiler.
fn cache_key(program: Program) -> Result<String, Error> {
    let mut h = Sha256::new();
    h.update(program.file_name());
    let mut p = program;
    loop {
        match p.source() {
            Source::Wat(s) | Source::C(s) => h.update(s),
            Source::Raw(b) => h.update(b),
            Source::Command(inner) => {
                h.update(b"command adapter 48");
                h.update(wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER);
                p = inner;
                continue;
            }
            Source::Empty => h.update(b"empty component"),
            Source::Http(wat) => {
                h.update(wat);
                for (_, wit) in WASI_HTTP_WIT {
                    h.update(wit);
                }
            }
        }
        if matches!(p.source(), Source::C(_)) {
            h.update(clang_version()?);
        }
        break;
    }
    Ok(crate::image::hex(&h.finalize()[..8]))
}

fn clang_version() -> Result<Vec<u8>, Error> {
    let out = Command::new(CLANG).arg("--version").output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::MissingProgram {
                path: CLANG.into(),
                why: "install Debian packages clang lld wasi-libc libclang-rt-14-dev-wasm32",
            }
        } else {
            Error::io(format!("running {CLANG} --version"), e)
        }
    })?;
    Ok(out.stdout)
}

fn build(program: Program) -> Result<Vec<u8>, Error> {
    match program.source() {
        Source::Wat(text) => wat::parse_str(text).map_err(|e| wasm_error("parsing WAT", e)),
        Source::Raw(b) => Ok(b.to_vec()),
        Source::C(text) => compile_c(program, text),
        // Not `bytes(inner)`: the caller holds the lock `path` takes.
        Source::Command(inner) => {
            let core = build_cached(inner)?;
            command_component(&fs::read(&core).ctx_path("reading", &core)?)
        }
        Source::Http(wat) => http_component(wat),
        Source::Empty => {
            let core = wat::parse_str("(module)").map_err(|e| wasm_error("parsing WAT", e))?;
            wit_component::ComponentEncoder::default()
                .validate(true)
                .module(&core)
                .and_then(|mut e| e.encode())
                .map_err(|e| wasm_error("encoding an empty component", e))
        }
    }
}

/// Wraps a preview 1 command module into a component exporting `wasi:cli/run`.
pub fn command_component(core: &[u8]) -> Result<Vec<u8>, Error> {
    use wasi_preview1_component_adapter_provider as adapter;
    wit_component::ComponentEncoder::default()
        .validate(true)
        .module(core)
        .and_then(|e| {
            e.adapter(
                adapter::WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
                adapter::WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
            )
        })
        .and_then(|mut e| e.encode())
        .map_err(|e| wasm_error("componentizing with the command adapter", e))
}

/// What [`Program::HttpComponent`] answers to every request.
pub const HTTP_BODY: &str = "hello from a wasi:http component\n";
/// What [`Program::HttpComponent`] writes to its stdout for every request.
pub const HTTP_LOG_LINE: &str = "wasi:http request\n";

/// The WASI 0.2.12 packages `wasi:http/types` needs, dependencies first (`push_str` resolves
/// each against those already pushed).
const WASI_HTTP_WIT: &[(&str, &str)] = &[
    ("io.wit", include_str!("../wit/wasi-http/io.wit")),
    ("clocks.wit", include_str!("../wit/wasi-http/clocks.wit")),
    ("random.wit", include_str!("../wit/wasi-http/random.wit")),
    (
        "filesystem.wit",
        include_str!("../wit/wasi-http/filesystem.wit"),
    ),
    ("sockets.wit", include_str!("../wit/wasi-http/sockets.wit")),
    ("cli.wit", include_str!("../wit/wasi-http/cli.wit")),
    ("http.wit", include_str!("../wit/wasi-http/http.wit")),
];

/// The world the handlers are built against: `wasi:http/types`, and stdout for a log line.
const HTTP_WORLD_WIT: &str = "package shimtest:http;

world responder {
  import wasi:http/types@0.2.12;
  import wasi:cli/stdout@0.2.12;
  export wasi:http/incoming-handler@0.2.12;
}
";

/// Embeds the `responder` world into the handler module `wat` and encodes the component.
fn http_component(wat: &str) -> Result<Vec<u8>, Error> {
    let mut resolve = wit_parser::Resolve::default();
    for (name, text) in WASI_HTTP_WIT {
        resolve
            .push_str(name, text)
            .map_err(|e| wasm_error(&format!("parsing WIT {name}"), e))?;
    }
    let pkg = resolve
        .push_str("responder.wit", HTTP_WORLD_WIT)
        .map_err(|e| wasm_error("parsing the responder world", e))?;
    let world = resolve
        .select_world(&[pkg], Some("responder"))
        .map_err(|e| wasm_error("selecting the responder world", e))?;
    let mut core = wat::parse_str(wat).map_err(|e| wasm_error("parsing WAT", e))?;
    wit_component::embed_component_metadata(
        &mut core,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )
    .map_err(|e| wasm_error("embedding the responder world", e))?;
    wit_component::ComponentEncoder::default()
        .validate(true)
        .module(&core)
        .and_then(|mut e| e.encode())
        .map_err(|e| wasm_error("encoding the wasi:http component", e))
}

fn wasm_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::io(what.to_string(), std::io::Error::other(format!("{e:#}")))
}

fn compile_c(program: Program, text: &str) -> Result<Vec<u8>, Error> {
    clang_version()?;
    let dir = tempfile::tempdir().ctx(|| "creating a temp dir for clang".to_string())?;
    let src = dir.path().join("main.c");
    let out = dir.path().join(program.file_name());
    fs::write(&src, text).ctx_path("writing", &src)?;
    let res = Command::new(CLANG)
        .args([
            "--target=wasm32-wasi",
            "-O2",
            "-Wall",
            "-Werror",
            "-Wl,--strip-all",
            "-o",
        ])
        .arg(&out)
        .arg(&src)
        .output()
        .ctx(|| format!("running {CLANG}"))?;
    if !res.status.success() {
        return Err(Error::io(
            format!("{CLANG} --target=wasm32-wasi {}", src.display()),
            std::io::Error::other(String::from_utf8_lossy(&res.stderr).into_owned()),
        ));
    }
    fs::read(&out).ctx_path("reading", &out)
}

fn write_atomically(path: &Path, data: &[u8]) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".wasm-")
        .tempfile_in(dir)
        .ctx_path("creating temporary file in", dir)?;
    tmp.write_all(data).ctx_path("writing", tmp.path())?;
    tmp.persist(path)
        .map_err(|e| Error::io(format!("renaming to {}", path.display()), e.error))?;
    Ok(())
}

/// Imports and helpers shared by the WAT programs: `$write(ptr, len)` to stdout (iovec at
/// 0), `$strlen`, `$puts` (string + newline). Memory layout: 0–15 iovec, 16 "\n",
/// 20–31 scratch words, 1024+ program data.
macro_rules! wat_module {
    ($($body:literal),* $(,)?) => {
        concat!(
            r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 16) "\n")
  (func $write_fd (param $fd i32) (param $p i32) (param $n i32)
    (i32.store (i32.const 0) (local.get $p))
    (i32.store (i32.const 4) (local.get $n))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func $write (param $p i32) (param $n i32)
    (call $write_fd (i32.const 1) (local.get $p) (local.get $n)))
  (func $strlen (param $p i32) (result i32) (local $n i32)
    (block $done (loop $l
      (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br $l)))
    (local.get $n))
  (func $puts (param $p i32)
    (call $write (local.get $p) (call $strlen (local.get $p)))
    (call $write (i32.const 16) (i32.const 1)))
"#,
            $($body,)*
            ")\n"
        )
    };
}

const HELLO_WAT: &str = wat_module!(
    r#"  (data (i32.const 1024) "hello from wasm\00")
  (data (i32.const 1100) "greetings from an exported function\00")
  (func (export "_start") (call $puts (i32.const 1024)))
  (func (export "greet") (call $puts (i32.const 1100)))
"#
);

const ECHO_WAT: &str = wat_module!(
    r#"  (data (i32.const 1024) "arg=\00")
  (data (i32.const 1032) "env=\00")
  ;; Prints `prefix` + each of `count` NUL-terminated strings whose pointers are at `ptrs`.
  (func $print_all (param $prefix i32) (param $count i32) (param $ptrs i32) (local $i i32)
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (local.get $count)))
      (call $write (local.get $prefix) (i32.const 4))
      (call $puts (i32.load (i32.add (local.get $ptrs) (i32.shl (local.get $i) (i32.const 2)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l))))
  (func (export "_start")
    (drop (call $args_sizes_get (i32.const 20) (i32.const 24)))
    (drop (call $args_get (i32.const 2048) (i32.const 8192)))
    (call $print_all (i32.const 1024) (i32.load (i32.const 20)) (i32.const 2048))
    (drop (call $environ_sizes_get (i32.const 20) (i32.const 24)))
    (drop (call $environ_get (i32.const 4096) (i32.const 32768)))
    (call $print_all (i32.const 1032) (i32.load (i32.const 20)) (i32.const 4096)))
"#
);

const FILEIO_WAT: &str = wat_module!(
    r#"  (data (i32.const 1024) "tmp/wat-file.txt")
  (data (i32.const 1100) "written by wasm")
  (data (i32.const 1200) "read back: ")
  (data (i32.const 1300) "fileio: path_open failed\n")
  ;; Opens tmp/wat-file.txt in preopen fd 3 with `oflags`; exits 1 with a message if it fails.
  (func $open (param $oflags i32) (result i32)
    (if (call $path_open (i32.const 3) (i32.const 0) (i32.const 1024) (i32.const 16)
          (local.get $oflags) (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 0)
          (i32.const 20))
      (then
        (call $write_fd (i32.const 2) (i32.const 1300) (i32.const 25))
        (call $proc_exit (i32.const 1))))
    (i32.load (i32.const 20)))
  (func (export "_start") (local $fd i32)
    ;; O_CREAT | O_TRUNC
    (local.set $fd (call $open (i32.const 9)))
    (call $write_fd (local.get $fd) (i32.const 1100) (i32.const 15))
    (drop (call $fd_close (local.get $fd)))
    (local.set $fd (call $open (i32.const 0)))
    (i32.store (i32.const 0) (i32.const 4096))
    (i32.store (i32.const 4) (i32.const 256))
    (drop (call $fd_read (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 24)))
    (drop (call $fd_close (local.get $fd)))
    (call $write (i32.const 1200) (i32.const 11))
    (call $write (i32.const 4096) (i32.load (i32.const 24)))
    (call $write (i32.const 16) (i32.const 1)))
"#
);

const EXIT42_WAT: &str = wat_module!(
    r#"  (func (export "_start") (call $proc_exit (i32.const 42)))
"#
);

const BUSY_WAT: &str = wat_module!(
    r#"  (data (i32.const 1024) "busy\00")
  (func (export "_start")
    (call $puts (i32.const 1024))
    (loop $spin (br $spin)))
"#
);

const IDLE_WAT: &str = wat_module!(
    r#"  (data (i32.const 1024) "idle\00")
  ;; One clock subscription at 2048 (tag 0 = clock at +8, id 1 = monotonic at +16,
  ;; timeout at +24 in ns): an hour, again and again.
  (func (export "_start")
    (call $puts (i32.const 1024))
    (i32.store8 (i32.const 2056) (i32.const 0))
    (i32.store (i32.const 2064) (i32.const 1))
    (i64.store (i32.const 2072) (i64.const 3600000000000))
    (loop $sleep
      (drop (call $poll_oneoff (i32.const 2048) (i32.const 3072) (i32.const 1) (i32.const 20)))
      (br $sleep)))
"#
);

const TRAP_WAT: &str = wat_module!(
    r#"  (func (export "_start") unreachable)
"#
);

const UNKNOWN_IMPORT_WAT: &str = r#"(module
  (import "env" "no_such_function" (func $missing))
  (memory (export "memory") 1)
  (func (export "_start") (call $missing)))
"#;

/// The handler (writes [`HTTP_LOG_LINE`] to stdout first), by the canonical ABI: results
/// wider than one value come back through a pointer (scratch at 16..64);
/// `response-outparam.set` takes `result<own<outgoing-response>, error-code>` flattened to
/// 8 values.
const HTTP_WAT: &str = r#"(module
  (import "wasi:http/types@0.2.12" "[constructor]fields" (func $fields (result i32)))
  (import "wasi:http/types@0.2.12" "[constructor]outgoing-response" (func $response (param i32) (result i32)))
  (import "wasi:http/types@0.2.12" "[method]outgoing-response.body" (func $response_body (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[method]outgoing-body.write" (func $body_write (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[static]outgoing-body.finish" (func $body_finish (param i32 i32 i32 i32)))
  (import "wasi:http/types@0.2.12" "[static]response-outparam.set" (func $set (param i32 i32 i32 i32 i64 i32 i32 i32 i32)))
  (import "wasi:io/streams@0.2.12" "[method]output-stream.blocking-write-and-flush" (func $write (param i32 i32 i32 i32)))
  (import "wasi:io/streams@0.2.12" "[resource-drop]output-stream" (func $drop_stream (param i32)))
  (import "wasi:cli/stdout@0.2.12" "get-stdout" (func $stdout (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 1024) "hello from a wasi:http component\n")
  (data (i32.const 1100) "wasi:http request\n")
  ;; The canonical ABI's allocator, which wit-component requires: a bump allocator from 8192
  ;; (one request per instance; nothing is freed).
  (global $heap (mut i32) (i32.const 8192))
  (func (export "cabi_realloc") (param $old i32) (param $old_size i32) (param $align i32) (param $size i32) (result i32)
    (local $p i32)
    (local.set $p (i32.and
      (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
      (i32.sub (i32.const 0) (local.get $align))))
    (global.set $heap (i32.add (local.get $p) (local.get $size)))
    (local.get $p))
  (func (export "wasi:http/incoming-handler@0.2.12#handle") (param $request i32) (param $out i32)
    (local $response i32) (local $body i32) (local $stream i32)
    ;; One line on the container's stdout per request.
    (local.set $stream (call $stdout))
    (call $write (local.get $stream) (i32.const 1100) (i32.const 18) (i32.const 32))
    (call $drop_stream (local.get $stream))
    (local.set $response (call $response (call $fields)))
    (call $response_body (local.get $response) (i32.const 16))
    (local.set $body (i32.load (i32.const 20)))
    (call $body_write (local.get $body) (i32.const 16))
    (local.set $stream (i32.load (i32.const 20)))
    (call $set (local.get $out) (i32.const 0) (local.get $response)
      (i32.const 0) (i64.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
    (call $write (local.get $stream) (i32.const 1024) (i32.const 33) (i32.const 32))
    (call $drop_stream (local.get $stream))
    (call $body_finish (local.get $body) (i32.const 0) (i32.const 0) (i32.const 48)))
)
"#;

/// A handler that never returns nor answers: stopped only through the epoch.
const HTTP_BUSY_WAT: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32) (i32.const 1024))
  (func (export "wasi:http/incoming-handler@0.2.12#handle") (param $request i32) (param $out i32)
    (loop $spin (br $spin)))
)
"#;

const CTOOL_C: &str = r#"/* ctool: the C test program (args, env, files, exit code, busy loop, sleep). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;

static int print_file(const char *path) {
    char buf[4096];
    FILE *f = fopen(path, "r");
    if (!f) {
        perror(path);
        return 1;
    }
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = 0;
    fclose(f);
    printf("read back: %s\n", buf);
    return 0;
}

int main(int argc, char **argv) {
    const char *cmd = argc > 1 ? argv[1] : "";
    if (!strcmp(cmd, "echo")) {
        for (int i = 0; i < argc; i++) printf("arg=%s\n", argv[i]);
        for (char **e = environ; *e; e++) printf("env=%s\n", *e);
        return 0;
    }
    if (!strcmp(cmd, "write") && argc == 4) {
        FILE *f = fopen(argv[2], "w");
        if (!f) {
            perror(argv[2]);
            return 1;
        }
        fputs(argv[3], f);
        fclose(f);
        return print_file(argv[2]);
    }
    if (!strcmp(cmd, "read") && argc == 3) return print_file(argv[2]);
    if (!strcmp(cmd, "exit") && argc == 3) {
        fflush(stdout);
        exit(atoi(argv[2]));
    }
    if (!strcmp(cmd, "busy")) {
        puts("busy");
        fflush(stdout);
        for (volatile unsigned long n = 0;; n++) {
        }
    }
    if (!strcmp(cmd, "sleep") && argc == 3) {
        puts("sleeping");
        fflush(stdout);
        for (;;) sleep(atoi(argv[2]));
    }
    fprintf(stderr, "usage: ctool echo | write PATH TEXT | read PATH | exit N | busy | sleep SECS\n");
    return 2;
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(program: Program) {
        let data = bytes(program).expect("build");
        let mut v = wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all());
        v.validate_all(&data)
            .unwrap_or_else(|e| panic!("{} does not validate: {e}", program.file_name()));
        let is_component = wasmparser::Parser::is_component(&data);
        assert_eq!(
            is_component,
            program.is_component(),
            "{}",
            program.file_name()
        );
    }

    #[test]
    fn wat_programs_build_and_validate() {
        for p in [
            Program::Hello,
            Program::Echo,
            Program::FileIo,
            Program::Exit42,
            Program::Busy,
            Program::Idle,
            Program::Trap,
            Program::UnknownImport,
        ] {
            validate(p);
        }
        assert!(!bytes(Program::NotAModule)
            .expect("bytes")
            .starts_with(b"\0asm"));
    }

    #[test]
    fn c_program_builds_with_wasi_libc() {
        validate(Program::CTool);
    }

    #[test]
    fn components_build() {
        for p in [
            Program::HelloComponent,
            Program::CToolComponent,
            Program::NoRunComponent,
            Program::HttpComponent,
            Program::HttpBusyComponent,
        ] {
            validate(p);
        }
    }

    #[test]
    fn custom_section_keeps_the_module_valid() {
        let hello = bytes(Program::Hello).expect("hello");
        let unique = with_custom_section(&hello, "shimtest", &[7u8; 300]);
        assert_ne!(unique, hello);
        wasmparser::Validator::new()
            .validate_all(&unique)
            .expect("still a valid module");
    }

    #[test]
    fn second_build_reuses_the_cache() {
        assert_eq!(
            path(Program::Hello).expect("a"),
            path(Program::Hello).expect("b")
        );
    }
}
