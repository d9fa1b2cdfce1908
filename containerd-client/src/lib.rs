//! A small synchronous client of containerd's gRPC API on its main socket: containers,
//! images (index → manifest → blobs), content and leases, and artifacts kept beside a blob.
//!
//! Shims need this where containerd hands them a name rather than bytes: the Wasm shim reads
//! a module from the image's layer and caches its compiled form beside it. The calls are
//! blocking; each [`Client`] owns a current-thread runtime that only runs inside a call, so
//! the caller gains no thread, and dropping it closes the connection.
//!
//! ```no_run
//! # fn f() -> containerd_client::Result<()> {
//! use containerd_client::Client;
//!
//! let client = Client::connect("/run/containerd/containerd.sock", "default")?;
//! if let Some(image) = client.container_image("c1")? {
//!     let manifest = client.manifest(&image, |platform| platform["architecture"] == "amd64")?;
//!     println!("{image}: {:?}", manifest.map(|m| m.layers.len()));
//! }
//! # Ok(()) }
//! ```

mod artifact;
mod client;
mod codec;
mod error;
mod image;

pub use artifact::{sha256_digest, Labels};
pub use client::Client;
pub use error::{Error, Result};
pub use image::{Descriptor, Manifest, IMAGE_CONFIGS, INDEXES, MANIFESTS, MAX_JSON};
pub use tonic::{Code, Status};
