//! `make check-size`: keeps files small and backends short, and keeps the backends from
//! writing the same code twice.
//!
//! * No non-test source file over [`FILE_LIMIT`] lines ("non-test": a file's lines before
//!   its `#[cfg(test)] mod`; files of `tests/` directories and `tests.rs` modules are tests).
//! * Each backend crate within its budget of code lines (non-blank, non-comment lines of its
//!   non-test sources): runc 600, jail 700, wasm 2,000, vm 2,500.
//! * No run of [`SHARED_RUN`] code lines that two backend crates both hold: that code
//!   belongs in the SDK.
//!   (The `duplicates` tool of the developers' machines also finds runs alike but for names;
//!   it is not in CI's root, so this check keeps to runs the same to the letter.)
//!
//! What is over today is listed in `.config/size-ceilings` with its size now as its ceiling,
//! so nothing grows while it is being cut down; a ceiling above what the file or crate has
//! become is reported too, so the list only ever shrinks.
//!
//! ```text
//! check-size [--repo DIR]
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Lines a non-test source file may have.
const FILE_LIMIT: usize = 600;

/// Shared code lines that make a duplicate between backends.
const SHARED_RUN: usize = 6;

/// The crates whose sources are checked.
const CRATES: &[&str] = &[
    "protocol",
    "containerd-client",
    "shim-common",
    "shim-runc-v2",
    "shim-wasm",
    "shim-jail",
    "shim-vm",
    "shim-installer",
    "integration",
];

/// The backends and their budgets in code lines.
const BACKENDS: &[(&str, usize)] = &[
    ("shim-runc-v2", 600),
    ("shim-jail", 700),
    ("shim-wasm", 2000),
    ("shim-vm", 2500),
];

/// Where the ceilings of what is over its limit today are listed.
const CEILINGS: &str = ".config/size-ceilings";

/// One source file, measured.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Measure {
    /// Lines before the test module.
    lines: usize,
    /// Of those, the lines that hold code (not blank, not only a comment).
    code: usize,
}

/// Measures a file's text: everything before a top-level `#[cfg(test)]` that opens a module.
fn measure(text: &str) -> Measure {
    let all: Vec<&str> = text.lines().collect();
    let end = all
        .windows(2)
        .position(|w| w[0].starts_with("#[cfg(test)]") && w[1].starts_with("mod "))
        .unwrap_or(all.len());
    let code = all[..end].iter().filter(|l| is_code(l)).count();
    Measure { lines: end, code }
}

fn is_code(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && !t.starts_with("//")
}

/// Whether a path under a crate is test code as a whole.
fn is_test_file(rel: &Path) -> bool {
    rel.file_name().is_some_and(|n| n == "tests.rs")
        || rel.components().any(|c| c.as_os_str() == "tests")
}

/// The `.rs` files under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.filter_map(Result::ok) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// `path ceiling` lines; `#` starts a comment.
fn parse_ceilings(text: &str) -> Result<BTreeMap<String, usize>, String> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut it = line.split_whitespace();
        let (Some(key), Some(ceiling), None) = (it.next(), it.next(), it.next()) else {
            return Err(format!("{CEILINGS}:{}: want `PATH CEILING`", n + 1));
        };
        let ceiling = ceiling
            .parse()
            .map_err(|e| format!("{CEILINGS}:{}: ceiling {ceiling:?}: {e}", n + 1))?;
        if out.insert(key.to_string(), ceiling).is_some() {
            return Err(format!("{CEILINGS}:{}: {key} listed twice", n + 1));
        }
    }
    Ok(out)
}

/// Checks one size (in `unit`s) against its limit and its ceiling, if it has one; `None` when
/// it is fine.
fn judge(
    key: &str,
    size: usize,
    unit: &str,
    limit: usize,
    ceilings: &BTreeMap<String, usize>,
) -> Option<String> {
    match ceilings.get(key) {
        None if size <= limit => None,
        None => Some(format!("{key}: {size} {unit}, over the limit of {limit}")),
        Some(_) if size <= limit => Some(format!(
            "{key}: {size} {unit}, within the limit of {limit}: drop its line from {CEILINGS}"
        )),
        Some(&c) if size > c => Some(format!(
            "{key}: {size} {unit}, over its ceiling of {c} (limit {limit}): it must shrink, not grow"
        )),
        Some(&c) if size < c => Some(format!(
            "{key}: {size} {unit}, below its ceiling of {c}: lower the ceiling in {CEILINGS}"
        )),
        Some(_) => None,
    }
}

