//! Serving a `wasi:http/incoming-handler` component from the container init: an HTTP/1
//! server on a current-thread tokio runtime, in the container's network namespace.
//!
//! The component is pre-instantiated once; each request gets a fresh `Store` and instance
//! (the `wasi:http` model: no state survives a request). SIGTERM/SIGINT stop the accept
//! loop through [`SHUTDOWN`] and trap a handler running Wasm through the epoch, so a busy
//! handler cannot hold the runtime's only thread past the signal.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use oci_spec::runtime::Spec;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};
use wasmtime::component::Component;
use wasmtime::{Engine, Store};
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::WasiHttpView;

use crate::engine::{self, HttpState};
use crate::guest::{self, STOPPED_BY};
use crate::log;

/// The container env variable naming the address to serve on (`ip:port`; no name lookup in
/// the init). Read from the OCI process env, like everything the guest sees: the shim's own
/// env is containerd's.
pub const ADDR_ENV: &str = "WASI_HTTP_ADDR";
/// Every interface of the container's own network namespace, the port images expect.
pub const DEFAULT_ADDR: &str = "0.0.0.0:8080";

/// Told by the signal thread: the server stops accepting and the init exits.
/// `notify_one` keeps a permit, so a signal that arrives before the server waits still
/// counts.
pub static SHUTDOWN: Notify = Notify::const_new();

/// Serves `component` until SIGTERM/SIGINT; returns the init's exit code (0: a stop on
/// request is a clean exit for a server).
pub fn serve(engine: &Engine, component: &Component, spec: &Spec, id: &str) -> Result<i32, String> {
    let addr = address(spec)?;
    let pre = engine::http_linker(engine)
        .map_err(|e| e.to_string())?
        .instantiate_pre(component)
        .and_then(ProxyPre::new)
        .map_err(|e| format!("pre-instantiate: {e:#}"))?;
    let server = Arc::new(Server {
        pre,
        spec: spec.clone(),
        id: id.to_string(),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let served = rt.block_on(async {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("bind {ADDR_ENV}={addr}: {e}"))?;
        log::write(
            "info",
            &format!("container {id}: serving wasi:http on {addr}"),
        );
        tokio::spawn(accept(listener, server));
        SHUTDOWN.notified().await;
        Ok(0)
    });
    // Connections and handlers still running are dropped with the process; dropping the
    // runtime would wait for its blocking-pool threads.
    rt.shutdown_background();
    served
}

/// `WASI_HTTP_ADDR` from the process env (the last one wins, as for `getenv`), the default
/// when unset or empty.
fn address(spec: &Spec) -> Result<SocketAddr, String> {
    let prefix = format!("{ADDR_ENV}=");
    let addr = spec
        .process()
        .as_ref()
        .and_then(|p| p.env().as_ref())
        .and_then(|env| env.iter().rev().find_map(|kv| kv.strip_prefix(&prefix)))
        .filter(|a| !a.is_empty())
        .unwrap_or(DEFAULT_ADDR);
    addr.parse()
        .map_err(|e| format!("{ADDR_ENV}={addr}: not an ip:port address ({e})"))
}

async fn accept(listener: TcpListener, server: Arc<Server>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, server.clone()));
            }
            Err(e) => {
                // Out of fds or memory: transient; let running requests finish first.
                log::write("warn", &format!("container {}: accept: {e}", server.id));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: TcpStream, server: Arc<Server>) {
    let service = service_fn(move |req| {
        let server = server.clone();
        async move { Ok::<_, Infallible>(server.handle(req).await) }
    });
    // A client that goes away mid-request is its own business: nothing to report.
    let _ = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

struct Server {
    pre: ProxyPre<HttpState>,
    spec: Spec,
    id: String,
}

impl Server {
    /// The guest's response, or 500 with the reason in the shim log.
    async fn handle(&self, req: hyper::Request<Incoming>) -> hyper::Response<HyperOutgoingBody> {
        match self.respond(req).await {
            Ok(resp) => resp,
            Err(msg) => {
                if STOPPED_BY.load(Ordering::SeqCst) == 0 {
                    log::write("error", &format!("container {}: {msg}", self.id));
                }
                let mut resp = hyper::Response::new(
                    Empty::new()
                        .map_err(|never: Infallible| match never {})
                        .boxed_unsync(),
                );
                *resp.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
                resp
            }
        }
    }

    async fn respond(
        &self,
        req: hyper::Request<Incoming>,
    ) -> Result<hyper::Response<HyperOutgoingBody>, String> {
        let wasi = guest::wasi_context(&self.spec)?.build();
        let mut store = Store::new(self.pre.engine(), HttpState::new(wasi));
        guest::arm_epoch(&mut store);
        let (tx, rx) = oneshot::channel();
        let state = store.data_mut();
        let req = state
            .http()
            .new_incoming_request(Scheme::Http, req)
            .map_err(|e| format!("request: {e:#}"))?;
        let out = state
            .http()
            .new_response_outparam(tx)
            .map_err(|e| format!("response: {e:#}"))?;
        let pre = self.pre.clone();
        // A task of its own: the guest may keep writing the body after it has set the
        // response, while hyper sends what it wrote.
        let handler = tokio::spawn(async move {
            let proxy = pre.instantiate_async(&mut store).await?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, req, out)
                .await
        });
        match rx.await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(code)) => Err(format!("handler answered an error: {code:?}")),
            // The guest dropped the outparam: its task says why.
            Err(_) => match handler.await {
                Ok(Ok(())) => Err("handler returned without setting a response".into()),
                Ok(Err(e)) => Err(format!("handler trapped: {e:?}")),
                Err(e) => Err(format!("handler task: {e}")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{ProcessBuilder, SpecBuilder};

    fn spec(env: &[&str]) -> Spec {
        let process = ProcessBuilder::default()
            .env(env.iter().map(|e| e.to_string()).collect::<Vec<_>>())
            .build()
            .unwrap();
        SpecBuilder::default().process(process).build().unwrap()
    }

    #[test]
    fn address_comes_from_the_process_env() {
        let default: SocketAddr = DEFAULT_ADDR.parse().unwrap();
        assert_eq!(address(&spec(&["PATH=/bin"])), Ok(default));
        assert_eq!(address(&spec(&["WASI_HTTP_ADDR="])), Ok(default));
        assert_eq!(
            address(&spec(&[
                "WASI_HTTP_ADDR=127.0.0.1:1",
                "WASI_HTTP_ADDR=[::1]:9090"
            ])),
            Ok("[::1]:9090".parse().unwrap())
        );
        assert_eq!(
            address(&SpecBuilder::default().build().unwrap()),
            Ok(default)
        );
        let err = address(&spec(&["WASI_HTTP_ADDR=localhost"])).unwrap_err();
        assert!(err.contains("WASI_HTTP_ADDR=localhost"), "{err}");
    }
}
