//! containerd's config file, edited as TOML: runtime handler sections added and removed
//! without touching a byte of anything else.
//!
//! Where the handlers go depends on the file's `version`: 2 (containerd 1.6/1.7, and still
//! read by 2.x) keeps the CRI runtimes under `plugins."io.containerd.grpc.v1.cri"`; 3
//! (containerd 2.0–2.2) and 4 (2.3, which moved only server-level settings) under
//! `plugins."io.containerd.cri.v1.runtime"`. On containerd 1.x an imported file replaces a
//! plugin's whole section, so the handlers are added to the main file itself; on 2.x imports
//! merge deeply, so they go in a drop-in file of ours that the main file imports.

use thiserror::Error;
use toml_edit::{Array, DocumentMut, Item, Table, Value};

/// A config the installer will not edit, and why.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("not valid TOML: {0}")]
    Parse(#[from] toml_edit::TomlError),
    #[error("config version {0} is not supported (2 for containerd 1.6/1.7, 3 or 4 for 2.x); migrate it with `containerd config migrate`")]
    Version(i64),
    #[error(
        "the CRI plugin ({0}) is disabled in this config: a runtime handler would never be used"
    )]
    CriDisabled(String),
    #[error("`{0}` is not a table (an inline table or a value): edit it into a [table] first")]
    NotATable(String),
    #[error("runtime handler {name:?} already exists with other settings; choose another name (--handler {shim}=NAME) or remove it")]
    Conflict { name: String, shim: String },
    #[error("`imports` is not an array of strings")]
    Imports,
    #[error("invalid setting {0:?}: {1}")]
    Setting(String, String),
}

/// The config schema, from the file's `version`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schema {
    V2,
    V3,
    V4,
}

impl Schema {
    /// The schema of `doc`: containerd reads a file without `version` as version 1.
    pub fn of(doc: &DocumentMut) -> Result<Schema, ConfigError> {
        match doc.get("version").and_then(Item::as_integer).unwrap_or(1) {
            2 => Ok(Schema::V2),
            3 => Ok(Schema::V3),
            4 => Ok(Schema::V4),
            v => Err(ConfigError::Version(v)),
        }
    }

    pub fn number(self) -> i64 {
        match self {
            Schema::V2 => 2,
            Schema::V3 => 3,
            Schema::V4 => 4,
        }
    }

    /// The plugin whose `containerd.runtimes` table holds the CRI runtime handlers.
    pub fn cri_plugin(self) -> &'static str {
        match self {
            Schema::V2 => "io.containerd.grpc.v1.cri",
            Schema::V3 | Schema::V4 => "io.containerd.cri.v1.runtime",
        }
    }

    /// The path of the runtimes table, as keys.
    pub fn runtimes_path(self) -> [&'static str; 4] {
        ["plugins", self.cri_plugin(), "containerd", "runtimes"]
    }

    fn runtimes_name(self) -> String {
        format!("plugins.\"{}\".containerd.runtimes", self.cri_plugin())
    }
}

/// One runtime handler section: what a RuntimeClass's `handler` names.
#[derive(Clone, Debug)]
pub struct Handler {
    pub name: String,
    /// The shim it runs (for messages).
    pub shim: String,
    pub section: Table,
}

impl Handler {
    /// A handler running the shim of `runtime_type`.
    pub fn new(name: &str, shim: &str, runtime_type: &str) -> Handler {
        let mut section = Table::new();
        section["runtime_type"] = toml_edit::value(runtime_type);
        Handler {
            name: name.to_string(),
            shim: shim.to_string(),
            section,
        }
    }

    /// Sets `key` (dotted for a subtable: `options.SystemdCgroup`) to `value`, a TOML value
    /// as written in the file (`true`, `"crun"`, `["io.containerd.vm.*"]`).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let bad = |why: &str| ConfigError::Setting(format!("{key}={value}"), why.to_string());
        let value: Value = value
            .parse()
            .map_err(|e: toml_edit::TomlError| bad(e.message()))?;
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts
            .pop()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| bad("empty key"))?;
        let mut table = &mut self.section;
        for part in parts {
            if part.is_empty() {
                return Err(bad("empty key"));
            }
            let item = table
                .entry(part)
                .or_insert_with(|| Item::Table(Table::new()));
            table = item.as_table_mut().ok_or_else(|| bad("not a table"))?;
        }
        table[last] = Item::Value(value);
        Ok(())
    }
}

