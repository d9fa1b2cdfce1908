//! The initramfs format the kernel unpacks: uncompressed cpio "newc" (`070701`), written
//! by hand because it is a header of thirteen hex fields per entry and nothing more.

use std::collections::BTreeSet;
use std::io::{self, Write};

/// Writes a newc archive; parents of every entry are created first, once.
pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    dirs: BTreeSet<String>,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    /// An empty archive writing to `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            ino: 0,
            dirs: BTreeSet::new(),
            written: 0,
        }
    }

    /// A directory (and its parents), mode `0o755` unless given otherwise by a second call.
    pub fn dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        self.parents(path)?;
        self.dirs.insert(path.to_string());
        self.entry(path, libc::S_IFDIR | mode, &[])
    }

    /// A regular file with `data`.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let path = path.trim_matches('/');
        self.parents(path)?;
        self.entry(path, libc::S_IFREG | mode, data)
    }

    /// A symbolic link at `path` pointing at `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = path.trim_matches('/');
        self.parents(path)?;
        self.entry(path, libc::S_IFLNK | 0o777, target.as_bytes())
    }

    /// Writes the trailer and returns the sink and the archive's size.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.entry("TRAILER!!!", 0, &[])?;
        self.out.flush()?;
        Ok((self.out, self.written))
    }

    fn parents(&mut self, path: &str) -> io::Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            if !self.dirs.contains(parent) {
                self.dir(parent, 0o755)?;
            }
        }
        Ok(())
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.ino += 1;
        let nlink = if mode & libc::S_IFMT == libc::S_IFDIR {
            2
        } else {
            1
        };
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check;
        // mtime 0 so that equal inputs give an equal archive.
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_parents_come_first() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/a/b/c", 0o644, b"hello").unwrap();
        w.symlink("/a/l", "b/c").unwrap();
        let (buf, n) = w.finish().unwrap();
        assert_eq!(buf.len() as u64, n);
        assert_eq!(buf.len() % 4, 0);
        let text = String::from_utf8_lossy(&buf);
        let names: Vec<&str> = ["a\0", "a/b\0", "a/b/c\0", "a/l\0", "TRAILER!!!\0"]
            .into_iter()
            .collect();
        let mut at = 0;
        for name in names {
            let found = text[at..].find(name).expect(name);
            at += found + name.len();
        }
        assert_eq!(text.matches("070701").count(), 5);
    }
}
