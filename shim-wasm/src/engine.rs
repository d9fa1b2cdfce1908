//! The one wasmtime setup both sides use: the shim compiles and checks, the container init
//! loads the artifact and runs it. Same `Config` on both sides, or the artifact is refused.
//!
//! The shim never runs guest code and creates no wasmtime threads (no parallel
//! compilation, no runtime), because it forks containers afterwards.
//!
//! One `Config` serves `wasi:cli/run` (sync calls) and `wasi:http` (async calls): since
//! wasmtime 48 a store chooses per call (`Config::async_support` is a no-op), so the
//! compatibility hash, and with it the precompile cache key, is the same for both.

use std::hash::{Hash, Hasher};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, ResourceTable};
use wasmtime::{Config, Engine, Module};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::{WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use shim_common::{Error, Result};

/// A core module or a component: decided by the bytes, never by the file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Module,
    Component,
}

impl Kind {
    /// Reads the binary header (`\0asm` + version 1 is a module; the component layer
    /// otherwise) or, for `.wat` text, the first form.
    pub fn of(bytes: &[u8]) -> Kind {
        if bytes.starts_with(b"\0asm") {
            return match bytes.get(4..8) {
                Some([1, 0, 0, 0]) => Kind::Module,
                _ => Kind::Component,
            };
        }
        let text = String::from_utf8_lossy(bytes);
        let first_form = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with(";;"))
            .collect::<Vec<_>>()
            .join(" ");
        if first_form.trim_start().starts_with("(component") {
            Kind::Component
        } else {
            Kind::Module
        }
    }
}

/// The engine configuration, shared by compile and run so the compatibility hash matches.
pub fn config() -> Config {
    let mut c = Config::new();
    c.wasm_component_model(true)
        // SIGTERM/SIGINT interrupt a guest in a busy loop: see `guest::signals`.
        .epoch_interruption(true)
        // Guest memory is reserved, not committed; small guards keep the virtual size of
        // many idle containers modest without costing resident memory.
        .memory_guard_size(64 << 10)
        .memory_reservation_for_growth(1 << 20)
        .cranelift_opt_level(wasmtime::OptLevel::Speed);
    c
}

pub fn engine() -> Result<Engine> {
    Engine::new(&config()).map_err(|e| Error::Runtime(format!("wasmtime engine: {e:#}")))
}

/// The cache key of an artifact: hex sha256 of the engine's compatibility hash and the
/// source's digest, so a wasmtime upgrade or a config change compiles anew.
pub fn cache_key(engine: &Engine, digest: &str) -> String {
    let mut hasher = ShaHasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hasher.0.update(digest.as_bytes());
    hex(&hasher.0.finalize())
}

/// `sha256:<hex>` of raw bytes (the digest of a module read from a rootfs).
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds `Hash` output into sha256 (std's hashers are not stable across releases).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// Compiles `source` (binary or `.wat` text) to an artifact `Module/Component::deserialize`
/// accepts.
pub fn precompile(engine: &Engine, kind: Kind, source: &[u8]) -> Result<Vec<u8>> {
    let text = std::str::from_utf8(source).map(str::trim_start);
    let looks_wat = text.is_ok_and(|t| t.starts_with('(') || t.starts_with(";;"));
    if !source.starts_with(b"\0asm") && !looks_wat {
        return Err(Error::InvalidArgument(
            "not a Wasm module or component: neither the \\0asm binary header nor WAT text".into(),
        ));
    }
    let compiled = match kind {
        Kind::Module => engine.precompile_module(source),
        Kind::Component => engine.precompile_component(source),
    };
    compiled.map_err(|e| Error::InvalidArgument(format!("not a valid Wasm {}: {e:#}", kind.noun())))
}

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::Module => "module",
            Kind::Component => "component",
        }
    }
}

/// What [`check`] found in an artifact that wasmtime could not load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    Usable,
    /// Not an artifact of this engine (truncated, another wasmtime, another CPU): compile
    /// again. Why, in wasmtime's words.
    Corrupt(String),
}

