//! Precompiled artifacts: compiled once per source and engine, stored in containerd's content
//! store when the source is an image layer, and kept as files the containers map.
//!
//! Every container of the same source maps the same file (a hard link in its bundle to the
//! node-wide entry), so the compiled code sits once in the page cache however many containers
//! run it. An image layer's entry goes away with its last container (link count 1 at
//! delete): the content store keeps the artifact. A rootfs module has no other cache, so
//! its unused entries stay, least recently used first out beyond [`LOCAL_BUDGET`].

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use wasmtime::Engine;

use shim_common::{Context, Error, Result};

use crate::engine::{self, Checked, Kind};

/// Where artifacts are kept beyond the node: containerd's content store for image layers.
pub trait ArtifactStore {
    fn load(&self, key: &str) -> Result<Option<Vec<u8>>>;
    fn save(&self, key: &str, artifact: &[u8]) -> Result<()>;
}

/// A Wasm source to run: its bytes (binary or text) and where they came from.
pub struct Source<'a> {
    pub kind: Kind,
    pub bytes: &'a [u8],
    /// `sha256:...` of the layer or of the file's bytes.
    pub digest: String,
    pub func: Option<&'a str>,
    pub store: Option<&'a dyn ArtifactStore>,
}

/// The node-wide artifact directory of one namespace.
pub struct Cache {
    dir: PathBuf,
}

const LINK_SUFFIX: &str = ".cwasm";
/// Entries of rootfs modules, kept after their last container.
const LOCAL_SUFFIX: &str = ".local.cwasm";
/// Bytes of unused rootfs-module entries kept on the node (the directory is on tmpfs).
const LOCAL_BUDGET: u64 = 64 << 20;

impl Cache {
    pub fn new(dir: PathBuf) -> Cache {
        Cache { dir }
    }

    /// Finds or makes the artifact of `src`, checks it can run, and links it into `bundle`.
    /// Returns the bundle's path of the artifact.
    pub fn prepare(&self, engine: &Engine, src: &Source<'_>, bundle: &Path) -> Result<PathBuf> {
        let key = engine::cache_key(engine, &src.digest);
        let suffix = if src.store.is_some() {
            LINK_SUFFIX
        } else {
            LOCAL_SUFFIX
        };
        let entry = self.dir.join(format!("{key}{suffix}"));
        let artifact = self.artifact(engine, src, &key, &entry)?;
        let link = bundle.join(format!("{key}{suffix}"));
        let _ = fs::remove_file(&link);
        // A hard link shares the page cache with every container of this source; if the
        // entry vanished meanwhile (its last container was deleted), a private copy.
        if fs::hard_link(&entry, &link).is_err() {
            fs::write(&link, &artifact).with_context(|| format!("write {}", link.display()))?;
        }
        Ok(link)
    }

