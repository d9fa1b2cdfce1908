//! What the Wasm shim's end-to-end tests and its benchmark start from: a private containerd
//! with our `containerd-shim-wasm-v2` on its `PATH`, and images holding the test programs.

use std::path::Path;

use crate::containerd::{Containerd, WASM_SHIM_BINARY};
use crate::error::Error;
use crate::image::{busybox_with_files_oci_archive, ImageFile};
use crate::wasm_image::{wasm_oci_archive, WasmImage};
use crate::wasm_modules::{self, Program};
use crate::{require_root, target_bin_dir};

/// Busybox plus every test program at `/<file name>` (and `/hello.wat`): modules run from
/// the rootfs, native binaries for exec and sidecars.
pub const BUSYBOX_WASM_REF: &str = "localhost/shimtest/busybox-wasm:1";

/// The text of [`Program::Hello`], stored as `/hello.wat` in [`BUSYBOX_WASM_REF`].
pub const HELLO_WAT_PATH: &str = "/hello.wat";

/// Panics (test-only) with a clear message unless our Wasm shim is built.
pub fn require_wasm_shim() {
    let shim = target_bin_dir().join(WASM_SHIM_BINARY);
    assert!(
        shim.exists(),
        "build the Wasm shim first: {} is missing (cargo build --release -p shim-wasm)",
        shim.display()
    );
}

/// A private containerd with our binaries first on its `PATH` and [`BUSYBOX_WASM_REF`]
/// imported into its namespace.
pub fn with_wasm_shim() -> Containerd {
    require_root();
    require_wasm_shim();
    let c = Containerd::builder()
        .bin_dir(target_bin_dir())
        .start()
        .expect("start containerd");
    let ns = c.namespace().to_string();
    import_busybox_wasm(&c, &ns).expect("import the busybox-wasm image");
    c
}

/// Builds [`BUSYBOX_WASM_REF`] into `c`'s directory and imports it into `namespace`.
pub fn import_busybox_wasm(c: &Containerd, namespace: &str) -> Result<(), Error> {
    let programs: Vec<(Program, Vec<u8>)> = Program::ALL
        .iter()
        .map(|&p| wasm_modules::bytes(p).map(|b| (p, b)))
        .collect::<Result<_, _>>()?;
    let hello_wat = wasm_modules::hello_wat();
    let mut files: Vec<ImageFile<'_>> = programs
        .iter()
        .map(|(p, data)| ImageFile {
            path: p.file_name(),
            mode: 0o644,
            data,
        })
        .collect();
    files.push(ImageFile {
        path: HELLO_WAT_PATH.trim_start_matches('/'),
        mode: 0o644,
        data: hello_wat.as_bytes(),
    });
    let archive = busybox_with_files_oci_archive(
        &c.dir().join("busybox-wasm.oci.tar"),
        BUSYBOX_WASM_REF,
        &files,
        &["/hello.wasm"],
    )?;
    import(c, namespace, &archive)
}

/// Builds an OCI Wasm image of `kind` holding `program` as `image_ref` and imports it into
/// `namespace` (every platform: its own is `wasm/wasip1`).
pub fn import_wasm_image(
    c: &Containerd,
    namespace: &str,
    image_ref: &str,
    kind: WasmImage,
    program: Program,
) -> Result<(), Error> {
    let wasm = wasm_modules::bytes(program)?;
    let entrypoint = format!("/{}", program.file_name());
    import_wasm_bytes(c, namespace, image_ref, kind, &wasm, &entrypoint)
}

/// [`import_wasm_image`] of any bytes (a module made unique with
/// [`wasm_modules::with_custom_section`], say), with process `entrypoint`.
pub fn import_wasm_bytes(
    c: &Containerd,
    namespace: &str,
    image_ref: &str,
    kind: WasmImage,
    wasm: &[u8],
    entrypoint: &str,
) -> Result<(), Error> {
    let file = format!("{}.oci.tar", image_ref.replace(['/', ':'], "_"));
    let archive = wasm_oci_archive(&c.dir().join(file), image_ref, kind, wasm, &[entrypoint])?;
    import(c, namespace, &archive)
}

fn import(c: &Containerd, namespace: &str, archive: &Path) -> Result<(), Error> {
    let archive = archive.to_string_lossy();
    c.try_ctr_in(
        namespace,
        &["images", "import", "--all-platforms", archive.as_ref()],
    )?;
    Ok(())
}

/// The shim daemons serving `c`: [`Containerd::shim_pids`] less the processes those
/// daemons forked without exec (a Wasm container's init keeps the shim's command line).
pub fn shim_daemons(c: &Containerd) -> Vec<i32> {
    let pids = c.shim_pids();
    pids.iter()
        .copied()
        .filter(|&pid| parent(pid).is_none_or(|ppid| !pids.contains(&ppid)))
        .collect()
}

/// `pid`'s parent, from `/proc/<pid>/stat`.
pub fn parent(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
