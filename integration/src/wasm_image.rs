//! OCI Wasm image archives: modules and components as image layers of their own.
//!
//! Two shapes exist in the wild, and both are built here for `ctr images import`:
//!
//! * runwasi's: an ordinary OCI image config with `architecture: wasm`, whose layers have
//!   the media type `application/wasm` or
//!   `application/vnd.bytecodealliance.wasm.component.layer.v0+wasm` ([`WasmImage::Module`],
//!   [`WasmImage::Component`]);
//! * the CNCF Wasm working group's artifact: config `application/vnd.wasm.config.v0+json`
//!   (`architecture: wasm`, `os: wasip1`, `layerDigests`) with `application/wasm` layers
//!   ([`WasmImage::ArtifactV0`]).
//!
//! containerd 1.6 unpacks every layer into a snapshot before a container can use an image
//! and has no idea what a Wasm layer is ("failed to get stream processor for
//! application/wasm"). The harness therefore registers a stream processor for the Wasm
//! media types ([`PROCESSOR_SCRIPT`]) that turns any Wasm layer into an empty tar, and each
//! config here lists that empty tar's digest in `rootfs.diff_ids`, one per layer: the
//! snapshot stays empty, and the module is only ever read from the content store, which is
//! what the shim must do. ctr 1.6 still refuses to *run* the artifact shape ("unknown image
//! config media type"), so that one can be imported but not started through ctr.

use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::Error;
use crate::image::{hex, tar_err, write_archive, Blob};

/// Layer media type of a core module (runwasi, CNCF artifact).
pub const MT_WASM_MODULE: &str = "application/wasm";

/// Layer media type of a component (runwasi, wasm-pkg tooling).
pub const MT_WASM_COMPONENT: &str = "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm";

/// Config media type of the CNCF Wasm OCI artifact.
pub const MT_WASM_CONFIG_V0: &str = "application/vnd.wasm.config.v0+json";

const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// What the stream processor writes for every Wasm layer: an empty tar (two zero blocks).
pub const EMPTY_TAR: [u8; 1024] = [0; 1024];

/// The stream processor containerd runs for Wasm layers: reads the layer, writes
/// [`EMPTY_TAR`]. `sh`, `cat` and `head` are the host's.
pub const PROCESSOR_SCRIPT: &str = "#!/bin/sh\n# Wasm layer -> empty tar (integration harness)\ncat >/dev/null\nexec head -c 1024 /dev/zero\n";

/// The media types the harness's stream processor accepts.
pub const PROCESSED_MEDIA_TYPES: &[&str] = &[MT_WASM_MODULE, MT_WASM_COMPONENT];

/// Which image to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmImage {
    /// OCI config, `architecture: wasm`, one `application/wasm` layer.
    Module,
    /// OCI config, `architecture: wasm`, one component layer.
    Component,
    /// CNCF artifact: `application/vnd.wasm.config.v0+json`, one `application/wasm` layer.
    ArtifactV0,
    /// OCI config with `architecture: wasm` but no layer at all (bad input).
    NoWasmLayer,
}

/// `sha256:` digest of [`EMPTY_TAR`], the diff id of every processed Wasm layer.
pub fn empty_tar_diff_id() -> String {
    format!("sha256:{}", hex(&Sha256::digest(EMPTY_TAR)))
}