    fn artifact(
        &self,
        engine: &Engine,
        src: &Source<'_>,
        key: &str,
        entry: &Path,
    ) -> Result<Vec<u8>> {
        if let Ok(bytes) = fs::read(entry) {
            match engine::check(engine, src.kind, &bytes, src.func) {
                Ok(Checked::Usable) => {
                    log::info!("precompiled: cache hit {key} (node)");
                    // Recently used: the last to be pruned.
                    let _ = fs::File::options()
                        .append(true)
                        .open(entry)
                        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                    return Ok(bytes);
                }
                Ok(Checked::Corrupt(e)) => {
                    log::warn!("precompiled: {key} on this node is unusable ({e}); recompiling");
                    let _ = fs::remove_file(entry);
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(store) = src.store {
            match store.load(key) {
                Ok(Some(bytes)) => match engine::check(engine, src.kind, &bytes, src.func) {
                    Ok(Checked::Usable) => {
                        log::info!("precompiled: cache hit {key}");
                        self.install(entry, &bytes)?;
                        return Ok(bytes);
                    }
                    Ok(Checked::Corrupt(e)) => {
                        log::warn!(
                            "precompiled: stored artifact {key} is unusable ({e}); recompiling"
                        );
                    }
                    Err(e) => return Err(e),
                },
                Ok(None) => {}
                Err(e) => log::warn!("precompiled: cannot read the content store ({e}); compiling"),
            }
        }
        let started = Instant::now();
        let bytes = engine::precompile(engine, src.kind, src.bytes)?;
        log::info!(
            "compiled {} in {:.1} ms",
            src.digest,
            started.elapsed().as_secs_f64() * 1e3
        );
        if let Checked::Corrupt(e) = engine::check(engine, src.kind, &bytes, src.func)? {
            return Err(Error::Runtime(format!(
                "a fresh compilation does not load: {e}"
            )));
        }
        if let Some(store) = src.store {
            match store.save(key, &bytes) {
                Ok(()) => log::info!("precompiled: stored {key}"),
                Err(e) => log::warn!("precompiled: cannot store {key} ({e}); running anyway"),
            }
        }
        self.install(entry, &bytes)?;
        Ok(bytes)
    }

    /// Writes the node-wide entry atomically: a reader maps either nothing or all of it.
    fn install(&self, entry: &Path, bytes: &[u8]) -> Result<()> {
        fs::create_dir_all(&self.dir).with_context(|| format!("create {}", self.dir.display()))?;
        let tmp = entry.with_extension(format!("tmp{}", std::process::id()));
        fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
        fs::rename(&tmp, entry).with_context(|| format!("install {}", entry.display()))
    }

    /// Drops `bundle`'s artifact links, each image entry no other container uses, and the
    /// least recently used rootfs entries beyond the budget.
    pub fn release(&self, bundle: &Path) {
        let Ok(dir) = fs::read_dir(bundle) else {
            return;
        };
        for link in dir.flatten() {
            let name = link.file_name();
            let Some(name) = name.to_str().filter(|n| n.ends_with(LINK_SUFFIX)) else {
                continue;
            };
            let entry = self.dir.join(name);
            let _ = fs::remove_file(link.path());
            if !name.ends_with(LOCAL_SUFFIX) && fs::metadata(&entry).is_ok_and(|m| m.nlink() == 1) {
                let _ = fs::remove_file(&entry);
            }
        }
        self.prune(LOCAL_BUDGET);
    }

    fn prune(&self, budget: u64) {
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return;
        };
        let mut unused: Vec<(std::time::SystemTime, u64, PathBuf)> = dir
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.ends_with(LOCAL_SUFFIX))
            })
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                let modified = m.modified().ok()?;
                (m.nlink() == 1).then(|| (modified, m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = unused.iter().map(|u| u.1).sum();
        unused.sort();
        for (_, len, path) in unused {
            if total <= budget {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct Mem(RefCell<Option<Vec<u8>>>, RefCell<u32>);
    impl ArtifactStore for Mem {
        fn load(&self, _: &str) -> Result<Option<Vec<u8>>> {
            Ok(self.0.borrow().clone())
        }
        fn save(&self, _: &str, a: &[u8]) -> Result<()> {
            *self.1.borrow_mut() += 1;
            *self.0.borrow_mut() = Some(a.to_vec());
            Ok(())
        }
    }

    #[test]
    fn compile_once_share_and_survive_corruption() {
        let tmp = std::env::temp_dir().join(format!("wasm-cache-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let (b1, b2) = (tmp.join("b1"), tmp.join("b2"));
        fs::create_dir_all(&b1).unwrap();
        fs::create_dir_all(&b2).unwrap();
        let cache = Cache::new(tmp.join("cache"));
        let engine = engine::engine().unwrap();
        let wat = br#"(module (func (export "_start")))"#;
        let store = Mem(RefCell::new(Some(b"garbage".to_vec())), RefCell::new(0));
        let src = Source {
            kind: Kind::Module,
            bytes: wat,
            digest: engine::digest(wat),
            func: None,
            store: Some(&store),
        };
        // A corrupt stored artifact: recompiled and stored again.
        let l1 = cache.prepare(&engine, &src, &b1).unwrap();
        assert_eq!(*store.1.borrow(), 1);
        let l2 = cache.prepare(&engine, &src, &b2).unwrap();
        assert_eq!(*store.1.borrow(), 1, "second prepare compiled again");
        assert_eq!(
            fs::metadata(&l1).unwrap().ino(),
            fs::metadata(&l2).unwrap().ino()
        );
        let entry = tmp.join("cache").join(l1.file_name().unwrap());
        cache.release(&b1);
        assert!(entry.exists() && !l1.exists());
        cache.release(&b2);
        assert!(!entry.exists());
        // A rootfs module's entry outlives its container, until over budget.
        let local = Source { store: None, ..src };
        let l3 = cache.prepare(&engine, &local, &b1).unwrap();
        let entry = tmp.join("cache").join(l3.file_name().unwrap());
        cache.release(&b1);
        assert!(entry.exists());
        cache.prune(0);
        assert!(!entry.exists());
        fs::remove_dir_all(&tmp).unwrap();
    }
}
