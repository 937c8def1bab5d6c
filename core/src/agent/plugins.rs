//! Loads backend plugins (`*.so`) from the plugin directory through `abi_stable`, and follows
//! the directory while the agent runs.
//!
//! Each file is loaded on its own (`lib_header_from_path` + `init_root_module`, not
//! `RootModule::load_from_directory`, which caches one module per interface type for the whole
//! process). A file that is not a plugin, was built against an incompatible `plugin-api`, is of
//! the wrong kind, duplicates a loaded name, or fails to start is refused with a reason; the
//! others load normally.
//!
//! **Hot reload.** [`PluginDir::scan`] compares the directory with what it saw last: a new file
//! is loaded, a changed one loaded again, a removed one dropped. A file is loaded from a private
//! copy named by its SHA-256 (the dynamic loader caches libraries by path and inode, and a
//! library overwritten in place while mapped would crash the process), and only once its size
//! and mtime held still for one scan (a copy in progress is not loaded half-written). Plugins
//! are shared as `Arc`s: an execution keeps the plugin it started on, so executions running on
//! a replaced or removed plugin finish on it. `abi_stable` never unloads a library, so each
//! distinct version loaded stays mapped until the agent exits.

use abi_stable::library::{LibraryError, RootModule, lib_header_from_path};
use abi_stable::std_types::{RResult, RString};
use rhizos_plugin_api::{
    BackendBox, BackendPluginRef, HostContext, PLUGIN_API_VERSION, PluginKind, ResolverBox,
    ResolverPluginRef,
};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// A backend plugin that loaded and started.
pub struct LoadedPlugin {
    /// The file in the plugin directory it came from.
    pub file: PathBuf,
    pub name: String,
    pub version: String,
    /// What it offers on this node: what it describes, or nothing when it is unavailable.
    pub backends: Vec<String>,
    pub backend: BackendBox,
    /// SHA-256 of the file (hex), which names its private copy.
    pub digest: String,
    /// Why it offers nothing here, when it says so.
    pub unavailable: Option<String>,
}

/// A stable-ABI resolver plugin that loaded.
pub struct LoadedResolver {
    pub file: PathBuf,
    pub name: String,
    pub version: String,
    pub resolver: ResolverBox,
    pub digest: String,
}

/// What a stable-ABI library turned out to be.
pub enum Native {
    Backend(LoadedPlugin),
    Resolver(LoadedResolver),
}

/// One resolver of the node's chain, of either plugin kind.
#[derive(Clone)]
pub enum ChainResolver {
    Native(Arc<LoadedResolver>),
    Component(Arc<crate::component::ResolverComponent>),
}

impl ChainResolver {
    pub fn name(&self) -> &str {
        match self {
            Self::Native(r) => &r.name,
            Self::Component(c) => &c.name,
        }
    }

    pub fn version(&self) -> &str {
        match self {
            Self::Native(r) => &r.version,
            Self::Component(c) => &c.version,
        }
    }

    pub fn file(&self) -> &Path {
        match self {
            Self::Native(r) => &r.file,
            Self::Component(c) => &c.file,
        }
    }

    /// The module's manifest (JSON text), `None` when unknown here. Blocking.
    pub fn resolve(&self, id: &str, version: Option<&str>) -> Result<Option<String>, String> {
        match self {
            Self::Native(r) => {
                match r
                    .resolver
                    .resolve(id.into(), version.map(Into::into).into())
                {
                    RResult::ROk(found) => Ok(found.into_option().map(|m| m.into_string())),
                    RResult::RErr(message) => Err(message.into_string()),
                }
            }
            Self::Component(c) => c.resolve(id, version),
        }
    }

    /// Every module this resolver knows (manifests), `None` when it cannot enumerate. Blocking.
    pub fn list(&self) -> Result<Option<Vec<String>>, String> {
        match self {
            Self::Native(r) => match r.resolver.list() {
                RResult::ROk(found) => Ok(found
                    .into_option()
                    .map(|all| all.into_iter().map(RString::into_string).collect())),
                RResult::RErr(message) => Err(message.into_string()),
            },
            Self::Component(c) => c.list(),
        }
    }
}

/// A file in the plugin directory that was not loaded, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedPlugin {
    pub file: PathBuf,
    pub reason: String,
}

