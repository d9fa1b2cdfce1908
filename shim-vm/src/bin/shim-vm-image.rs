//! Builds the guest image (kernel + initramfs) from Debian packages.
//!
//! ```text
//! shim-vm-image --init AGENT [--cache DIR] [--install DIR] [--link NAME | --no-link]
//!               [--file HOST[:GUEST]]...
//! ```
//! `--install DIR` makes `DIR/vm-guest` a symlink to the image, where the shim looks for it.

use std::path::PathBuf;
use std::process::ExitCode;

use shim_vm::image::{kernel, Builder, INSTALL_DIR};

fn usage() -> ExitCode {
    eprintln!(
        "usage: shim-vm-image --init AGENT [--cache DIR] [--install DIR] [--link NAME | --no-link] \
         [--file HOST[:GUEST]]..."
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut init = None;
    let mut cache = PathBuf::from("target/vm-guest");
    let mut install: Option<PathBuf> = None;
    let mut link = Some("current".to_string());
    let mut files = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next();
        match a.as_str() {
            "--init" => init = value().map(PathBuf::from),
            "--cache" => match value() {
                Some(v) => cache = v.into(),
                None => return usage(),
            },
            "--install" => install = value().map(PathBuf::from),
            "--link" => link = value(),
            "--no-link" => link = None,
            "--file" => match value() {
                Some(v) => files.push(match v.split_once(':') {
                    Some((h, g)) => (PathBuf::from(h), g.to_string()),
                    None => (PathBuf::from(&v), v),
                }),
                None => return usage(),
            },
            _ => return usage(),
        }
    }
    let Some(init) = init else { return usage() };
    if install.is_some() && link.is_none() {
        eprintln!("shim-vm-image: --install needs a --link to point at");
        return usage();
    }
    let mut builder = Builder::new(&cache, init).link(link.as_deref());
    for (h, g) in files {
        builder = builder.file(h, g);
    }
    // Said first: a kernel not yet in the cache takes minutes to build.
    if !kernel::is_cached(&cache) {
        println!(
            "guest kernel: building Debian's kernel source with shim-vm/guest/kernel.config \
             (once per source and configuration, ~5 min on 2 cores)"
        );
    }
    let built = match builder.build() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("shim-vm-image: {e}");
            return ExitCode::FAILURE;
        }
    };
    let size =
        |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0;
    if built.rebuilt {
        println!(
            "guest image {}: kernel {} ({:.1} MiB), initramfs {:.1} MiB",
            built.dir.display(),
            built.kernel.hash,
            size(&built.image.kernel),
            size(&built.image.initrd),
        );
    } else {
        println!(
            "guest image {} is up to date (inputs unchanged)",
            built.dir.display()
        );
    }
    if let (Some(dir), Some(link)) = (install, link) {
        let target = match std::fs::canonicalize(&cache) {
            Ok(c) => c.join(link),
            Err(e) => {
                eprintln!("shim-vm-image: {}: {e}", cache.display());
                return ExitCode::FAILURE;
            }
        };
        let at = dir.join(INSTALL_DIR);
        let tmp = dir.join(format!(".{INSTALL_DIR}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        if let Err(e) =
            std::os::unix::fs::symlink(&target, &tmp).and_then(|()| std::fs::rename(&tmp, &at))
        {
            eprintln!("shim-vm-image: install {}: {e}", at.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
