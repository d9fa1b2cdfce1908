//! Where a module comes from when it is not in the rootfs: the Wasm layers of the
//! container's image in containerd's content store, and the precompiled artifacts the shim
//! stores beside them.
//!
//! Everything goes through containerd's gRPC API on its main socket (the shim's `-address`),
//! in the container's namespace, with [`containerd_client`]: Containers/Get → Images/Get →
//! manifest → layers. A [`Store`] holds one connection; drop it when done, it owns no thread.
//!
//! ```no_run
//! # fn f() -> shim_common::Result<()> {
//! let store = Store::connect("/run/containerd/containerd.sock", "default")?;
//! if let Some(image) = store.wasm_layers("c1")? {
//!     for layer in &image.layers {
//!         let key = "…"; // engine compatibility hash + layer digest, computed by the caller
//!         if store.precompiled(&image, layer, key)?.is_none() {
//!             store.store_precompiled(&image, layer, key, b"compiled")?;
//!         }
//!     }
//! }
//! # Ok(()) }
//! ```

use containerd_client::{Client, Code, Labels, IMAGE_CONFIGS};
use serde_json::Value;
use shim_common::{Error, Result};

/// The config media type of Wasm OCI artifacts (CNCF TAG Runtime's Wasm OCI artifact layout).
pub const WASM_CONFIG: &str = "application/vnd.wasm.config.v0+json";
/// Layer media types that hold a module or component; other layers are not ours to read.
pub const WASM_LAYERS: &[&str] = &[
    "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
    "application/wasm",
];
/// A module or component larger than this is refused rather than read into memory.
const MAX_LAYER: i64 = 1 << 30;

/// Where precompiled artifacts are found: our label on the layer blob (`<find><key>` →
/// artifact digest) and the GC reference that makes the artifact live as long as the layer.
pub const PRECOMPILED: Labels = Labels {
    find: "io.containerd.shim.wasm/precompiled/",
    gc_ref: "containerd.io/gc.ref.content.wasm-precompiled/",
    from: "io.containerd.shim.wasm/precompiled-from",
    ingest: "wasm-precompiled",
};

/// A client of containerd's gRPC services in one namespace. Shareable across the shim's
/// request threads: concurrent calls take turns on its runtime.
pub struct Store {
    client: Client,
}

const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<Store>();
};

/// The Wasm layers of an image, in manifest order.
#[derive(Debug, Clone)]
pub struct WasmImage {
    /// The image's name in containerd (`docker.io/library/x:tag`).
    pub name: String,
    pub layers: Vec<Layer>,
}

/// One Wasm layer: a core module or a component.
#[derive(Debug, Clone)]
pub struct Layer {
    /// `sha256:<hex>`, the layer blob's digest in the content store.
    pub digest: String,
    /// One of [`WASM_LAYERS`].
    pub media_type: String,
    pub bytes: Vec<u8>,
}

impl Store {
    /// Connects to containerd's gRPC socket `address`, for calls in `namespace`.
    pub fn connect(address: &str, namespace: &str) -> Result<Store> {
        Ok(Store {
            client: Client::connect(address, namespace).map_err(shim_error)?,
        })
    }

    /// The Wasm layers of container `id`'s image; `Ok(None)` when the image is not a Wasm
    /// image (or the container has no image, or its image has since been removed: the
    /// module then comes from the rootfs). An image with the Wasm config media type but no
    /// Wasm layer is `InvalidArgument`.
    pub fn wasm_layers(&self, id: &str) -> Result<Option<WasmImage>> {
        match self.client.container_image(id).map_err(shim_error)? {
            None => Ok(None),
            Some(name) => self.resolve(&name),
        }
    }

