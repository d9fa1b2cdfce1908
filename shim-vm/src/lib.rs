//! The micro-VM shim's parts: the guest image, the VMM that boots it, the guest's PID 1
//! set-up, the agent that serves the SDK's task service inside it, and the host backend
//! that forwards containerd's calls to that agent.
//!
//! | where | what | module |
//! |---|---|---|
//! | host, shim | the SDK's task and sandbox services with [`backend::VmBackend`] | `backend`, `sandbox`, `pod`, `share`, `spec_version`, `relay`, `guest` |
//! | host, beside | QEMU `microvm`, `virtiofsd` for the shared directory, `vhost-device-vsock` for a vsock channel | `vmm`, `virtiofsd`, `vsock` |
//! | both | the channel between them: virtio-serial or vsock; stdio readers that can be stopped | `channel`, `vsock`, `stoppable` |
//! | guest, PID 1 | the SDK's task service with the runc backend, stdio fifos | `agent`, `boot` |

pub mod agent;
pub mod backend;
pub mod boot;
pub mod channel;
pub mod guest;
pub mod holder;
pub mod image;
pub mod network;
pub mod options;
pub mod pod;
pub mod process;
pub mod relay;
pub mod sandbox;
pub mod share;
pub mod spec_version;
pub mod stoppable;
pub mod virtiofsd;
pub mod vmm;
pub mod vsock;
