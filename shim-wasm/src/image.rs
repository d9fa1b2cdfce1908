//! OCI Wasm images: the module comes from the image's Wasm layer in containerd's content
//! store instead of the rootfs, and its precompiled artifact is kept there too.

use std::sync::{Mutex, PoisonError};

use shim_common::{Error, Result};

use crate::engine::Kind;
use crate::oci::{Layer, Store, WasmImage};
use crate::precompiled::ArtifactStore;

const COMPONENT_LAYER: &str = "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm";
const MODULE_LAYER: &str = "application/wasm";

/// containerd's content store, connected on first use (a shim serving only native
/// containers, or run without containerd, never connects).
pub struct Images {
    address: String,
    namespace: String,
    store: Mutex<Option<std::sync::Arc<Store>>>,
}

/// The layer a container runs, with the store its artifact is cached in.
pub struct ImageLayer {
    pub kind: Kind,
    store: std::sync::Arc<Store>,
    image: WasmImage,
    index: usize,
}

impl Images {
    pub fn new(address: &str, namespace: &str) -> Images {
        Images {
            address: address.to_string(),
            namespace: namespace.to_string(),
            store: Mutex::new(None),
        }
    }

    fn store(&self) -> Result<std::sync::Arc<Store>> {
        let mut slot = self.store.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let s = std::sync::Arc::new(Store::connect(&self.address, &self.namespace)?);
        *slot = Some(s.clone());
        Ok(s)
    }

    /// The Wasm layer of container `id`'s image, or `None` for a plain (native) image.
    pub fn wasm_layer(&self, id: &str) -> Result<Option<ImageLayer>> {
        if self.address.is_empty() {
            return Ok(None);
        }
        let store = self.store()?;
        let Some(image) = store.wasm_layers(id)? else {
            return Ok(None);
        };
        let index = image
            .layers
            .iter()
            .position(|l| l.media_type == COMPONENT_LAYER || l.media_type == MODULE_LAYER)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "image {} has a Wasm config but no Wasm layer ({COMPONENT_LAYER} or {MODULE_LAYER})",
                    image.name
                ))
            })?;
        let layer = &image.layers[index];
        let kind = if layer.media_type == COMPONENT_LAYER {
            Kind::Component
        } else {
            Kind::of(&layer.bytes)
        };
        Ok(Some(ImageLayer {
            kind,
            store,
            image,
            index,
        }))
    }
}

impl ImageLayer {
    pub fn layer(&self) -> &Layer {
        &self.image.layers[self.index]
    }

    pub fn image_name(&self) -> &str {
        &self.image.name
    }
}

impl ArtifactStore for ImageLayer {
    fn load(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.store.precompiled(&self.image, self.layer(), key)
    }

    fn save(&self, key: &str, artifact: &[u8]) -> Result<()> {
        self.store
            .store_precompiled(&self.image, self.layer(), key, artifact)
    }
}
