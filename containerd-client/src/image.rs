//! From an image name to its manifest: image → (index → platform manifest) → manifest, and
//! the blobs it names, read from containerd's content store.

use protocol::{grpc, images};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::Client;

/// Media types of image indexes (OCI, and Docker's manifest list).
pub const INDEXES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
/// Media types of image manifests.
pub const MANIFESTS: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
/// Media types of image configs (as opposed to an artifact's own config type).
pub const IMAGE_CONFIGS: &[&str] = &[
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// Manifests, indexes and configs are small; a larger one is not something to buffer.
pub const MAX_JSON: i64 = 4 << 20;
/// Index → index → manifest is the deepest nesting seen in practice.
const MAX_DEPTH: usize = 3;

/// An OCI descriptor: what a manifest or index says of a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: i64,
}

/// An image's manifest, for the platform the caller picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The image's name in containerd (`docker.io/library/x:tag`).
    pub name: String,
    pub config: Descriptor,
    /// In manifest order.
    pub layers: Vec<Descriptor>,
}

impl Client {
    /// The name of the image container `id` was created from; `None` when it has none.
    pub fn container_image(&self, id: &str) -> Result<Option<String>> {
        let req = protocol::containers::GetContainerRequest {
            id: id.to_string(),
            ..Default::default()
        };
        let resp: protocol::containers::GetContainerResponse = self
            .unary(grpc::CONTAINERS_GET, req, None)
            .map_err(|s| Error::status(format!("container {id}"), s))?;
        Ok(resp
            .container
            .into_option()
            .map(|c| c.image)
            .filter(|i| !i.is_empty()))
    }

    /// The manifest of image `name`: its target itself, or through indexes the entry whose
    /// `platform` object `wanted` accepts (or the only entry). `None` when the target is
    /// neither a manifest nor an index, or no entry fits. An image containerd does not have
    /// is an [`Error::Status`] with code `NotFound`.
    pub fn manifest(
        &self,
        name: &str,
        wanted: impl Fn(&Value) -> bool,
    ) -> Result<Option<Manifest>> {
        let req = images::GetImageRequest {
            name: name.to_string(),
            ..Default::default()
        };
        let resp: images::GetImageResponse = self
            .unary(grpc::IMAGES_GET, req, None)
            .map_err(|s| Error::status(format!("image {name}"), s))?;
        let target = resp
            .image
            .into_option()
            .and_then(|i| i.target.into_option())
            .map(|t| Descriptor {
                media_type: t.media_type,
                digest: t.digest,
                size: t.size,
            })
            .ok_or_else(|| Error::Content(format!("image {name} has no target")))?;
        let Some(desc) = self.find_manifest(name, target, &wanted, 0)? else {
            return Ok(None);
        };
        let manifest = self.read_json(name, &desc)?;
        let config = descriptor(&manifest["config"])
            .ok_or_else(|| Error::Content(format!("image {name}: manifest has no config")))?;
        let layers = manifest["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(descriptor)
            .collect();
        Ok(Some(Manifest {
            name: name.to_string(),
            config,
            layers,
        }))
    }

    fn find_manifest(
        &self,
        name: &str,
        desc: Descriptor,
        wanted: &dyn Fn(&Value) -> bool,
        depth: usize,
    ) -> Result<Option<Descriptor>> {
        if MANIFESTS.contains(&desc.media_type.as_str()) {
            return Ok(Some(desc));
        }
        if !INDEXES.contains(&desc.media_type.as_str()) || depth >= MAX_DEPTH {
            return Ok(None);
        }
        let index = self.read_json(name, &desc)?;
        match pick_platform(&index, wanted) {
            Some(next) => self.find_manifest(name, next, wanted, depth + 1),
            None => Ok(None),
        }
    }

    /// A JSON blob of image `name` (a manifest, an index, a config), at most [`MAX_JSON`].
    pub fn read_json(&self, name: &str, desc: &Descriptor) -> Result<Value> {
        let bytes = self.read_blob(name, desc, MAX_JSON)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::Content(format!(
                "image {name}: {} {} is not JSON: {e}",
                desc.media_type, desc.digest
            ))
        })
    }

    /// Reads a blob of image `name`, refusing sizes above `max` and answers that disagree
    /// with the descriptor.
    pub fn read_blob(&self, name: &str, desc: &Descriptor, max: i64) -> Result<Vec<u8>> {
        if !(0..=max).contains(&desc.size) {
            return Err(Error::Content(format!(
                "image {name}: {} {} has size {} (limit {max})",
                desc.media_type, desc.digest, desc.size
            )));
        }
        let what = || format!("image {name}: blob {} ({})", desc.digest, desc.media_type);
        let bytes = self
            .read(&desc.digest, desc.size as usize)
            .map_err(|s| Error::status(what(), s))?;
        if bytes.len() as i64 != desc.size {
            return Err(Error::Content(format!(
                "{}: read {} bytes, descriptor says {}",
                what(),
                bytes.len(),
                desc.size
            )));
        }
        Ok(bytes)
    }
}

/// The index entry whose platform `wanted` accepts, or the only entry when there is one.
fn pick_platform(index: &Value, wanted: &dyn Fn(&Value) -> bool) -> Option<Descriptor> {
    let entries = index["manifests"].as_array()?;
    entries
        .iter()
        .find(|e| wanted(&e["platform"]))
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(digest: &str, platform: Value) -> Value {
        json!({"mediaType": MANIFESTS[0], "digest": digest, "size": 1, "platform": platform})
    }

    fn arm64(p: &Value) -> bool {
        p["architecture"] == "arm64"
    }

    #[test]
    fn index_picks_the_wanted_platform() {
        let index = json!({"manifests": [
            entry("sha256:a", json!({"architecture": "amd64", "os": "linux"})),
            entry("sha256:b", json!({"architecture": "arm64", "os": "linux"})),
        ]});
        let picked = pick_platform(&index, &arm64).expect("arm64 is there");
        assert_eq!(picked.digest, "sha256:b");
    }

    #[test]
    fn index_of_one_takes_it_and_of_others_takes_none() {
        let one = json!({"manifests": [entry("sha256:a", json!({"architecture": "amd64"}))]});
        assert_eq!(
            pick_platform(&one, &arm64).expect("the only one").digest,
            "sha256:a"
        );
        let two = json!({"manifests": [
            entry("sha256:a", json!({"architecture": "amd64", "os": "linux"})),
            entry("sha256:c", json!({"architecture": "s390x", "os": "linux"})),
        ]});
        assert_eq!(pick_platform(&two, &arm64), None);
    }
}