/// The plugins in force: what executions start on and what the node advertises.
#[derive(Default, Clone)]
pub struct PluginSet {
    /// Stable-ABI backend plugins.
    pub loaded: Vec<Arc<LoadedPlugin>>,
    /// Resolvers (stable-ABI and components), in file name order: the node's resolver chain.
    pub resolvers: Vec<ChainResolver>,
    pub refused: Vec<RefusedPlugin>,
}

impl PluginSet {
    /// The plugin that runs `backend`, if one is loaded.
    pub fn backend(&self, backend: &str) -> Option<&Arc<LoadedPlugin>> {
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

/// Whether a file name looks like a WebAssembly component.
fn is_component(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()) == Some("wasm")
}

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
    /// For a component: its manifest's length and mtime (a manifest change reloads it).
    manifest: Option<(u64, Option<SystemTime>)>,
}

fn fingerprint(path: &Path) -> std::io::Result<Fingerprint> {
    let meta = std::fs::metadata(path)?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    let manifest = is_component(path)
        .then(|| std::fs::metadata(crate::component::manifest_path(path)).ok())
        .flatten()
        .map(|m| (m.len(), m.modified().ok()));
    Ok(Fingerprint {
        len: meta.len(),
        modified: meta.modified().ok(),
        inode,
        manifest,
    })
}

enum Entry {
    Loaded(Arc<LoadedPlugin>),
    Resolver(Arc<LoadedResolver>),
    Component(Arc<crate::component::ResolverComponent>),
    Refused(String),
}

/// A plugin directory as the agent last saw it.
pub struct PluginDir {
    dir: PathBuf,
    /// Private copies the plugins are loaded from (removed when this is dropped; mapped copies
    /// stay valid after removal).
    shadow: PathBuf,
    files: BTreeMap<PathBuf, (Fingerprint, Entry)>,
    /// Files seen changed at the last scan, with how they looked then: loaded once unchanged.
    settling: HashMap<PathBuf, Fingerprint>,
    /// Why the directory itself could not be read, once (not repeated every scan).
    unreadable: Option<String>,
    /// The engine for component plugins, started with the first `.wasm` file.
    components: Option<crate::component::ComponentHost>,
    /// JSON config per plugin name, handed to the plugin when it starts.
    configs: std::collections::BTreeMap<String, String>,
    /// Who the plugins serve (the node id), handed to every backend plugin when it starts.
    host: HostContext,
}

/// What one scan changed, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScanChanges {
    pub added: Vec<PathBuf>,
    pub replaced: Vec<PathBuf>,
    pub removed: Vec<PathBuf>,
}

impl ScanChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.replaced.is_empty() && self.removed.is_empty()
    }
}