/// A run of [`SHARED_RUN`] code lines, as text with the indentation taken off.
type Run = Vec<String>;

/// Every run of code lines in `text`'s non-test part, with the line number it starts at.
/// Lines that carry nothing of their own (braces, `use` lines) neither start nor fill a run.
fn runs(text: &str) -> Vec<(usize, Run)> {
    let end = measure(text).lines;
    let lines: Vec<(usize, String)> = text
        .lines()
        .take(end)
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim().to_string()))
        .filter(|(_, l)| is_code(l) && !is_filler(l))
        .collect();
    lines
        .windows(SHARED_RUN)
        .map(|w| (w[0].0, w.iter().map(|(_, l)| l.clone()).collect()))
        .collect()
}

fn is_filler(line: &str) -> bool {
    line.chars().all(|c| "{}()[];,".contains(c))
        || line.starts_with("use ")
        || line.starts_with("#[")
}

/// `(place in one backend, place in another)` for each run two backends share, one row per
/// pair of files (the first run they share).
fn shared_between_backends(files: &[(String, String)]) -> Vec<(String, String)> {
    let crate_of = |p: &str| p.split('/').next().unwrap_or("").to_string();
    let mut seen: HashMap<Run, (String, usize)> = HashMap::new();
    let mut pairs: BTreeMap<(String, String), (usize, usize)> = BTreeMap::new();
    for (path, text) in files {
        for (line, run) in runs(text) {
            match seen.get(&run) {
                Some((other, at)) if crate_of(other) != crate_of(path) => {
                    pairs
                        .entry((other.clone(), path.clone()))
                        .or_insert((*at, line));
                }
                Some(_) => {}
                None => {
                    seen.insert(run, (path.clone(), line));
                }
            }
        }
    }
    pairs
        .into_iter()
        .map(|((a, b), (la, lb))| (format!("{a}:{la}"), format!("{b}:{lb}")))
        .collect()
}

