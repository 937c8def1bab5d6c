//! Loads backend plugins (`*.so`) from the plugin directory through `abi_stable`.
//!
//! Each file is loaded on its own (`lib_header_from_path` + `init_root_module`, not
//! `RootModule::load_from_directory`, which caches one module per interface type for the whole
//! process). A file that is not a plugin, was built against an incompatible `plugin-api`, is of
//! the wrong kind, duplicates a loaded name, or fails to start is refused with a reason; the
//! others load normally.

use abi_stable::library::{LibraryError, RootModule, lib_header_from_path};
use abi_stable::std_types::RResult;
use rhizos_plugin_api::{BackendBox, BackendPluginRef, PLUGIN_API_VERSION, PluginKind};
use std::path::{Path, PathBuf};

/// A backend plugin that loaded and started.
pub struct LoadedPlugin {
    pub file: PathBuf,
    pub name: String,
    pub version: String,
    pub backends: Vec<String>,
    pub backend: BackendBox,
}

/// A file in the plugin directory that was not loaded, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedPlugin {
    pub file: PathBuf,
    pub reason: String,
}

#[derive(Default)]
pub struct PluginSet {
    pub loaded: Vec<LoadedPlugin>,
    pub refused: Vec<RefusedPlugin>,
}

impl PluginSet {
    /// The plugin that runs `backend`, if one is loaded.
    pub fn backend(&self, backend: &str) -> Option<&LoadedPlugin> {
        self.loaded
            .iter()
            .find(|p| p.backends.iter().any(|b| b == backend))
    }

    /// Every backend offered by the loaded plugins.
    pub fn backends(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .loaded
            .iter()
            .flat_map(|p| p.backends.iter().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

/// Whether a file name looks like a shared library.
fn is_shared_library(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("so" | "dylib" | "dll")
    )
}

/// Loads every shared library in `dir` (sorted by name, so duplicates resolve the same way on
/// every start). A missing directory is an empty set, with a warning.
pub fn load_dir(dir: &Path) -> PluginSet {
    let mut set = PluginSet::default();
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_shared_library(p))
            .collect(),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot read the plugin directory; no plugins loaded");
            return set;
        }
    };
    files.sort();
    for file in files {
        match load_file(&file) {
            Ok(plugin) => {
                if let Some(existing) = set.loaded.iter().find(|p| p.name == plugin.name) {
                    let reason = format!(
                        "duplicate plugin name {:?}: already loaded from {}",
                        plugin.name,
                        existing.file.display()
                    );
                    tracing::warn!(file = %file.display(), "plugin refused: {reason}");
                    set.refused.push(RefusedPlugin { file, reason });
                    continue;
                }
                tracing::info!(file = %file.display(), name = %plugin.name, version = %plugin.version, backends = ?plugin.backends, "plugin loaded");
                set.loaded.push(plugin);
            }
            Err(reason) => {
                tracing::warn!(file = %file.display(), "plugin refused: {reason}");
                set.refused.push(RefusedPlugin { file, reason });
            }
        }
    }
    set
}

/// Loads one backend plugin, or says why not.
pub fn load_file(path: &Path) -> Result<LoadedPlugin, String> {
    let header = lib_header_from_path(path).map_err(|e| describe_library_error(&e))?;
    let module = header
        .init_root_module::<BackendPluginRef>()
        .map_err(|e| describe_library_error(&e))?;
    let info = (module.describe())();
    if info.kind != PluginKind::Backend {
        return Err(format!(
            "plugin {} is a {:?} plugin, not an execution backend",
            info.name, info.kind
        ));
    }
    let backend = match (module.new_backend())("{}".into()) {
        RResult::ROk(backend) => backend,
        RResult::RErr(message) => {
            return Err(format!("plugin {} failed to start: {message}", info.name));
        }
    };
    Ok(LoadedPlugin {
        file: path.to_path_buf(),
        name: info.name.into_string(),
        version: info.version.into_string(),
        backends: info.backends.into_iter().map(|b| b.into_string()).collect(),
        backend,
    })
}

/// Short, actionable text for a load failure (abi_stable's own can be tens of KB).
fn describe_library_error(error: &LibraryError) -> String {
    match error {
        LibraryError::OpenError { err, .. } => format!("not a loadable shared library: {err}"),
        LibraryError::GetSymbolError { .. } => format!(
            "not a RhizOS plugin: it exports no `{}` root module (build it with rhizos-plugin-api and \
             #[export_root_module])",
            BackendPluginRef::NAME
        ),
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => format!(
            "built against rhizos-plugin-api {actual_version}, but this agent speaks {expected_version} \
             ({PLUGIN_API_VERSION}): rebuild the plugin against rhizos-plugin-api {PLUGIN_API_VERSION}"
        ),
        other => {
            let text = other.to_string();
            let summary: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .take(3)
                .collect();
            format!(
                "incompatible plugin (ABI check failed): {}",
                summary.join(" / ")
            )
        }
    }
}
