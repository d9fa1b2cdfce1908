//! Artifacts derived from a blob (a module compiled to native code, an image converted to
//! another format), kept in containerd's content store and found through labels on the blob
//! they were made from.
//!
//! The source blob carries two labels per key: the finder's (`Labels::find` and the key →
//! the artifact's digest), which is how a later run finds the artifact, and a GC reference
//! (`Labels::gc_ref` and the key → the same digest). A blob referenced from an image's
//! manifest (a layer) thus keeps its artifacts exactly as long as some image holds it, and
//! they are collected with it.
//! Writing happens under a lease (with an expiry, in case the writer dies halfway) so the
//! artifact cannot be collected between its commit and the labelling.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use protocol::{content, grpc, leases};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::Client;

/// The labels one kind of artifact is kept under.
#[derive(Debug, Clone, Copy)]
pub struct Labels {
    /// On the source blob: `<find><key>` → the artifact's digest.
    pub find: &'static str,
    /// On the source blob: `<gc_ref><key>` → the artifact's digest. Must start with
    /// `containerd.io/gc.ref.content.`, which containerd's GC follows to the digest.
    pub gc_ref: &'static str,
    /// On the artifact: → the source blob's digest (for whoever inspects the store).
    pub from: &'static str,
    /// Prefix of the ingest reference an artifact is written under.
    pub ingest: &'static str,
}

/// The lease label after which containerd's GC ignores a lease left behind by a dead writer.
const LEASE_EXPIRE_LABEL: &str = "containerd.io/gc.expire";
const LEASE_TTL: Duration = Duration::from_secs(3600);
/// Keys are hashes; the bound keeps label keys far below containerd's 4 KiB label limit.
const MAX_KEY: usize = 128;

impl Client {
    /// The artifact stored for blob `source` under `key`, if it is still there and intact
    /// (its bytes match its digest: a blob damaged on disk is a miss, never returned).
    pub fn load_artifact(
        &self,
        labels: &Labels,
        source: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>> {
        check_key(key)?;
        let req = content::InfoRequest {
            digest: source.to_string(),
            ..Default::default()
        };
        let info: content::InfoResponse = self
            .unary(grpc::CONTENT_INFO, req, None)
            .map_err(|s| Error::status(format!("blob {source}"), s))?;
        let label = format!("{}{key}", labels.find);
        let Some(digest) = info
            .info
            .into_option()
            .and_then(|mut i| i.labels.remove(&label))
        else {
            return Ok(None);
        };
        let bytes = match self.read(&digest, 0) {
            Ok(bytes) => bytes,
            // Deleted by hand or collected: the caller makes it and stores it again.
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(Error::status(format!("artifact {digest}"), s)),
        };
        if sha256_digest(&bytes) != digest {
            log::warn!("artifact {digest} of blob {source} does not match its digest: ignored");
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// Stores `artifact` for blob `source` under `key` (an opaque `[A-Za-z0-9._-]{1,128}`):
    /// write under a lease, label the source, drop the lease (the labels now keep the
    /// artifact alive).
    pub fn store_artifact(
        &self,
        labels: &Labels,
        source: &str,
        key: &str,
        artifact: &[u8],
    ) -> Result<()> {
        check_key(key)?;
        let digest = sha256_digest(artifact);
        let expire = rfc3339(SystemTime::now() + LEASE_TTL);
        let lease = self
            .create_lease(HashMap::from([(LEASE_EXPIRE_LABEL.to_string(), expire)]))
            .map_err(|s| Error::status("create a lease for an artifact", s))?;
        let stored = self.write_and_label(labels, source, key, artifact, &digest, &lease);
        if let Err(s) = self.delete_lease(&lease) {
            // It expires by itself; the artifact is labelled or will be collected then.
            log::warn!("delete lease {lease}: {}", Error::status("lease", s));
        }
        stored
    }

    fn write_and_label(
        &self,
        labels: &Labels,
        source: &str,
        key: &str,
        artifact: &[u8],
        digest: &str,
        lease: &str,
    ) -> Result<()> {
        // One ingest per process: two writers making the same artifact at once must not
        // fight over an ingest lock; the second commit simply finds the blob there.
        let reference = format!("{}-{key}-{}", labels.ingest, std::process::id());
        let from = HashMap::from([(labels.from.to_string(), source.to_string())]);
        match self.write(&reference, artifact, digest, from, lease) {
            Ok(()) => {}
            // Already in the store: put it under our lease too, so it survives until labelled.
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                let req = leases::AddResourceRequest {
                    id: lease.to_string(),
                    resource: protobuf::MessageField::some(leases::Resource {
                        id: digest.to_string(),
                        type_: "content".to_string(),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                self.unary::<_, protobuf::well_known_types::empty::Empty>(
                    grpc::LEASES_ADD_RESOURCE,
                    req,
                    None,
                )
                .map_err(|s| Error::status(format!("lease existing artifact {digest}"), s))?;
            }
            Err(s) => return Err(Error::status(format!("write artifact {digest}"), s)),
        }
        let source_labels = HashMap::from([
            (format!("{}{key}", labels.find), digest.to_string()),
            (format!("{}{key}", labels.gc_ref), digest.to_string()),
        ]);
        let paths = source_labels
            .keys()
            .map(|k| format!("labels.{k}"))
            .collect();
        let req = content::UpdateRequest {
            info: protobuf::MessageField::some(content::Info {
                digest: source.to_string(),
                labels: source_labels,
                ..Default::default()
            }),
            update_mask: protobuf::MessageField::some(
                protobuf::well_known_types::field_mask::FieldMask {
                    paths,
                    ..Default::default()
                },
            ),
            ..Default::default()
        };
        self.unary::<_, content::UpdateResponse>(grpc::CONTENT_UPDATE, req, None)
            .map_err(|s| Error::status(format!("label blob {source}"), s))?;
        Ok(())
    }
}

/// Keys become label keys and ingest refs: hex or similar, bounded.
fn check_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.len() <= MAX_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "artifact key {key:?}: expected up to {MAX_KEY} characters of [A-Za-z0-9._-]"
        )))
    }
}

/// The OCI digest (`sha256:<hex>`) of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in hash {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// UTC RFC 3339 (what containerd's `gc.expire` label is parsed as), to the second.
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_251_199); // leap year, Feb 29
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn keys_are_checked() {
        assert!(check_key("0123abcdef").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key("a/b").is_err());
        assert!(check_key(&"a".repeat(MAX_KEY + 1)).is_err());
    }

    #[test]
    fn digest_is_oci_sha256() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