impl PluginDir {
    /// Follows `dir`; private copies go to a fresh directory under the system temp dir.
    pub fn new(
        dir: &Path,
        configs: std::collections::BTreeMap<String, String>,
        node_id: &str,
    ) -> std::io::Result<Self> {
        let shadow = std::env::temp_dir().join(format!(
            "rhizos-plugins-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&shadow)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            shadow,
            files: BTreeMap::new(),
            settling: HashMap::new(),
            unreadable: None,
            components: None,
            configs,
            host: HostContext {
                node_id: node_id.into(),
            },
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Brings the loaded plugins in line with the directory. With `settle`, a new or changed
    /// file is loaded only once it looked the same at two scans in a row (at start, pass
    /// `false`: everything present is loaded at once).
    pub fn scan(&mut self, settle: bool) -> ScanChanges {
        let mut changes = ScanChanges::default();
        let present: Vec<(PathBuf, Fingerprint)> = match std::fs::read_dir(&self.dir) {
            Ok(entries) => {
                self.unreadable = None;
                let mut files: Vec<(PathBuf, Fingerprint)> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| is_shared_library(p) || is_component(p))
                    .filter_map(|p| fingerprint(&p).ok().map(|f| (p, f)))
                    .collect();
                files.sort_by(|a, b| a.0.cmp(&b.0));
                files
            }
            Err(e) => {
                let why = e.to_string();
                if self.unreadable.as_ref() != Some(&why) {
                    tracing::warn!(dir = %self.dir.display(), error = %why, "cannot read the plugin directory");
                    self.unreadable = Some(why);
                }
                Vec::new()
            }
        };
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|f| !present.iter().any(|(p, _)| p == *f))
            .cloned()
            .collect();
        for file in gone {
            self.files.remove(&file);
            tracing::info!(file = %file.display(), "plugin file removed; its plugin is unloaded (running executions finish on it)");
            changes.removed.push(file);
        }
        self.settling
            .retain(|f, _| present.iter().any(|(p, _)| p == f));
        for (file, print) in present {
            let known = self.files.get(&file).map(|(f, _)| *f);
            if known == Some(print) {
                self.settling.remove(&file);
                continue;
            }
            if settle && self.settling.get(&file) != Some(&print) {
                // New or still changing: look again at the next scan.
                self.settling.insert(file.clone(), print);
                continue;
            }
            self.settling.remove(&file);
            let entry = if is_component(&file) {
                match self.load_component(&file) {
                    Ok(crate::component::LoadedComponent::Resolver(component)) => {
                        Entry::Component(Arc::new(component))
                    }
                    Ok(crate::component::LoadedComponent::Backend(component)) => {
                        let digest = std::fs::read(&file)
                            .map(|bytes| crate::sha256_hex(&bytes))
                            .unwrap_or_default();
                        Entry::Loaded(Arc::new(LoadedPlugin {
                            file: file.clone(),
                            name: component.name.clone(),
                            version: component.version.clone(),
                            backends: component.backends.clone(),
                            backend: rhizos_plugin_api::sdk::backend_box(component),
                            digest,
                            unavailable: None,
                        }))
                    }
                    Err(reason) => Entry::Refused(reason),
                }
            } else {
                match self.load_copy(&file) {
                    Ok(Native::Backend(plugin)) => Entry::Loaded(Arc::new(plugin)),
                    Ok(Native::Resolver(resolver)) => Entry::Resolver(Arc::new(resolver)),
                    Err(reason) => Entry::Refused(reason),
                }
            };
            match &entry {
                Entry::Loaded(p) => {
                    tracing::info!(file = %file.display(), name = %p.name, version = %p.version, backends = ?p.backends, "plugin loaded")
                }
                Entry::Component(c) => {
                    tracing::info!(file = %file.display(), name = %c.name, version = %c.version, kind = "resolver", "component plugin loaded")
                }
                Entry::Resolver(r) => {
                    tracing::info!(file = %file.display(), name = %r.name, version = %r.version, kind = "resolver", "plugin loaded")
                }
                Entry::Refused(reason) => {
                    tracing::warn!(file = %file.display(), "plugin refused: {reason}")
                }
            }
            if known.is_some() {
                changes.replaced.push(file.clone());
            } else {
                changes.added.push(file.clone());
            }
            self.files.insert(file, (print, entry));
        }
        changes
    }

    /// The plugins in force: loaded ones by file name order, a later file whose plugin name is
    /// already taken refused as a duplicate (it takes over if the earlier file goes away).
    pub fn set(&self) -> PluginSet {
        let mut set = PluginSet::default();
        let mut names: Vec<(String, PathBuf)> = Vec::new();
        for (file, (_, entry)) in &self.files {
            let name = match entry {
                Entry::Loaded(plugin) => Some(plugin.name.clone()),
                Entry::Component(component) => Some(component.name.clone()),
                Entry::Resolver(resolver) => Some(resolver.name.clone()),
                Entry::Refused(_) => None,
            };
            if let Some(name) = name {
                if let Some((_, first)) = names.iter().find(|(n, _)| *n == name) {
                    set.refused.push(RefusedPlugin {
                        file: file.clone(),
                        reason: format!(
                            "duplicate plugin name {name:?}: already loaded from {}",
                            first.display()
                        ),
                    });
                    continue;
                }
                names.push((name, file.clone()));
            }
            match entry {
                Entry::Component(component) => set
                    .resolvers
                    .push(ChainResolver::Component(component.clone())),
                Entry::Resolver(resolver) => {
                    set.resolvers.push(ChainResolver::Native(resolver.clone()))
                }
                Entry::Loaded(plugin) => set.loaded.push(plugin.clone()),
                Entry::Refused(reason) => set.refused.push(RefusedPlugin {
                    file: file.clone(),
                    reason: reason.clone(),
                }),
            }
        }
        set
    }

    /// Loads a component plugin with the manifest beside it.
    fn load_component(&mut self, file: &Path) -> Result<crate::component::LoadedComponent, String> {
        let manifest =
            crate::component::read_manifest(&crate::component::manifest_path(file), &self.dir)?;
        let host = match &self.components {
            Some(host) => host.clone(),
            None => {
                let host = crate::component::ComponentHost::new()
                    .map_err(|e| format!("cannot start the component engine: {e:#}"))?;
                self.components = Some(host.clone());
                host
            }
        };
        host.load(file, manifest)
    }

    /// Copies `file` to its private, content-named path and loads it from there.
    fn load_copy(&self, file: &Path) -> Result<Native, String> {
        let bytes = std::fs::read(file).map_err(|e| format!("cannot read the file: {e}"))?;
        let digest = crate::sha256_hex(&bytes);
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("plugin");
        let extension = file.extension().and_then(|e| e.to_str()).unwrap_or("so");
        let copy = self
            .shadow
            .join(format!("{stem}-{}.{extension}", &digest[..16]));
        if !copy.exists() {
            let partial = copy.with_extension("partial");
            std::fs::write(&partial, &bytes)
                .and_then(|()| std::fs::rename(&partial, &copy))
                .map_err(|e| format!("cannot copy the plugin to {}: {e}", copy.display()))?;
        }
        let config = |name: &str| {
            self.configs
                .get(name)
                .cloned()
                .unwrap_or_else(|| "{}".to_owned())
        };
        Ok(match load_library(&copy, &config, &self.host)? {
            Native::Backend(mut plugin) => {
                plugin.file = file.to_path_buf();
                plugin.digest = digest;
                Native::Backend(plugin)
            }
            Native::Resolver(mut resolver) => {
                resolver.file = file.to_path_buf();
                resolver.digest = digest;
                Native::Resolver(resolver)
            }
        })
    }
}

impl Drop for PluginDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.shadow);
    }
}

