//! From an image name to its Wasm layers: image → (index → platform manifest) → manifest →
//! config and layers, read from containerd's content store.

use serde_json::Value;
use shim_common::protocol::{grpc, images};
use shim_common::{Error, Result};

use super::grpc::{status_error, Client};
use super::{Layer, WasmImage};

/// The config media type of Wasm OCI artifacts (CNCF TAG Runtime's Wasm OCI artifact layout).
pub const WASM_CONFIG: &str = "application/vnd.wasm.config.v0+json";
/// Layer media types that hold a module or component; other layers are not ours to read.
pub const WASM_LAYERS: &[&str] = &[
    "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
    "application/wasm",
];

const INDEXES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MANIFESTS: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
const IMAGE_CONFIGS: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// Manifests, indexes and configs are small; a larger one is not something to buffer.
const MAX_JSON: i64 = 4 << 20;
/// A module or component larger than this is refused rather than read into memory.
const MAX_LAYER: i64 = 1 << 30;
/// Index → index → manifest is the deepest nesting seen in practice.
const MAX_DEPTH: usize = 3;

/// An OCI descriptor: what a manifest or index says of a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: i64,
}

/// The Wasm layers of image `name`; `None` when it is not a Wasm image.
pub fn resolve(client: &Client, name: &str) -> Result<Option<WasmImage>> {
    let req = images::GetImageRequest {
        name: name.to_string(),
        ..Default::default()
    };
    let resp: images::GetImageResponse = match client.unary(grpc::IMAGES_GET, req, None) {
        Ok(resp) => resp,
        // The image was removed after the container was created; its rootfs snapshot
        // remains, so the container can still run from it.
        Err(s) if s.code() == tonic::Code::NotFound => {
            log::warn!("image {name} not found: not reading wasm layers from it");
            return Ok(None);
        }
        Err(s) => return Err(status_error(format!("get image {name}"), s)),
    };
    let target = resp
        .image
        .into_option()
        .and_then(|i| i.target.into_option())
        .map(|t| Descriptor {
            media_type: t.media_type,
            digest: t.digest,
            size: t.size,
        })
        .ok_or_else(|| Error::Runtime(format!("image {name} has no target")))?;
    let Some(manifest) = find_manifest(client, name, target, 0)? else {
        return Ok(None);
    };
    let manifest = read_json(client, name, &manifest)?;
    let config = descriptor(&manifest["config"])
        .ok_or_else(|| Error::InvalidArgument(format!("image {name}: manifest has no config")))?;
    let wasm_layers: Vec<Descriptor> = manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(descriptor)
        .filter(|d| WASM_LAYERS.contains(&d.media_type.as_str()))
        .collect();
    if config.media_type != WASM_CONFIG {
        // An `architecture: wasm` image with only filesystem layers carries its module in
        // the rootfs (`process.args[0]`), which is not ours to read either.
        if wasm_layers.is_empty() || !IMAGE_CONFIGS.contains(&config.media_type.as_str()) {
            return Ok(None);
        }
        let config = read_json(client, name, &config)?;
        if config["architecture"] != "wasm" {
            return Ok(None);
        }
    }
    if wasm_layers.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "image {name} has a wasm config but no wasm layer (media types {})",
            WASM_LAYERS.join(", ")
        )));
    }
    let layers = wasm_layers
        .into_iter()
        .map(|d| {
            let bytes = read_blob(client, name, &d, MAX_LAYER)?;
            Ok(Layer {
                digest: d.digest,
                media_type: d.media_type,
                bytes,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Some(WasmImage {
        name: name.to_string(),
        layers,
    }))
}

/// The manifest `desc` stands for: itself, or the Wasm platform's (or the only) entry of an
/// index. `None` for other media types and for indexes of other platforms only.
fn find_manifest(
    client: &Client,
    name: &str,
    desc: Descriptor,
    depth: usize,
) -> Result<Option<Descriptor>> {
    if MANIFESTS.contains(&desc.media_type.as_str()) {
        return Ok(Some(desc));
    }
    if !INDEXES.contains(&desc.media_type.as_str()) || depth >= MAX_DEPTH {
        return Ok(None);
    }
    let index = read_json(client, name, &desc)?;
    match pick_platform(&index) {
        Some(next) => find_manifest(client, name, next, depth + 1),
        None => Ok(None),
    }
}

/// The index entry for a Wasm platform (`architecture: wasm` or an `os` of `wasi*`), or the
/// only entry when there is one.
fn pick_platform(index: &Value) -> Option<Descriptor> {
    let entries = index["manifests"].as_array()?;
    let is_wasm = |e: &Value| {
        let p = &e["platform"];
        p["architecture"] == "wasm" || p["os"].as_str().is_some_and(|os| os.starts_with("wasi"))
    };
    entries
        .iter()
        .find(|e| is_wasm(e))
        .or(match entries.as_slice() {
            [only] => Some(only),
            _ => None,
        })
        .and_then(descriptor)
}

fn descriptor(v: &Value) -> Option<Descriptor> {
    Some(Descriptor {
        media_type: v["mediaType"].as_str()?.to_string(),
        digest: v["digest"].as_str()?.to_string(),
        size: v["size"].as_i64()?,
    })
}

fn read_json(client: &Client, name: &str, desc: &Descriptor) -> Result<Value> {
    let bytes = read_blob(client, name, desc, MAX_JSON)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Error::InvalidArgument(format!(
            "image {name}: {} {} is not JSON: {e}",
            desc.media_type, desc.digest
        ))
    })
}