/// What [`add_handlers`] did.
#[derive(Debug, Default)]
pub struct Added {
    /// The new text, or `None` when every handler was already there as it would be written.
    pub text: Option<String>,
    pub added: Vec<String>,
    pub present: Vec<String>,
}

/// Adds `handlers` to the CRI runtimes of the config `text`, after everything that is there
/// (so the original is kept byte for byte); a handler already present with the same
/// settings is left alone, one with other settings is a conflict.
pub fn add_handlers(text: &str, handlers: &[Handler]) -> Result<Added, ConfigError> {
    let mut doc: DocumentMut = text.parse()?;
    let schema = Schema::of(&doc)?;
    check_cri_enabled(&doc, schema)?;
    let mut next = last_position(doc.as_table()) + 1;
    let runtimes = runtimes_mut(&mut doc, schema)?;
    let mut out = Added::default();
    for h in handlers {
        if let Some(existing) = runtimes.get(&h.name) {
            if same(existing, &Item::Table(h.section.clone())) {
                out.present.push(h.name.clone());
                continue;
            }
            return Err(ConfigError::Conflict {
                name: h.name.clone(),
                shim: h.shim.clone(),
            });
        }
        let mut section = h.section.clone();
        place(&mut section, &mut next);
        runtimes.insert(&h.name, Item::Table(section));
        out.added.push(h.name.clone());
    }
    if !out.added.is_empty() {
        out.text = Some(doc.to_string());
    }
    Ok(out)
}

/// Removes the handler sections `names` from the config `text`; returns the new text (or
/// `None` when none of them was there) and which were removed.
pub fn remove_handlers(
    text: &str,
    names: &[String],
) -> Result<(Option<String>, Vec<String>), ConfigError> {
    let mut doc: DocumentMut = text.parse()?;
    let schema = Schema::of(&doc)?;
    let mut removed = Vec::new();
    if let Some(runtimes) = runtimes_if_present(&mut doc, schema)? {
        for name in names {
            if runtimes.remove(name).is_some() {
                removed.push(name.clone());
            }
        }
    }
    let text = (!removed.is_empty()).then(|| doc.to_string());
    Ok((text, removed))
}

/// A drop-in file holding only `handlers`, in `schema`: containerd 2.3 refuses a drop-in
/// of a higher version than the main file, so it gets the main file's.
pub fn dropin(schema: Schema, handlers: &[Handler]) -> String {
    let mut doc = DocumentMut::new();
    doc["version"] = toml_edit::value(schema.number());
    let mut next = 1;
    if let Ok(runtimes) = runtimes_mut(&mut doc, schema) {
        for h in handlers {
            let mut section = h.section.clone();
            place(&mut section, &mut next);
            runtimes.insert(&h.name, Item::Table(section));
        }
    }
    doc.to_string()
}

/// The schema of the config `text`.
pub fn schema(text: &str) -> Result<Schema, ConfigError> {
    Schema::of(&text.parse()?)
}

/// The config `text` with `entry` appended to its `imports`, and whether `imports` had to
/// be created.
pub fn add_import(text: &str, entry: &str) -> Result<(String, bool), ConfigError> {
    let mut doc: DocumentMut = text.parse()?;
    let created = match doc.get_mut("imports") {
        Some(item) => {
            item.as_array_mut().ok_or(ConfigError::Imports)?.push(entry);
            false
        }
        None => {
            let mut imports = Array::new();
            imports.push(entry);
            doc.insert("imports", toml_edit::value(imports));
            true
        }
    };
    Ok((doc.to_string(), created))
}

/// The config `text` without the `imports` entry `entry`; `imports` itself goes when
/// `created` (the installer added it) and it is left empty.
pub fn remove_import(text: &str, entry: &str, created: bool) -> Result<String, ConfigError> {
    let mut doc: DocumentMut = text.parse()?;
    let mut empty = false;
    if let Some(item) = doc.get_mut("imports") {
        let imports = item.as_array_mut().ok_or(ConfigError::Imports)?;
        imports.retain(|v| v.as_str() != Some(entry));
        empty = imports.is_empty();
    }
    if created && empty {
        doc.remove("imports");
    }
    Ok(doc.to_string())
}