/// Loads `artifact` and checks it can run here: every import is a host function we provide,
/// and the entry point exists. This is what a container would find out too late.
pub fn check(engine: &Engine, kind: Kind, artifact: &[u8], func: Option<&str>) -> Result<Checked> {
    let bad = |e: wasmtime::Error| Error::InvalidArgument(format!("{e:#}"));
    match kind {
        Kind::Module => {
            // SAFETY: the artifact was produced by `precompile` with this configuration or
            // read from the content store, whose integrity `deserialize` checks (header,
            // engine compatibility, ELF structure) before using it.
            let module = match unsafe { Module::deserialize(engine, artifact) } {
                Ok(m) => m,
                Err(e) => return Ok(Checked::Corrupt(format!("{e:#}"))),
            };
            module_linker(engine)?
                .instantiate_pre(&module)
                .map_err(|e| {
                    bad(e.context("module imports a host function WASI does not provide"))
                })?;
            let name = func.unwrap_or("_start");
            match module.get_export(name) {
                Some(wasmtime::ExternType::Func(_)) => Ok(Checked::Usable),
                _ => Err(Error::InvalidArgument(format!(
                    "module exports no function {name:?}{}",
                    if func.is_none() {
                        " (a reactor module needs `#<export>` after its path)"
                    } else {
                        ""
                    }
                ))),
            }
        }
        Kind::Component => {
            // SAFETY: as above.
            let component = match unsafe { Component::deserialize(engine, artifact) } {
                Ok(m) => m,
                Err(e) => return Ok(Checked::Corrupt(format!("{e:#}"))),
            };
            if func.is_some() {
                return Err(Error::InvalidArgument(
                    "`#<export>` selects a core module export; a component runs wasi:cli/run"
                        .into(),
                ));
            }
            match component_entry(engine, &component) {
                Some(Entry::Run) => {}
                Some(Entry::HttpHandler) => {
                    let pre = http_linker(engine)?
                        .instantiate_pre(&component)
                        .map_err(|e| {
                            bad(e.context("component imports an interface WASI does not provide"))
                        })?;
                    ProxyPre::new(pre).map_err(bad)?;
                    return Ok(Checked::Usable);
                }
                None => {
                    return Err(Error::InvalidArgument(
                        "component exports neither wasi:cli/run nor wasi:http/incoming-handler"
                            .into(),
                    ))
                }
            }
            let pre = component_linker(engine)?
                .instantiate_pre(&component)
                .map_err(|e| {
                    bad(e.context("component imports an interface WASI does not provide"))
                })?;
            wasmtime_wasi::p2::bindings::sync::CommandPre::new(pre).map_err(bad)?;
            Ok(Checked::Usable)
        }
    }
}

/// How a component is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Run,
    HttpHandler,
}

pub fn component_entry(engine: &Engine, component: &Component) -> Option<Entry> {
    let ty = component.component_type();
    let names: Vec<&str> = ty.exports(engine).map(|(name, _)| name).collect();
    let has = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
    if has("wasi:cli/run@") {
        Some(Entry::Run)
    } else if has("wasi:http/incoming-handler@") {
        Some(Entry::HttpHandler)
    } else {
        None
    }
}

/// WASI preview 1 for core modules.
pub fn module_linker(engine: &Engine) -> Result<wasmtime::Linker<WasiP1Ctx>> {
    let mut linker = wasmtime::Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |cx| cx)
        .map_err(|e| Error::Runtime(format!("WASI preview 1 linker: {e:#}")))?;
    Ok(linker)
}

/// A component's store data: its WASI context and resource table.
pub struct ComponentState {
    pub ctx: WasiCtx,
    pub table: ResourceTable,
}

impl WasiView for ComponentState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

/// WASI preview 2 for components.
pub fn component_linker(engine: &Engine) -> Result<wasmtime::component::Linker<ComponentState>> {
    let mut linker = wasmtime::component::Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
        .map_err(|e| Error::Runtime(format!("WASI preview 2 linker: {e:#}")))?;
    Ok(linker)
}

