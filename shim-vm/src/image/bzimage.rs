//! An uncompressed ELF `vmlinux` out of a bzImage `vmlinuz`: QEMU boots an ELF kernel
//! through its PVH note directly, skipping the real-mode setup and the in-guest
//! decompression (most of a second under TCG).

use shim_common::{Error, Result};

/// The x86 boot protocol's offsets (Documentation/arch/x86/boot.rst).
const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC: usize = 0x202;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;

/// LZ4's legacy frame, which the kernel's `lz4 -l` build step writes: 8 MiB blocks, each
/// preceded by its compressed size.
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

const FORMATS: &[(&[u8], &str)] = &[
    (&[0x1f, 0x8b], "gzip"),
    (&[0xfd, b'7', b'z', b'X', b'Z', 0], "xz"),
    (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
    (&[0x5d, 0x00, 0x00], "lzma"),
    (b"BZh", "bzip2"),
    (&[0x89, b'L', b'Z', b'O'], "lzo"),
];

/// Decompresses the kernel inside `bzimage`. Debian's kernels are LZ4 (`CONFIG_KERNEL_LZ4`);
/// another compression is an error that names it.
pub fn vmlinux(bzimage: &[u8]) -> Result<Vec<u8>> {
    let payload = payload(bzimage)?;
    if !payload.starts_with(&LZ4_LEGACY_MAGIC) {
        let what = FORMATS
            .iter()
            .find(|(m, _)| payload.starts_with(m))
            .map_or("an unknown format", |(_, n)| *n);
        return Err(Error::InvalidArgument(format!(
            "the bzImage's kernel is compressed with {what}; only LZ4 (Debian's) is supported"
        )));
    }
    let elf = lz4_legacy(payload)?;
    if !elf.starts_with(b"\x7fELF") {
        return Err(Error::InvalidArgument(
            "the bzImage's payload did not decompress to an ELF vmlinux".into(),
        ));
    }
    Ok(elf)
}

fn le32(b: &[u8], at: usize) -> Option<usize> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
}

/// The compressed kernel: located by the setup header's `payload_offset`/`payload_length`
/// (boot protocol 2.08+) when they point at a known magic, else by searching for LZ4's.
fn payload(bz: &[u8]) -> Result<&[u8]> {
    if bz.get(HEADER_MAGIC..HEADER_MAGIC + 4) != Some(b"HdrS") {
        return Err(Error::InvalidArgument(
            "not a bzImage (no HdrS setup header)".into(),
        ));
    }
    let setup = match bz[SETUP_SECTS] {
        0 => 4,
        n => n as usize,
    };
    let start = (setup + 1) * 512;
    let from_header = le32(bz, PAYLOAD_OFFSET)
        .zip(le32(bz, PAYLOAD_LENGTH))
        .and_then(|(off, len)| bz.get(start + off..start + off + len));
    if let Some(p) = from_header {
        if p.starts_with(&LZ4_LEGACY_MAGIC) || FORMATS.iter().any(|(m, _)| p.starts_with(m)) {
            return Ok(p);
        }
    }
    bz.windows(4)
        .position(|w| w == LZ4_LEGACY_MAGIC)
        .map(|at| &bz[at..])
        .ok_or_else(|| Error::InvalidArgument("no compressed kernel found in the bzImage".into()))
}

/// Legacy LZ4: magic, then (size, block) pairs to the end. The kernel's build appends the
/// uncompressed size, which reads as a block larger than what is left: the end.
fn lz4_legacy(p: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64 << 20);
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut at = 4;
    while let Some(size) = le32(p, at) {
        at += 4;
        if size == u32::from_le_bytes(LZ4_LEGACY_MAGIC) as usize {
            continue; // a concatenated stream
        }
        let Some(input) = p.get(at..at + size) else {
            break;
        };
        let n = lz4_flex::block::decompress_into(input, &mut block)
            .map_err(|e| Error::InvalidArgument(format!("LZ4 block at {at} of the kernel: {e}")))?;
        out.extend_from_slice(&block[..n]);
        at += size;
    }
    if out.is_empty() {
        return Err(Error::InvalidArgument("empty LZ4 kernel payload".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_a_bzimage_is_an_error() {
        let e = vmlinux(&[0u8; 4096]).unwrap_err();
        assert!(e.to_string().contains("HdrS"), "{e}");
    }

    #[test]
    fn lz4_legacy_blocks_concatenate() {
        let part = b"\x7fELF and then some text, some text, some text".repeat(100);
        let c = lz4_flex::block::compress(&part);
        let mut p = LZ4_LEGACY_MAGIC.to_vec();
        for _ in 0..2 {
            p.extend_from_slice(&(c.len() as u32).to_le_bytes());
            p.extend_from_slice(&c);
        }
        p.extend_from_slice(&((part.len() * 2) as u32).to_le_bytes());
        assert_eq!(lz4_legacy(&p).unwrap(), [part.clone(), part].concat());
    }
}