fn check_cri_enabled(doc: &DocumentMut, schema: Schema) -> Result<(), ConfigError> {
    let Some(disabled) = doc.get("disabled_plugins").and_then(Item::as_array) else {
        return Ok(());
    };
    // 1.x also accepts the plugin's short id.
    let ids = [schema.cri_plugin(), "cri", "io.containerd.grpc.v1.cri"];
    match disabled
        .iter()
        .filter_map(Value::as_str)
        .find(|d| ids.contains(d))
    {
        Some(d) => Err(ConfigError::CriDisabled(d.to_string())),
        None => Ok(()),
    }
}

/// The runtimes table, created (implicit, so no empty headers appear) when missing.
fn runtimes_mut(doc: &mut DocumentMut, schema: Schema) -> Result<&mut Table, ConfigError> {
    let mut table = doc.as_table_mut();
    let mut path = String::new();
    for key in schema.runtimes_path() {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
        let item = table.entry(key).or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        });
        table = item
            .as_table_mut()
            .ok_or_else(|| ConfigError::NotATable(schema_path(schema, &path)))?;
    }
    Ok(table)
}

fn runtimes_if_present(
    doc: &mut DocumentMut,
    schema: Schema,
) -> Result<Option<&mut Table>, ConfigError> {
    let mut item = doc.as_item_mut();
    for key in schema.runtimes_path() {
        match item.get_mut(key) {
            Some(next) => item = next,
            None => return Ok(None),
        }
    }
    item.as_table_mut()
        .map(Some)
        .ok_or_else(|| ConfigError::NotATable(schema.runtimes_name()))
}

fn schema_path(schema: Schema, dotted: &str) -> String {
    dotted.replace(schema.cri_plugin(), &format!("\"{}\"", schema.cri_plugin()))
}

/// The highest document position of any table under `table`.
fn last_position(table: &Table) -> isize {
    let mut last = table.position().unwrap_or(0);
    for (_, item) in table.iter() {
        if let Some(t) = item.as_table() {
            last = last.max(last_position(t));
        }
    }
    last
}

/// Gives `table` and its subtables positions from `next` on: written after everything
/// already in the document, in this order.
fn place(table: &mut Table, next: &mut isize) {
    table.set_implicit(false);
    table.set_position(Some(*next));
    *next += 1;
    for (_, item) in table.iter_mut() {
        if let Some(t) = item.as_table_mut() {
            place(t, next);
        }
    }
}