/// Reads a blob, refusing sizes above `max` and answers that disagree with the descriptor.
pub fn read_blob(client: &Client, name: &str, desc: &Descriptor, max: i64) -> Result<Vec<u8>> {
    if !(0..=max).contains(&desc.size) {
        return Err(Error::InvalidArgument(format!(
            "image {name}: {} {} has size {} (limit {max})",
            desc.media_type, desc.digest, desc.size
        )));
    }
    let what = || format!("image {name}: blob {} ({})", desc.digest, desc.media_type);
    let bytes = client
        .read(&desc.digest, desc.size as usize)
        .map_err(|s| status_error(what(), s))?;
    if bytes.len() as i64 != desc.size {
        return Err(Error::Runtime(format!(
            "{}: read {} bytes, descriptor says {}",
            what(),
            bytes.len(),
            desc.size
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(digest: &str, platform: Value) -> Value {
        json!({"mediaType": MANIFESTS[0], "digest": digest, "size": 1, "platform": platform})
    }

    #[test]
    fn index_picks_the_wasm_platform() {
        let index = json!({"manifests": [
            entry("sha256:a", json!({"architecture": "amd64", "os": "linux"})),
            entry("sha256:w", json!({"architecture": "wasm", "os": "wasip1"})),
        ]});
        assert_eq!(pick_platform(&index).unwrap().digest, "sha256:w");
        let index = json!({"manifests": [
            entry("sha256:a", json!({"architecture": "amd64", "os": "linux"})),
            entry("sha256:w", json!({"architecture": "wasm32", "os": "wasip2"})),
        ]});
        assert_eq!(pick_platform(&index).unwrap().digest, "sha256:w");
    }

    #[test]
    fn index_of_one_takes_it_and_of_others_takes_none() {
        let one = json!({"manifests": [entry("sha256:a", json!({"architecture": "amd64"}))]});
        assert_eq!(pick_platform(&one).unwrap().digest, "sha256:a");
        let two = json!({"manifests": [
            entry("sha256:a", json!({"architecture": "amd64", "os": "linux"})),
            entry("sha256:b", json!({"architecture": "arm64", "os": "linux"})),
        ]});
        assert_eq!(pick_platform(&two), None);
    }
}
