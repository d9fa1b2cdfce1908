//! The command line containerd uses to run a shim binary.
//!
//! containerd passes Go-style single-dash flags (`-namespace k8s.io -id c1 start`), so the
//! parser accepts long options with one dash as well as two.

use std::ffi::OsString;

use crate::error::{Error, Result};

/// What the shim binary was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `start`: find or spawn the daemon for this container's group, print its address.
    Start,
    /// `delete`: clean up after a dead shim, print a `DeleteResponse`.
    Delete,
    /// No action: be the long-running ttrpc daemon.
    Serve,
    /// `-v`: print the version.
    Version,
    /// `-info` (containerd 2.x introspection): read runtime options on stdin, print a
    /// `containerd.types.RuntimeInfo`. A flag, not an action, because older shims answer an
    /// unknown action with confusing errors.
    Info,
}

/// Flags and environment containerd hands to every invocation.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub namespace: String,
    pub id: String,
    /// containerd's gRPC address (`-address`); part of the socket name.
    pub address: String,
    pub publish_binary: String,
    pub bundle: String,
    pub debug: bool,
    /// `TTRPC_ADDRESS`: where containerd serves the events service for shims.
    pub ttrpc_address: String,
    /// `GRPC_ADDRESS`, informational.
    pub grpc_address: String,
    pub socket: String,
}

impl Flags {
    /// Parses `args` (without the program name) and the environment.
    pub fn parse<I, S>(args: I) -> Result<(Flags, Action)>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut opts = getopts::Options::new();
        opts.long_only(true)
            .optopt("", "namespace", "namespace that owns the shim", "NS")
            .optopt("", "id", "id of the task", "ID")
            .optopt(
                "",
                "address",
                "grpc address back to main containerd",
                "ADDR",
            )
            .optopt(
                "",
                "publish-binary",
                "path to publish binary (unused: events go over ttrpc)",
                "PATH",
            )
            .optopt("", "bundle", "path to the bundle if not workdir", "PATH")
            .optopt(
                "",
                "socket",
                "socket path to serve (set by start for the daemon)",
                "PATH",
            )
            .optflag("", "debug", "enable debug output in logs")
            .optflag("v", "", "show the shim version and exit")
            .optflag(
                "",
                "info",
                "read the runtime options on stdin, print the shim's RuntimeInfo protobuf and exit",
            );
        let m = opts
            .parse(args.into_iter().map(Into::into))
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let env = |k: &str| std::env::var(k).unwrap_or_default();
        let mut flags = Flags {
            namespace: m.opt_str("namespace").unwrap_or_else(|| env("NAMESPACE")),
            id: m.opt_str("id").unwrap_or_default(),
            address: m.opt_str("address").unwrap_or_default(),
            publish_binary: m.opt_str("publish-binary").unwrap_or_default(),
            bundle: m.opt_str("bundle").unwrap_or_default(),
            socket: m.opt_str("socket").unwrap_or_default(),
            debug: m.opt_present("debug"),
            ttrpc_address: env("TTRPC_ADDRESS"),
            grpc_address: env("GRPC_ADDRESS"),
        };
        if flags.bundle.is_empty() {
            // containerd runs every action with the bundle as working directory.
            if let Ok(cwd) = std::env::current_dir() {
                flags.bundle = cwd.to_string_lossy().into_owned();
            }
        }
        let action = if m.opt_present("v") {
            Action::Version
        } else if m.opt_present("info") {
            Action::Info
        } else {
            match m.free.first().map(String::as_str) {
                None => Action::Serve,
                Some("start") => Action::Start,
                Some("delete") => Action::Delete,
                Some(other) => {
                    return Err(Error::InvalidArgument(format!("unknown action {other:?}")))
                }
            }
        };
        if !matches!(action, Action::Version | Action::Info) && flags.namespace.is_empty() {
            return Err(Error::InvalidArgument(
                "shim namespace cannot be empty".into(),
            ));
        }
        Ok((flags, action))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_with_namespace_and_id() {
        let (flags, action) =
            Flags::parse(["-namespace", "default", "-id", "c1", "start"]).unwrap();
        let got = (flags.namespace.as_str(), flags.id.as_str(), action);
        assert_eq!(got, ("default", "c1", Action::Start));
    }

    #[test]
    fn containerd_16_start_line() {
        let (f, a) = Flags::parse([
            "-namespace",
            "k8s.io",
            "-address",
            "/run/containerd/containerd.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            "abc",
            "-debug",
            "start",
        ])
        .unwrap();
        assert_eq!(a, Action::Start);
        assert_eq!(f.namespace, "k8s.io");
        assert_eq!(f.address, "/run/containerd/containerd.sock");
        assert_eq!(f.id, "abc");
        assert!(f.debug);
    }

    #[test]
    fn delete_with_bundle_and_double_dash() {
        let (f, a) =
            Flags::parse(["--namespace", "n", "-id", "x", "-bundle", "/b", "delete"]).unwrap();
        assert_eq!((a, f.bundle.as_str()), (Action::Delete, "/b"));
    }

    #[test]
    fn unknown_flag_and_action_are_errors() {
        assert!(Flags::parse(["-namespace", "n", "-bogus", "start"]).is_err());
        assert!(Flags::parse(["-namespace", "n", "frobnicate"]).is_err());
        assert!(Flags::parse(["start"]).is_err() || std::env::var("NAMESPACE").is_ok());
    }

    #[test]
    fn version_needs_nothing_else() {
        assert_eq!(Flags::parse(["-v"]).unwrap().1, Action::Version);
    }

    #[test]
    fn info_needs_nothing_else() {
        assert_eq!(Flags::parse(["-info"]).unwrap().1, Action::Info);
        assert_eq!(Flags::parse(["--info"]).unwrap().1, Action::Info);
    }
}