/// Writes an OCI Wasm image archive named `image_ref` holding `wasm` (ignored for
/// [`WasmImage::NoWasmLayer`]); its process is `entrypoint`. `dest` works as for
/// [`crate::image::busybox_oci_archive`] (a directory gets `wasm.oci.tar`).
///
/// Import it with `ctr images import --all-platforms`: the platform is `wasm/wasip1`,
/// which the default host-platform filter would skip.
pub fn wasm_oci_archive(
    dest: &Path,
    image_ref: &str,
    kind: WasmImage,
    wasm: &[u8],
    entrypoint: &[&str],
) -> Result<PathBuf, Error> {
    let layers: Vec<(Blob, &str)> = match kind {
        WasmImage::Module | WasmImage::ArtifactV0 => {
            vec![(Blob::new(wasm.to_vec()), MT_WASM_MODULE)]
        }
        WasmImage::Component => vec![(Blob::new(wasm.to_vec()), MT_WASM_COMPONENT)],
        WasmImage::NoWasmLayer => Vec::new(),
    };
    let diff_ids: Vec<String> = layers.iter().map(|_| empty_tar_diff_id()).collect();
    let (config, config_mt) = match kind {
        WasmImage::ArtifactV0 => (
            json!({
                "created": "1970-01-01T00:00:00Z",
                "architecture": "wasm",
                "os": "wasip1",
                "layerDigests": layers.iter().map(|(l, _)| l.digest()).collect::<Vec<_>>(),
                "rootfs": { "type": "layers", "diff_ids": diff_ids },
            }),
            MT_WASM_CONFIG_V0,
        ),
        _ => (
            json!({
                "created": "1970-01-01T00:00:00Z",
                "architecture": "wasm",
                "os": "wasip1",
                "config": { "Entrypoint": entrypoint, "WorkingDir": "/" },
                "rootfs": { "type": "layers", "diff_ids": diff_ids },
                "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "integration harness" }],
            }),
            MT_OCI_CONFIG,
        ),
    };
    let config = Blob::new(serde_json::to_vec(&config).map_err(|source| Error::Json {
        what: "wasm image config",
        source,
    })?);
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": config.descriptor(config_mt),
        "layers": layers.iter().map(|(l, mt)| l.descriptor(mt)).collect::<Vec<_>>(),
    });
    if kind == WasmImage::ArtifactV0 {
        manifest["artifactType"] = json!(MT_WASM_CONFIG_V0);
    }
    let manifest = Blob::new(serde_json::to_vec(&manifest).map_err(|source| Error::Json {
        what: "wasm image manifest",
        source,
    })?);
    let mut mdesc = manifest.descriptor(MT_MANIFEST);
    mdesc["platform"] = json!({ "architecture": "wasm", "os": "wasip1" });
    mdesc["annotations"] = json!({
        "io.containerd.image.name": image_ref,
        "org.opencontainers.image.ref.name": image_ref,
    });
    let index = json!({ "schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [mdesc] });
    let index = serde_json::to_vec(&index).map_err(|source| Error::Json {
        what: "wasm image index",
        source,
    })?;

    let mut b = tar::Builder::new(Vec::new());
    let mut blobs: Vec<&Blob> = layers.iter().map(|(l, _)| l).collect();
    blobs.push(&config);
    blobs.push(&manifest);
    for blob in blobs {
        let path = format!("blobs/sha256/{}", blob.digest_hex);
        let mut h = crate::image::header(tar::EntryType::Regular, 0o644, blob.data.len() as u64);
        b.append_data(&mut h, &path, blob.data.as_slice())
            .map_err(tar_err(&path))?;
    }
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    for (path, data) in [("oci-layout", &layout[..]), ("index.json", &index[..])] {
        let mut h = crate::image::header(tar::EntryType::Regular, 0o644, data.len() as u64);
        b.append_data(&mut h, path, data).map_err(tar_err(path))?;
    }
    let archive = b.into_inner().map_err(tar_err("archive trailer"))?;
    write_archive(dest, "wasm.oci.tar", &archive)
}

/// The digest (`sha256:…`) of `wasm` as a layer: what the shim's precompile cache is keyed
/// on and what `ctr content ls` lists.
pub fn layer_digest(wasm: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(wasm)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(path: &Path) -> Vec<(String, Vec<u8>)> {
        let data = std::fs::read(path).expect("read");
        let mut ar = tar::Archive::new(data.as_slice());
        ar.entries()
            .expect("entries")
            .map(|e| {
                let mut e = e.expect("entry");
                let name = e.path().expect("path").to_string_lossy().into_owned();
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut buf).expect("read entry");
                (name, buf)
            })
            .collect()
    }

    #[test]
    fn module_image_has_wasm_layer_and_matching_diff_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wasm = b"\0asm\x01\0\0\0".to_vec();
        let a = wasm_oci_archive(
            dir.path(),
            "localhost/t/m:1",
            WasmImage::Module,
            &wasm,
            &["/m.wasm"],
        )
        .expect("archive");
        let all = entries(&a);
        let layer = format!(
            "blobs/sha256/{}",
            layer_digest(&wasm).trim_start_matches("sha256:")
        );
        assert!(
            all.iter().any(|(n, d)| *n == layer && *d == wasm),
            "wasm blob as is"
        );
        let manifest = all
            .iter()
            .filter_map(|(_, d)| serde_json::from_slice::<serde_json::Value>(d).ok())
            .find(|v| v["layers"].is_array())
            .expect("manifest");
        assert_eq!(manifest["layers"][0]["mediaType"], MT_WASM_MODULE);
        let config = all
            .iter()
            .filter_map(|(_, d)| serde_json::from_slice::<serde_json::Value>(d).ok())
            .find(|v| v["architecture"] == "wasm")
            .expect("config");
        assert_eq!(config["rootfs"]["diff_ids"], json!([empty_tar_diff_id()]));
    }

    #[test]
    fn artifact_and_empty_shapes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = wasm_oci_archive(
            &dir.path().join("a.tar"),
            "localhost/t/a:1",
            WasmImage::ArtifactV0,
            b"x",
            &[],
        )
        .expect("artifact");
        let manifest = entries(&a)
            .into_iter()
            .filter_map(|(_, d)| serde_json::from_slice::<serde_json::Value>(&d).ok())
            .find(|v| v["layers"].is_array())
            .expect("manifest");
        assert_eq!(manifest["config"]["mediaType"], MT_WASM_CONFIG_V0);
        let e = wasm_oci_archive(
            &dir.path().join("e.tar"),
            "localhost/t/e:1",
            WasmImage::NoWasmLayer,
            b"x",
            &["/x.wasm"],
        )
        .expect("empty");
        let manifest = entries(&e)
            .into_iter()
            .filter_map(|(_, d)| serde_json::from_slice::<serde_json::Value>(&d).ok())
            .find(|v| v["layers"].is_array())
            .expect("manifest");
        assert_eq!(manifest["layers"], json!([]));
    }
}
