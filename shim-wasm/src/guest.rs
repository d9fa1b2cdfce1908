//! The container init's life when it runs Wasm: load the artifact the shim prepared, give the
//! guest its args, env, dirs and stdio, run it, and exit with its code.
//!
//! Runs after libcontainer's clone, inside the container's namespaces, cgroup and seccomp
//! profile, with the rootfs as `/`. This is the first place wasmtime may start threads.

use std::fs::File;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use oci_spec::runtime::Spec;
use wasmtime::component::{Component, ResourceTable};
use wasmtime::{Engine, Module, Store};
use wasmtime_wasi::cli::OutputFile;
use wasmtime_wasi::p2::bindings::sync::Command;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder};

use crate::engine::{self, ComponentState, Entry, Kind};
use crate::entrypoint::Entrypoint;
use crate::{http, log};

/// What the init runs, prepared by the shim: an artifact on an inherited fd.
#[derive(Debug, Clone)]
pub struct Guest {
    pub id: String,
    pub kind: Kind,
    /// The precompiled artifact, opened by the shim before the clone.
    pub artifact_fd: RawFd,
    pub func: Option<String>,
}

/// How long a guest blocked in a host call (sleep, read) gets after SIGTERM before the init
/// exits anyway; a guest running Wasm code stops at once through the epoch.
const SIGNAL_GRACE: Duration = Duration::from_millis(100);

/// The signal that stopped the guest, 0 while none has.
pub(crate) static STOPPED_BY: AtomicI32 = AtomicI32::new(0);

/// Runs the guest to completion and exits the process with its exit code.
pub fn run(guest: &Guest, spec: &Spec) -> ! {
    let code = match execute(guest, spec) {
        Ok(code) => code,
        Err(msg) => {
            log::write("error", &format!("container {}: {msg}", guest.id));
            match STOPPED_BY.load(Ordering::SeqCst) {
                0 => 137,
                sig => 128 + sig,
            }
        }
    };
    std::process::exit(code)
}

fn execute(guest: &Guest, spec: &Spec) -> Result<i32, String> {
    // The shim's logger writes to fd 2, which is the guest's stderr here: silence it (this
    // process reports through `log::write`).
    ::log::set_max_level(::log::LevelFilter::Off);
    close_inherited_fds(guest.artifact_fd);
    let engine = engine::engine().map_err(|e| e.to_string())?;
    watch_signals(&engine)?;
    // SAFETY: the fd is the artifact the shim wrote and checked; nothing writes to it while
    // it is mapped (the shim replaces cache entries by rename, never in place).
    let file = unsafe { File::from_raw_fd(guest.artifact_fd) };
    match guest.kind {
        Kind::Module => {
            // SAFETY: see above: a file produced by `Engine::precompile_module`.
            let module = unsafe { Module::deserialize_open_file(&engine, file) }
                .map_err(|e| format!("load module: {e:#}"))?;
            let linker = engine::module_linker(&engine).map_err(|e| e.to_string())?;
            let mut store = Store::new(&engine, wasi_context(spec)?.build_p1());
            arm_epoch(&mut store);
            let instance = linker
                .instantiate(&mut store, &module)
                .map_err(|e| format!("instantiate: {e:#}"))?;
            let name = guest.func.as_deref().unwrap_or("_start");
            let func = instance
                .get_typed_func::<(), ()>(&mut store, name)
                .map_err(|e| format!("export {name:?}: {e:#}"))?;
            exit_code(func.call(&mut store, ()).map(|()| 0))
        }
        Kind::Component => {
            let component = load_component(&engine, file)?;
            if engine::component_entry(&engine, &component) == Some(Entry::HttpHandler) {
                return http::serve(&engine, &component, spec, &guest.id);
            }
            let linker = engine::component_linker(&engine).map_err(|e| e.to_string())?;
            let state = ComponentState {
                ctx: wasi_context(spec)?.build(),
                table: ResourceTable::new(),
            };
            let mut store = Store::new(&engine, state);
            arm_epoch(&mut store);
            let command = Command::instantiate(&mut store, &component, &linker)
                .map_err(|e| format!("instantiate: {e:#}"))?;
            let ran = command.wasi_cli_run().call_run(&mut store);
            exit_code(ran.map(|r| if r.is_ok() { 0 } else { 1 }))
        }
    }
}

fn load_component(engine: &Engine, file: File) -> Result<Component, String> {
    use std::os::fd::AsRawFd;
    // Mapped through /proc so its pages are shared with every container of the same image;
    // without /proc, a private copy.
    let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    // SAFETY: as for modules.
    match unsafe { Component::deserialize_file(engine, &proc_path) } {
        Ok(c) => Ok(c),
        Err(_) => {
            use std::io::Read;
            let mut bytes = Vec::new();
            (&file)
                .read_to_end(&mut bytes)
                .map_err(|e| format!("read component artifact: {e}"))?;
            // SAFETY: as for modules.
            unsafe { Component::deserialize(engine, &bytes) }
                .map_err(|e| format!("load component: {e:#}"))
        }
    }
}

