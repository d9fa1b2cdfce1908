//! Where a module comes from when it is not in the rootfs: the Wasm layers of the
//! container's image in containerd's content store, and the precompiled artifacts the shim
//! stores beside them.
//!
//! Everything goes through containerd's gRPC API on its main socket (the shim's `-address`),
//! in the container's namespace: Containers/Get → Images/Get → manifest → layers. A
//! [`Store`] holds one connection; drop it when done, it owns no thread.
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

mod cache;
mod grpc;
mod image;

use shim_common::protocol::{containers, grpc as paths};
use shim_common::Result;

/// A client of containerd's gRPC services (containers, images, content, leases) in one
/// namespace. Shareable across the shim's request threads: concurrent calls take turns on
/// its runtime.
pub struct Store {
    client: grpc::Client,
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
    /// One of [`image::WASM_LAYERS`].
    pub media_type: String,
    pub bytes: Vec<u8>,
}

impl Store {
    /// Connects to containerd's gRPC socket `address`, for calls in `namespace`.
    pub fn connect(address: &str, namespace: &str) -> Result<Store> {
        Ok(Store {
            client: grpc::Client::connect(address, namespace)?,
        })
    }

    /// The Wasm layers of container `id`'s image; `Ok(None)` when the image is not a Wasm
    /// image (or the container has no image, or its image has since been removed: the
    /// module then comes from the rootfs). An image with the Wasm config media type but no
    /// Wasm layer is `InvalidArgument`.
    pub fn wasm_layers(&self, id: &str) -> Result<Option<WasmImage>> {
        let req = containers::GetContainerRequest {
            id: id.to_string(),
            ..Default::default()
        };
        let resp: containers::GetContainerResponse = self
            .client
            .unary(paths::CONTAINERS_GET, req, None)
            .map_err(|s| grpc::status_error(format!("container {id}"), s))?;
        let name = resp.container.into_option().map(|c| c.image);
        match name.as_deref() {
            None | Some("") => Ok(None),
            Some(name) => image::resolve(&self.client, name),
        }
    }

    /// The artifact stored for `layer` under `key`; `Ok(None)` when there is none, it has
    /// been deleted, or its bytes no longer match its digest.
    pub fn precompiled(
        &self,
        image: &WasmImage,
        layer: &Layer,
        key: &str,
    ) -> Result<Option<Vec<u8>>> {
        cache::load(&self.client, image, layer, key)
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
        cache::store(&self.client, image, layer, key, artifact)
    }

    /// The underlying gRPC client, for tests that set up containerd state (used by
    /// `tests/oci_store.rs`, which includes this module; unused by the unit tests).
    #[cfg(test)]
    #[allow(dead_code)]
    pub(crate) fn client(&self) -> &grpc::Client {
        &self.client
    }
}
