//! `index` resolver component: finds `chain://<id>[@<version>]` modules in a JSON index file.
//!
//! Config (the manifest's `config`): `{"index": "<guest path of the index file>"}`; the file's
//! directory must be granted to the component (read-only) in its manifest. The index:
//! `{"modules": [{"id": "...", "version": "1.0.0", ...}, ...]}`; `resolve` returns the whole
//! entry (JSON text) of the asked version, or of the highest version when none is asked
//! (versions compare as dotted numbers). Errors name the file, the entry and the field.

wit_bindgen::generate!({
    path: "../../plugin-api/wit",
    world: "resolver",
});


use rhizos::plugin::types::PluginKind;
use std::cell::RefCell;

struct Index;

thread_local! {
    static INDEX_PATH: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn version_key(version: &str) -> Vec<u64> {
    version
        .split('.')
        .map(|part| part.trim().parse::<u64>().unwrap_or(0))
        .collect()
}

impl Guest for Index {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "index".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::Resolver,
            backends: Vec::new(),
        }
    }

    fn configure(config: String) -> Result<(), String> {
        let config: serde_json::Value = serde_json::from_str(&config)
            .map_err(|e| format!("config is not JSON: {e}"))?;
        let path = config
            .get("index")
            .and_then(|v| v.as_str())
            .ok_or("config needs \"index\": the guest path of the index file")?;
        INDEX_PATH.with(|p| *p.borrow_mut() = Some(path.to_owned()));
        Ok(())
    }

    fn resolve(id: String, version: Option<String>) -> Result<Option<String>, String> {
        let (path, index) = read_index()?;
        let modules = index
            .get("modules")
            .and_then(|m| m.as_array())
            .ok_or_else(|| format!("index {path}: field \"modules\" (a list) is missing"))?;
        let mut best: Option<(&serde_json::Value, Vec<u64>)> = None;
        for (position, entry) in modules.iter().enumerate() {
            let entry_id = entry.get("id").and_then(|v| v.as_str()).ok_or_else(|| {
                format!("index {path}: modules[{position}]: field \"id\" (a string) is missing")
            })?;
            if entry_id != id {
                continue;
            }
            let entry_version = entry.get("version").and_then(|v| v.as_str()).ok_or_else(|| {
                format!("index {path}: modules[{position}] ({id}): field \"version\" (a string) is missing")
            })?;
            match &version {
                Some(wanted) if wanted == entry_version => {
                    return Ok(Some(entry.to_string()));
                }
                Some(_) => {}
                None => {
                    let key = version_key(entry_version);
                    if best.as_ref().is_none_or(|(_, k)| key > *k) {
                        best = Some((entry, key));
                    }
                }
            }
        }
        Ok(best.map(|(entry, _)| entry.to_string()))
    }

    fn list() -> Result<Option<Vec<String>>, String> {
        let (path, index) = read_index()?;
        let modules = index
            .get("modules")
            .and_then(|m| m.as_array())
            .ok_or_else(|| format!("index {path}: field \"modules\" (a list) is missing"))?;
        Ok(Some(modules.iter().map(|entry| entry.to_string()).collect()))
    }
}

/// The configured index file's path and content.
fn read_index() -> Result<(String, serde_json::Value), String> {
    let path = INDEX_PATH
        .with(|p| p.borrow().clone())
        .ok_or("not configured: call configure first")?;
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!("cannot read index {path}: {e} (is its directory granted in the manifest?)")
    })?;
    let index: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("index {path} is not valid JSON: {e}"))?;
    Ok((path, index))
}

export!(Index);