/// One HTTP request's store data: WASI, `wasi:http`, and their shared resource table.
pub struct HttpState {
    pub ctx: WasiCtx,
    pub http: WasiHttpCtx,
    pub table: ResourceTable,
    pub hooks: DenyOutgoing,
}

impl HttpState {
    pub fn new(ctx: WasiCtx) -> HttpState {
        HttpState {
            ctx,
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            hooks: DenyOutgoing,
        }
    }
}

impl WasiView for HttpState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HttpState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// `wasi:http/outgoing-handler` answers `HTTP-request-denied`: wasmtime-wasi-http's own
/// client needs its `default-send-request` feature, which links rustls for HTTPS. A guest
/// still reaches the network through `wasi:sockets`.
pub struct DenyOutgoing;

/// A future as `WasiHttpHooks::send_request` takes and returns them.
type HttpFuture<T> = Box<dyn std::future::Future<Output = wasmtime_wasi_http::Result<T>> + Send>;

impl WasiHttpHooks for DenyOutgoing {
    fn send_request(
        &mut self,
        _request: http::Request<WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: HttpFuture<()>,
    ) -> HttpFuture<(http::Response<WasiBody>, HttpFuture<()>)> {
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

/// WASI preview 2 and `wasi:http`, async: request handlers run as tasks of the init's
/// HTTP server.
pub fn http_linker(engine: &Engine) -> Result<wasmtime::component::Linker<HttpState>> {
    let mut linker = wasmtime::component::Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .and_then(|()| wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker))
        .map_err(|e| Error::Runtime(format!("wasi:http linker: {e:#}")))?;
    Ok(linker)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = r#"(module
        (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
        (memory (export "memory") 1)
        (func (export "_start") (call $exit (i32.const 3))))"#;

    #[test]
    fn kind_from_bytes() {
        assert_eq!(Kind::of(b"\0asm\x01\0\0\0"), Kind::Module);
        assert_eq!(Kind::of(b"\0asm\x0d\0\x01\0"), Kind::Component);
        assert_eq!(Kind::of(HELLO.as_bytes()), Kind::Module);
        assert_eq!(Kind::of(b";; hi\n  (component)"), Kind::Component);
    }

    #[test]
    fn compile_check_and_key() {
        let engine = engine().unwrap();
        let art = precompile(&engine, Kind::Module, HELLO.as_bytes()).unwrap();
        assert_eq!(
            check(&engine, Kind::Module, &art, None).unwrap(),
            Checked::Usable
        );
        let err = check(&engine, Kind::Module, &art, Some("nope")).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let k1 = cache_key(&engine, "sha256:aa");
        assert_eq!(k1, cache_key(&engine, "sha256:aa"));
        assert_ne!(k1, cache_key(&engine, "sha256:ab"));
        assert_eq!(k1.len(), 64);
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let engine = engine().unwrap();
        let err = precompile(&engine, Kind::Module, b"\0asmjunkjunk").unwrap_err();
        assert!(err.to_string().contains("not a valid Wasm module"), "{err}");
        let err = precompile(&engine, Kind::Module, b"this is not wasm").unwrap_err();
        assert!(err.to_string().contains("neither the \\0asm"), "{err}");
        let unknown =
            r#"(module (import "env" "launch_missiles" (func)) (func (export "_start")))"#;
        let art = precompile(&engine, Kind::Module, unknown.as_bytes()).unwrap();
        let err = check(&engine, Kind::Module, &art, None).unwrap_err();
        assert!(err.to_string().contains("launch_missiles"), "{err}");
        let corrupt = &art[..art.len() / 2];
        let checked = check(&engine, Kind::Module, corrupt, None).unwrap();
        assert!(matches!(checked, Checked::Corrupt(_)), "{checked:?}");
        let art = precompile(&engine, Kind::Component, b"(component)").unwrap();
        let err = check(&engine, Kind::Component, &art, None).unwrap_err();
        assert!(err.to_string().contains("neither wasi:cli/run"), "{err}");
    }
}