fn run(repo: &Path) -> Result<Vec<String>, String> {
    let ceilings = match fs::read_to_string(repo.join(CEILINGS)) {
        Ok(t) => parse_ceilings(&t)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(format!("{CEILINGS}: {e}")),
    };
    let mut problems = Vec::new();
    let mut known = Vec::new();
    let mut backend_code: BTreeMap<&str, usize> = BTreeMap::new();
    let mut backend_files = Vec::new();
    for krate in CRATES {
        let src = repo.join(krate).join("src");
        if !src.is_dir() {
            return Err(format!("{}: no such directory", src.display()));
        }
        for file in rust_files(&src) {
            let rel = file.strip_prefix(repo).unwrap_or(&file).to_path_buf();
            if is_test_file(rel.strip_prefix(krate).unwrap_or(&rel)) {
                continue;
            }
            let text = fs::read_to_string(&file).map_err(|e| format!("{}: {e}", rel.display()))?;
            let m = measure(&text);
            let key = rel.to_string_lossy().into_owned();
            problems.extend(judge(&key, m.lines, "lines", FILE_LIMIT, &ceilings));
            known.push(key.clone());
            if let Some((name, _)) = BACKENDS.iter().find(|(b, _)| b == krate) {
                *backend_code.entry(name).or_default() += m.code;
                backend_files.push((key, text));
            }
        }
    }
    for (name, budget) in BACKENDS {
        let code = backend_code.get(name).copied().unwrap_or(0);
        problems.extend(judge(name, code, "code lines", *budget, &ceilings));
        known.push(name.to_string());
    }
    for key in ceilings.keys().filter(|k| !known.contains(k)) {
        problems.push(format!(
            "{CEILINGS}: {key} is no source file or backend here: drop it"
        ));
    }
    for (a, b) in shared_between_backends(&backend_files) {
        problems.push(format!(
            "{a} and {b}: the same {SHARED_RUN}+ code lines in two backends (move them to shim-common)"
        ));
    }
    Ok(problems)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let repo = match args.as_slice() {
        [] => PathBuf::from("."),
        [flag, dir] if flag == "--repo" => PathBuf::from(dir),
        _ => {
            eprintln!("usage: check-size [--repo DIR]");
            return ExitCode::from(2);
        }
    };
    match run(&repo) {
        Ok(problems) if problems.is_empty() => {
            println!(
                "check-size: every file and backend within its limit or ceiling ({CEILINGS}), \
                 no code shared between backends"
            );
            ExitCode::SUCCESS
        }
        Ok(problems) => {
            for p in &problems {
                eprintln!("check-size: {p}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("check-size: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_module_and_comments_do_not_count() {
        let text = "//! doc\nfn a() {}\n\n    // why\nfn b() {}\n#[cfg(test)]\nmod tests {\n}\n";
        assert_eq!(measure(text), Measure { lines: 5, code: 2 });
        // A `#[cfg(test)]` on an item is not the test module.
        let text = "#[cfg(test)]\nfn only_in_tests() {}\nfn a() {}\n";
        assert_eq!(measure(text).lines, 3);
    }

    #[test]
    fn test_files_are_told_apart() {
        assert!(is_test_file(Path::new("src/service/tests.rs")));
        assert!(is_test_file(Path::new("src/tests/helpers.rs")));
        assert!(!is_test_file(Path::new("src/testsuite.rs")));
    }

    #[test]
    fn ceilings_only_go_down() {
        let c = parse_ceilings("# over today\na.rs 700\nshim-vm 3000\n").expect("parses");
        assert_eq!(judge("b.rs", 600, "lines", 600, &c), None);
        assert!(judge("b.rs", 601, "lines", 600, &c).is_some_and(|m| m.contains("over the limit")));
        assert_eq!(judge("a.rs", 700, "lines", 600, &c), None);
        assert!(judge("a.rs", 701, "lines", 600, &c).is_some_and(|m| m.contains("must shrink")));
        assert!(
            judge("a.rs", 650, "lines", 600, &c).is_some_and(|m| m.contains("lower the ceiling"))
        );
        assert!(judge("a.rs", 500, "lines", 600, &c).is_some_and(|m| m.contains("drop its line")));
        assert!(parse_ceilings("a.rs\n").is_err());
        assert!(parse_ceilings("a.rs 1\na.rs 2\n").is_err());
    }

    #[test]
    fn runs_shared_by_two_backends_are_found_and_fillers_ignored() {
        let shared = "let a = 1;\nlet b = a + 1;\n}\nlet c = b * 2;\nlet d = c - 1;\nlet e = d / 2;\nlet f = e % 3;\n";
        let files = vec![
            (
                "shim-jail/src/a.rs".to_string(),
                format!("fn x() {{\n{shared}}}\n"),
            ),
            (
                "shim-jail/src/b.rs".to_string(),
                format!("fn y() {{\n{shared}}}\n"),
            ),
            (
                "shim-wasm/src/c.rs".to_string(),
                format!("// other\n\nfn z() {{\n    {shared}}}\n"),
            ),
        ];
        let pairs = shared_between_backends(&files);
        assert_eq!(
            pairs,
            vec![(
                "shim-jail/src/a.rs:2".to_string(),
                "shim-wasm/src/c.rs:4".to_string()
            )]
        );
        // Five shared lines are not a run.
        let files = vec![
            (
                "shim-jail/src/a.rs".to_string(),
                "let a = 1;\nlet b = 2;\nlet c = 3;\nlet d = 4;\nlet e = 5;\nlet j = 0;\n"
                    .to_string(),
            ),
            (
                "shim-vm/src/a.rs".to_string(),
                "let a = 1;\nlet b = 2;\nlet c = 3;\nlet d = 4;\nlet e = 5;\nlet v = 0;\n"
                    .to_string(),
            ),
        ];
        assert!(shared_between_backends(&files).is_empty());
    }
}