/// Loads every shared library in `dir` once (no watching).
pub fn load_dir(
    dir: &Path,
    configs: std::collections::BTreeMap<String, String>,
    node_id: &str,
) -> std::io::Result<(PluginDir, PluginSet)> {
    let mut plugins = PluginDir::new(dir, configs, node_id)?;
    plugins.scan(false);
    let set = plugins.set();
    Ok((plugins, set))
}

/// Loads one backend plugin, or says why not.
pub fn load_file(path: &Path) -> Result<LoadedPlugin, String> {
    let host = HostContext {
        node_id: "standalone".into(),
    };
    match load_library(path, &|_| "{}".to_owned(), &host)? {
        Native::Backend(plugin) => Ok(plugin),
        Native::Resolver(resolver) => Err(format!(
            "plugin {} is a resolver, not an execution backend",
            resolver.name
        )),
    }
}

/// Loads one stable-ABI plugin of either kind: the root module's name in the library header
/// says which (`rhizos_backend` or `rhizos_resolver`), then abi_stable checks its layout. The
/// plugin starts with `config(name)` (JSON text).
pub fn load_library(
    path: &Path,
    config: &dyn Fn(&str) -> String,
    host: &HostContext,
) -> Result<Native, String> {
    let header = lib_header_from_path(path).map_err(|e| describe_library_error(&e))?;
    if header.root_mod_consts().name().as_str() == ResolverPluginRef::NAME {
        let module = header
            .init_root_module::<ResolverPluginRef>()
            .map_err(|e| describe_library_error(&e))?;
        let info = (module.describe())();
        if info.kind != PluginKind::Resolver {
            return Err(format!(
                "plugin {} exports a resolver root module but says it is a {:?} plugin",
                info.name, info.kind
            ));
        }
        let settings = config(info.name.as_str());
        let resolver = match (module.new_resolver())(settings.as_str().into()) {
            RResult::ROk(resolver) => resolver,
            RResult::RErr(message) => {
                return Err(format!("plugin {} failed to start: {message}", info.name));
            }
        };
        return Ok(Native::Resolver(LoadedResolver {
            file: path.to_path_buf(),
            name: info.name.into_string(),
            version: info.version.into_string(),
            resolver,
            digest: String::new(),
        }));
    }
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
    let settings = config(info.name.as_str());
    let backend = match (module.new_backend())(settings.as_str().into(), host) {
        RResult::ROk(backend) => backend,
        RResult::RErr(message) => {
            return Err(format!("plugin {} failed to start: {message}", info.name));
        }
    };
    let unavailable = backend
        .unavailable()
        .into_option()
        .map(RString::into_string);
    Ok(Native::Backend(LoadedPlugin {
        file: path.to_path_buf(),
        name: info.name.into_string(),
        version: info.version.into_string(),
        backends: if unavailable.is_some() {
            Vec::new()
        } else {
            info.backends.into_iter().map(|b| b.into_string()).collect()
        },
        backend,
        digest: String::new(),
        unavailable,
    }))
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
