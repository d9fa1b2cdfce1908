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
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    store: Option<std::sync::Arc<Store>>,
    /// The peer has answered a call: it is containerd's gRPC API, whatever fails later (a
    /// restart) is worth asking again.
    answered: bool,
    /// Why the peer is not asked any more: its first call got no answer (it is not
    /// containerd's gRPC API: a daemon that serves only ttrpc on the socket it passed), so
    /// each later create would wait for it in vain.
    given_up: Option<String>,
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
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn store(&self) -> Result<std::sync::Arc<Store>> {
        let mut state = self.state();
        if let Some(why) = &state.given_up {
            return Err(Error::Unavailable(format!(
                "containerd's gRPC API at {}: {why}; not asked again",
                self.address
            )));
        }
        if let Some(s) = state.store.as_ref() {
            return Ok(s.clone());
        }
        let s = std::sync::Arc::new(Store::connect(&self.address, &self.namespace)?);
        state.store = Some(s.clone());
        Ok(s)
    }

    /// The Wasm layer of container `id`'s image, or `None` for a plain (native) image.
    pub fn wasm_layer(&self, id: &str) -> Result<Option<ImageLayer>> {
        if self.address.is_empty() {
            return Ok(None);
        }
        let store = self.store()?;
        let image = match store.wasm_layers(id) {
            Ok(image) => {
                self.state().answered = true;
                image
            }
            // An answer, if not the one hoped for.
            Err(
                e @ (Error::NotFound(_) | Error::InvalidArgument(_) | Error::FailedPrecondition(_)),
            ) => {
                self.state().answered = true;
                return Err(e);
            }
            Err(e) => {
                let mut state = self.state();
                if !state.answered {
                    state.given_up = Some(format!("no answer to the first call ({e})"));
                    state.store = None;
                }
                return Err(e);
            }
        };
        let Some(image) = image else {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that accepts and never answers (a ttrpc server reading HTTP/2's preface as a
    /// huge message header): the first create gets an error after one unary bound, later
    /// ones an error at once that says why (each create then runs from the rootfs).
    #[test]
    fn a_peer_that_never_answers_is_asked_once() {
        let dir = std::env::temp_dir().join(format!("wasm-silent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("silent.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        // Holds every connection open, unanswered, for the rest of the test process.
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                held.push(conn);
            }
        });
        let images = Images::new(&sock.to_string_lossy(), "ns");
        let first = images
            .wasm_layer("c1")
            .err()
            .expect("no answer is an error");
        assert!(first.to_string().contains("DeadlineExceeded"), "{first}");
        let second = images.wasm_layer("c2").err().expect("still an error");
        assert!(second.to_string().contains("not asked again"), "{second}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
