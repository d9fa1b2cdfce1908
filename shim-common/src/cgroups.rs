//! Container metrics and OOM kills, read from the cgroup of a container's init process.

use protobuf::well_known_types::any::Any;

use crate::error::{Error, Result};

/// containerd's `io.containerd.cgroups.v1.Metrics` or `io.containerd.cgroups.v2.Metrics`
/// for the cgroup `pid` belongs to.
pub fn metrics(_pid: u32) -> Result<Any> {
    Err(Error::Unimplemented("Stats".into()))
}
