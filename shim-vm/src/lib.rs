//! The micro-VM shim's parts: the guest image, the VMM that boots it, the guest's PID 1
//! set-up, the agent that serves the SDK's task service inside it, and the host backend that
//! forwards containerd's calls to that agent.

pub mod boot;
pub mod image;
pub mod process;
pub mod virtiofsd;
pub mod vmm;