    fn resolve(&self, name: &str) -> Result<Option<WasmImage>> {
        let manifest = match self.client.manifest(name, is_wasm_platform) {
            Ok(Some(manifest)) => manifest,
            Ok(None) => return Ok(None),
            // The image was removed after the container was created; its rootfs snapshot
            // remains, so the container can still run from it.
            Err(e) if e.code() == Code::NotFound => {
                log::warn!("image {name} not found: not reading wasm layers from it");
                return Ok(None);
            }
            Err(e) => return Err(shim_error(e)),
        };
        let wasm_layers: Vec<_> = manifest
            .layers
            .into_iter()
            .filter(|d| WASM_LAYERS.contains(&d.media_type.as_str()))
            .collect();
        let config = manifest.config;
        if config.media_type != WASM_CONFIG {
            // An `architecture: wasm` image with only filesystem layers carries its module in
            // the rootfs (`process.args[0]`), which is not ours to read either.
            if wasm_layers.is_empty() || !IMAGE_CONFIGS.contains(&config.media_type.as_str()) {
                return Ok(None);
            }
            let config = self.client.read_json(name, &config).map_err(shim_error)?;
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
                let bytes = self
                    .client
                    .read_blob(name, &d, MAX_LAYER)
                    .map_err(shim_error)?;
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

    /// The artifact stored for `layer` under `key`; `Ok(None)` when there is none, it has
    /// been deleted, or its bytes no longer match its digest.
    pub fn precompiled(
        &self,
        image: &WasmImage,
        layer: &Layer,
        key: &str,
    ) -> Result<Option<Vec<u8>>> {
        self.client
            .load_artifact(&PRECOMPILED, &layer.digest, key)
            .map_err(|e| in_image(image, e))
    }

    /// Stores `artifact` for `layer` under `key` (an opaque `[A-Za-z0-9._-]{1,128}`): written
    /// under a lease, then labelled on the layer blob with a GC reference, so it is
    /// collected together with the last image that holds the layer.
    pub fn store_precompiled(
        &self,
        image: &WasmImage,
        layer: &Layer,
        key: &str,
        artifact: &[u8],
    ) -> Result<()> {
        self.client
            .store_artifact(&PRECOMPILED, &layer.digest, key, artifact)
            .map_err(|e| in_image(image, e))
    }

    /// The underlying gRPC client, for tests that set up containerd state (used by
    /// `tests/oci_store.rs`, which includes this module; unused by the unit tests).
    #[cfg(test)]
    #[allow(dead_code)]
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }
}

/// An index entry for a Wasm platform: `architecture: wasm`, or an `os` of `wasi*`.
fn is_wasm_platform(platform: &Value) -> bool {
    platform["architecture"] == "wasm"
        || platform["os"]
            .as_str()
            .is_some_and(|os| os.starts_with("wasi"))
}

/// An artifact call's error, naming the image whose layer it was about.
fn in_image(image: &WasmImage, e: containerd_client::Error) -> Error {
    match e {
        containerd_client::Error::Status {
            what,
            code,
            message,
        } => shim_error(containerd_client::Error::Status {
            what: format!("image {}: {what}", image.name),
            code,
            message,
        }),
        other => shim_error(other),
    }
}

/// containerd's answer as the SDK's error kinds: what a task request answers with.
fn shim_error(e: containerd_client::Error) -> Error {
    use containerd_client::Error as E;
    match e {
        E::Status {
            what,
            code: Code::NotFound,
            ..
        } => Error::NotFound(what),
        E::Status {
            what,
            code: Code::AlreadyExists,
            ..
        } => Error::AlreadyExists(what),
        E::Status {
            what,
            code: Code::InvalidArgument,
            message,
        } => Error::InvalidArgument(format!("{what}: {message}")),
        E::Status {
            what,
            code: Code::FailedPrecondition,
            message,
        } => Error::FailedPrecondition(format!("{what}: {message}")),
        E::InvalidArgument(m) | E::Content(m) => Error::InvalidArgument(m),
        other => Error::Runtime(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wasm_platforms_are_told_apart() {
        assert!(is_wasm_platform(
            &json!({"architecture": "wasm", "os": "wasip1"})
        ));
        assert!(is_wasm_platform(
            &json!({"architecture": "wasm32", "os": "wasip2"})
        ));
        assert!(!is_wasm_platform(
            &json!({"architecture": "amd64", "os": "linux"})
        ));
    }

    #[test]
    fn containerd_answers_become_the_sdk_kinds() {
        let status = |code| containerd_client::Error::Status {
            what: "container c1".into(),
            code,
            message: "m".into(),
        };
        assert_eq!(
            shim_error(status(Code::NotFound)).to_string(),
            "container c1: not found"
        );
        assert!(matches!(
            shim_error(status(Code::DeadlineExceeded)),
            Error::Runtime(m) if m.contains("DeadlineExceeded")
        ));
    }
}