/// Whether two items hold the same values, whatever their layout.
fn same(a: &Item, b: &Item) -> bool {
    fn plain(item: &Item) -> Option<toml::Value> {
        let mut doc = DocumentMut::new();
        doc.insert("x", item.clone());
        let parsed: toml::Table = doc.to_string().parse().ok()?;
        parsed.get("x").cloned()
    }
    match (plain(a), plain(b)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn handler(name: &str) -> Handler {
        Handler::new(name, "wasm", "io.containerd.rs-wasm.v2")
    }

    const V2: &str = r#"# The admin's own comment.
version = 2
root = "/var/lib/containerd"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.9"   # pinned
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = true
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"

# trailing comment
"#;

    #[test]
    fn added_handlers_leave_every_other_byte_alone() {
        let mut vm = handler("rs-vm");
        vm.set("pod_annotations", r#"["io.containerd.vm.*"]"#)
            .unwrap();
        vm.set("options.MemoryMib", "256").unwrap();
        let out = add_handlers(V2, &[handler("rs-wasm"), vm]).unwrap();
        let text = out.text.unwrap();
        assert_eq!(out.added, ["rs-wasm", "rs-vm"]);
        // Everything before the trailing comment is kept as is, ours comes after it.
        let body = V2.strip_suffix("\n# trailing comment\n").unwrap();
        assert!(text.starts_with(body), "{text}");
        let parsed: toml::Table = text.parse().unwrap();
        let rt = &parsed["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
        assert_eq!(rt["rs-vm"]["options"]["MemoryMib"].as_integer(), Some(256));
        assert_eq!(
            rt["rs-wasm"]["runtime_type"].as_str(),
            Some("io.containerd.rs-wasm.v2")
        );
        assert_eq!(rt["runc"]["options"]["SystemdCgroup"].as_bool(), Some(true));

        // And removing them gives the original back, byte for byte.
        let names = vec!["rs-wasm".to_string(), "rs-vm".to_string()];
        let (back, removed) = remove_handlers(&text, &names).unwrap();
        assert_eq!(removed, names);
        assert_eq!(back.unwrap(), V2);
    }

    #[test]
    fn adding_twice_changes_nothing() {
        let once = add_handlers(V2, &[handler("rs-wasm")])
            .unwrap()
            .text
            .unwrap();
        let twice = add_handlers(&once, &[handler("rs-wasm")]).unwrap();
        assert!(twice.text.is_none());
        assert_eq!(twice.present, ["rs-wasm"]);
    }

    #[test]
    fn a_handler_of_the_same_name_with_other_settings_is_a_conflict() {
        let mut h = handler("runc");
        h.shim = "runc".into();
        let err = add_handlers(V2, &[h]).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Conflict { name, .. } if name == "runc"),
            "{err}"
        );
        assert!(err.to_string().contains("--handler runc=NAME"), "{err}");
    }

    #[test]
    fn an_empty_config_gets_only_the_handler_headers() {
        let out = add_handlers("version = 2\n", &[handler("rs-wasm")]).unwrap();
        let text = out.text.unwrap();
        assert_eq!(
            text,
            "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.rs-wasm]\nruntime_type = \"io.containerd.rs-wasm.v2\"\n"
        );
        let (back, _) = remove_handlers(&text, &["rs-wasm".into()]).unwrap();
        assert_eq!(back.unwrap(), "version = 2\n");
    }

    #[test]
    fn versions_3_and_4_use_the_cri_runtime_plugin() {
        // containerd 2.x's documented layout (docs/cri/config.md, version 3; 2.3's version 4
        // moved only server-level settings into plugins).
        for version in [3, 4] {
            let main = format!(
                "version = {version}\n\n[plugins.'io.containerd.cri.v1.runtime'.containerd]\n  default_runtime_name = 'runc'\n\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]\n  runtime_type = 'io.containerd.runc.v2'\n"
            );
            let out = add_handlers(&main, &[handler("rs-wasm")]).unwrap();
            let parsed: toml::Table = out.text.unwrap().parse().unwrap();
            let rt = &parsed["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"];
            assert!(rt.get("rs-wasm").is_some() && rt.get("runc").is_some());

            let schema = schema(&main).unwrap();
            let d = dropin(schema, &[handler("rs-wasm")]);
            let parsed: toml::Table = d.parse().unwrap();
            assert_eq!(parsed["version"].as_integer(), Some(version));
            assert_eq!(
                parsed["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]
                    ["rs-wasm"]["runtime_type"]
                    .as_str(),
                Some("io.containerd.rs-wasm.v2")
            );
        }
    }

    #[test]
    fn unsupported_configs_are_named() {
        let e = add_handlers("root = \"/x\"\n", &[handler("h")]).unwrap_err();
        assert!(matches!(e, ConfigError::Version(1)), "{e}");
        let e = add_handlers(
            "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
            &[handler("h")],
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::CriDisabled(_)), "{e}");
        let e = add_handlers(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nruntimes = { runc = { runtime_type = \"x\" } }\n",
            &[handler("h")],
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::NotATable(_)), "{e}");
        assert!(matches!(
            add_handlers("version = 2\n[x\n", &[]),
            Err(ConfigError::Parse(_))
        ));
    }

    #[test]
    fn settings_are_toml_values() {
        let mut h = handler("h");
        h.set("options.BinaryName", "\"crun\"").unwrap();
        h.set("privileged_without_host_devices", "true").unwrap();
        assert!(h.set("options.", "1").is_err());
        assert!(h.set("x", "not toml").is_err());
        assert!(h.set("runtime_type.sub", "1").is_err());
        assert_eq!(h.section["options"]["BinaryName"].as_str(), Some("crun"));
    }

    #[test]
    fn imports_entries_come_and_go_without_touching_the_rest() {
        let file = Path::new("/etc/containerd/conf.d/shim-installer.toml");
        let entry = file.to_string_lossy();
        let (added, created) = add_import("version = 3\n", &entry).unwrap();
        assert!(created);
        let parsed: toml::Table = added.parse().unwrap();
        assert_eq!(parsed["imports"][0].as_str(), Some(entry.as_ref()));
        assert_eq!(
            remove_import(&added, &entry, true).unwrap(),
            "version = 3\n"
        );

        let kept = "version = 3\nimports = [\"/a.toml\"]\n";
        let (added, created) = add_import(kept, &entry).unwrap();
        assert!(!created);
        assert_eq!(remove_import(&added, &entry, false).unwrap(), kept);
    }
}