/// The init was cloned from the shim and never execs: every fd the shim had (its ttrpc
/// sockets, other containers' pipes) is still open here. Keep stdio, the artifact and the
/// shim log only.
fn close_inherited_fds(artifact_fd: RawFd) {
    let keep = [artifact_fd, log::fd()];
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2 && !keep.contains(fd))
        .collect();
    for fd in fds {
        // SAFETY: nothing in this process uses these fds: they belong to the shim's threads,
        // which do not exist here. (The directory's own fd fails harmlessly.)
        unsafe { libc::close(fd) };
    }
}

/// The guest traps at the next epoch tick: only a signal ticks it, so a running guest pays
/// nothing until it must stop.
pub(crate) fn arm_epoch<T>(store: &mut Store<T>) {
    store.set_epoch_deadline(1);
    store.epoch_deadline_trap();
}

/// The guest's exit code: `proc_exit`/`wasi:cli/exit`, 128+signal when stopped by one, 137
/// with the trap in the shim log otherwise.
fn exit_code(result: wasmtime::Result<i32>) -> Result<i32, String> {
    match result {
        Ok(code) => Ok(code),
        Err(e) => {
            if let Some(exit) = e.downcast_ref::<I32Exit>() {
                return Ok(exit.0);
            }
            match STOPPED_BY.load(Ordering::SeqCst) {
                0 => Err(format!("wasm trap: {e:?}")),
                sig => Ok(128 + sig),
            }
        }
    }
}

/// SIGTERM/SIGINT: blocked here and taken by a thread that ticks the epoch (the guest traps
/// at its next loop back-edge or call), tells an HTTP server to stop, and exits the process
/// if the guest is stuck in a host call. The init is PID 1 of its namespace, where an
/// unhandled signal is ignored; a blocked one is not.
fn watch_signals(engine: &Engine) -> Result<(), String> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block()
        .map_err(|e| format!("block signals: {e}"))?;
    let engine = engine.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let Ok(sig) = set.wait() else { return };
            STOPPED_BY.store(sig as i32, Ordering::SeqCst);
            engine.increment_epoch();
            http::SHUTDOWN.notify_one();
            std::thread::sleep(SIGNAL_GRACE);
            // SAFETY: _exit ends the process without running anything else.
            unsafe { libc::_exit(128 + sig as i32) }
        })
        .map_err(|e| format!("spawn signal thread: {e}"))?;
    Ok(())
}

/// args, env, stdio (fds 0-2 are the container's stdio) and preopened dirs from the spec.
pub(crate) fn wasi_context(spec: &Spec) -> Result<WasiCtxBuilder, String> {
    let mut b = WasiCtxBuilder::new();
    let process = spec.process().as_ref();
    let mut args: Vec<String> = process.and_then(|p| p.args().clone()).unwrap_or_default();
    if let Some(first) = args.first_mut() {
        *first = Entrypoint::parse(first).path;
    }
    b.args(&args);
    let env: Vec<(String, String)> = process
        .and_then(|p| p.env().clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    b.envs(&env);
    b.inherit_stdin()
        .inherit_network()
        .allow_blocking_current_thread(true);
    let terminal = process.and_then(|p| p.terminal()).unwrap_or(false);
    if terminal {
        b.inherit_stdout().inherit_stderr();
    } else {
        // Unbuffered, synchronous writes straight to the pipes: what the guest wrote is in
        // the pipe before it can exit, so no output is lost to a buffer the exit skips.
        b.stdout(OutputFile::new(dup_stdio(1)?))
            .stderr(OutputFile::new(dup_stdio(2)?));
    }
    let root_ro = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    preopen(&mut b, "/", root_ro)?;
    for m in spec.mounts().as_deref().unwrap_or_default() {
        let opts = m.options().as_deref().unwrap_or_default();
        let bind = m.typ().as_deref() == Some("bind") || opts.iter().any(|o| o.ends_with("bind"));
        let Some(dest) = m.destination().to_str() else {
            continue;
        };
        // A file bind mount (CRI's /etc/hosts, /etc/resolv.conf) is reached through the
        // `/` preopen; only directories can be preopened.
        let is_dir = std::fs::metadata(dest).is_ok_and(|m| m.is_dir());
        if bind && dest != "/" && is_dir {
            preopen(&mut b, dest, opts.iter().any(|o| o == "ro"))?;
        }
    }
    Ok(b)
}

fn dup_stdio(fd: RawFd) -> Result<File, String> {
    // SAFETY: dup of a standard fd; the new fd is owned by the returned File.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(format!("dup fd {fd}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `new` was just created and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(new) })
}

fn preopen(b: &mut WasiCtxBuilder, dir: &str, readonly: bool) -> Result<(), String> {
    let perms = if readonly {
        FsPerms::ReadOnly
    } else {
        FsPerms::ReadWrite
    };
    b.preopened_dir(dir, dir, perms)
        .map(|_| ())
        .map_err(|e| format!("preopen {dir}: {e:#}"))
}
