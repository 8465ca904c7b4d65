//! The wasmtime host: runs the configured plugin chain over message batches.
//!
//! - [`host`]: the one engine (pooling allocator, epoch interruption), the linker with the
//!   host imports, the compiled-component cache, import checks at load.
//! - `state`: an instance's store state (WASI context, memory limit, the host imports);
//!   [`stats`]: a plugin's counters and last error.
//! - [`worker`]: the chain's calls, with instances (one store per plugin) reused across
//!   batches and rebuilt after a trap, a timeout or a memory blow-up.
//! - [`reload`]: watches plugin files and swaps in new versions; in-flight batches finish
//!   on the version they started with.
//! - `manage`: uploaded versions, activations and deletions (the admin API's);
//!   [`versions`]: where they are stored.
//! - `outcome`: what the chain made of each message ([`InputResult`]).
//! - [`offline`]: `sluice plugin run`, a plugin over a samples file without a gateway.
//!
//! Plugins run on the async runtime's threads, in the request's own task, with wasmtime's
//! `call_async`: handing each batch to a plugin thread and back cost more than the plugins
//! themselves (BENCHMARKS.md). Nothing a plugin can call waits on I/O, so a call runs to
//! its end in one go; its time limit (epoch interruption) bounds how long it holds the
//! thread, and the runtime's other threads take over the queued work meanwhile. Sets of
//! instances are kept in a pool and lent to one batch at a time.

pub mod host;
mod manage;
pub mod new;
pub mod offline;
mod outcome;
pub mod output;
pub mod reload;
mod state;
pub mod stats;
pub mod versions;
pub mod worker;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::{Config, PluginEntry, plugin_config_value};
use crate::message::Message;
use crate::plugin::host::{Host, Limits, Prepared};
pub use crate::plugin::manage::{AdminError, VersionReport};
use crate::plugin::outcome::unavailable;
pub use crate::plugin::outcome::{FailureKind, InputResult, Output, PartFailure, RouterChoice};
use crate::plugin::stats::PluginStats;
use crate::plugin::versions::Versions;

/// Which world a plugin targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// Transforms messages.
    Transform,
    /// Chooses destinations.
    Router,
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PluginKind::Transform => "transform",
            PluginKind::Router => "router",
        })
    }
}

/// Why a plugin could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The engine could not be set up.
    #[error("cannot set up the WebAssembly engine: {0}")]
    Engine(String),
    /// The file could not be read.
    #[error("cannot read plugin {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The file is not a usable plugin component.
    #[error("plugin {path} is refused: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The component imports what plugins may not have.
    #[error(
        "plugin {path} is refused: it imports {}, which plugins may not use (the gateway \
         links sluice:plugin/host, clocks, random, stdio into its log, a filesystem and \
         sockets that reach nothing; `sluice plugin check FILE` lists each import)",
        imports.join(", ")
    )]
    ForbiddenImports {
        /// The file.
        path: PathBuf,
        /// The refused imports.
        imports: Vec<String>,
    },
    /// The plugin's `init` refused its configuration, or trapped.
    #[error("plugin `{name}` failed to initialise: {reason}")]
    Init {
        /// The plugin's name.
        name: String,
        /// What `init` said.
        reason: String,
    },
    /// The configuration names two routers, or a router as a transform.
    #[error("plugin `{name}` ({path}) is a {actual} plugin but is configured as a {expected}")]
    WrongKind {
        /// The plugin's name.
        name: String,
        /// The file.
        path: PathBuf,
        /// What the configuration says.
        expected: PluginKind,
        /// What the component is.
        actual: PluginKind,
    },
}

/// Where a loaded version came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// The file named in the configuration.
    Configured,
    /// A version uploaded through the admin API.
    Uploaded,
}

/// One loaded version of one plugin.
pub struct LoadedPlugin {
    /// Unique per load, so workers can tell versions apart.
    pub id: u64,
    /// The configured name.
    pub name: String,
    /// Transform or router.
    pub kind: PluginKind,
    /// The component file this version was loaded from.
    pub path: PathBuf,
    /// The plugin as configured (its `path` is the configured file).
    pub entry: PluginEntry,
    /// The configured file, or an uploaded version.
    pub source: Source,
    /// SHA-256 of the component file, hex.
    pub hash: String,
    /// When this version started serving, ms since the epoch.
    pub loaded_at_ms: u64,
    /// The pre-instantiated component.
    pub prepared: Prepared,
    /// The key/value pairs handed to `init`.
    pub config: Vec<(String, String)>,
    /// Counters and the name used in logs; shared across versions of the same plugin.
    pub stats: Arc<PluginStats>,
    /// The topics it is for (`entry.topics`, parsed); empty: every message.
    pub scope: Vec<crate::topic::TopicFilter>,
}

impl LoadedPlugin {
    /// Whether a message on `topic` is sent to this plugin: one its filters match, or,
    /// when it has none, any message but a request on IoT Core's reserved topics
    /// (shadow, jobs, provisioning, …), which only a plugin scoped to it by a filter sees.
    pub fn in_scope(&self, topic: &str) -> bool {
        if self.scope.is_empty() {
            crate::topic::reserved(topic).is_none()
        } else {
            self.scoped_to(topic)
        }
    }

    /// Whether one of the plugin's filters matches `topic`.
    pub fn scoped_to(&self, topic: &str) -> bool {
        self.scope.iter().any(|filter| filter.matches(topic))
    }
}

/// The active chain: transforms in order, then an optional router.
#[derive(Default)]
pub struct PluginSet {
    /// Transform plugins, in configuration order.
    pub transforms: Vec<Arc<LoadedPlugin>>,
    /// The router plugin.
    pub router: Option<Arc<LoadedPlugin>>,
}

impl PluginSet {
    /// Every plugin of the set.
    pub fn all(&self) -> impl Iterator<Item = &Arc<LoadedPlugin>> {
        self.transforms.iter().chain(self.router.iter())
    }

    /// The plugin called `name`.
    pub fn find(&self, name: &str) -> Option<&Arc<LoadedPlugin>> {
        self.all().find(|plugin| plugin.name == name)
    }

    fn contains(&self, id: u64) -> bool {
        self.all().any(|plugin| plugin.id == id)
    }

    fn slots(&mut self) -> impl Iterator<Item = &mut Arc<LoadedPlugin>> {
        self.transforms.iter_mut().chain(self.router.as_mut())
    }
}

/// One instance per active plugin, by load id: what one batch runs with.
type InstanceSet = HashMap<u64, worker::Instance>;

/// Plugins beyond the configured ones that the instance pool has room for, so that a
/// configuration reload can add some without a restart.
const SPARE_PLUGINS: usize = 4;

struct Inner {
    host: Host,
    set: ArcSwap<PluginSet>,
    /// Instance sets not lent to a batch right now (as many as batches ever ran at once:
    /// about one per runtime thread).
    idle: Mutex<Vec<InstanceSet>>,
    /// Set by [`Plugins::stop`]: batches are refused from then on.
    stopped: std::sync::atomic::AtomicBool,
    next_id: AtomicU64,
    /// Held while a new set is built and swapped in (file reloads, uploads, activations
    /// and configuration reloads), so two changes never undo each other.
    changing: Mutex<()>,
    /// Held by an upload from storing its file to its answer: a second upload of the same
    /// bytes must not find a file that the first is about to delete as invalid.
    uploading: Mutex<()>,
    /// Counters by plugin name, kept across versions and reloads.
    stats: Mutex<HashMap<String, Arc<PluginStats>>>,
    /// Uploaded versions; `None` for a host without a data directory.
    versions: Option<Versions>,
    /// Most plugins the instance pool is sized for.
    capacity: usize,
}

/// The running plugin host; cheap to clone.
#[derive(Clone)]
pub struct Plugins {
    inner: Arc<Inner>,
}

/// The configured plugins, transforms first, with their kinds.
pub fn configured_entries(config: &Config) -> Vec<(PluginEntry, PluginKind)> {
    config
        .plugins
        .transform
        .iter()
        .map(|entry| (entry.clone(), PluginKind::Transform))
        .chain(
            config
                .plugins
                .router
                .iter()
                .map(|entry| (entry.clone(), PluginKind::Router)),
        )
        .collect()
}

impl Plugins {
    /// Loads every configured plugin (compiling, checking imports, running `init` once)
    /// (nothing else starts: batches run on their callers' threads). Uploaded versions activated through the admin API
    /// (kept under the data directory) serve in place of their configured files.
    pub fn start(config: &Config) -> Result<Plugins, PluginError> {
        let entries = configured_entries(config);
        let workers = config.plugins.workers.max(1);
        let capacity = entries.len() + SPARE_PLUGINS;
        let host = Plugins::make_host(config, workers, capacity)?;
        let versions = Versions::new(config.server.data_dir.join("plugins"));
        Plugins::with_host(host, &entries, workers, capacity, Some(versions))
    }

    /// Loads the configured plugins from their configured files only (uploaded versions
    /// and their activations are left alone): `sluice config check`.
    pub fn check(config: &Config) -> Result<Plugins, PluginError> {
        let entries = configured_entries(config);
        let capacity = entries.len().max(1);
        let host = Plugins::make_host(config, 1, capacity)?;
        Plugins::with_host(host, &entries, 1, capacity, None)
    }

    /// A host running just one plugin file, of whichever kind it is (for `sluice plugin
    /// run`).
    pub fn single(
        config: &Config,
        path: &Path,
        plugin_config: Vec<(String, String)>,
    ) -> Result<Plugins, PluginError> {
        let host = Plugins::make_host(config, 1, 1)?;
        let (prepared, _) = host.load(path)?;
        let kind = prepared.kind();
        let entry = PluginEntry {
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: path.to_path_buf(),
            config: plugin_config
                .into_iter()
                .map(|(k, v)| (k, toml::Value::String(v)))
                .collect(),
            topics: Vec::new(),
        };
        Plugins::with_host(host, &[(entry, kind)], 1, 1, None)
    }

    fn make_host(config: &Config, workers: usize, capacity: usize) -> Result<Host, PluginError> {
        let limits = Limits {
            call_timeout: Duration::from_millis(config.plugins.call_timeout_ms),
            memory_bytes: (config.plugins.memory_limit_mib as usize) << 20,
        };
        // Each worker holds one instance per plugin, twice over during a reload, plus a
        // few for validating new versions.
        let instances = (workers * capacity.max(1) * 2 + 4) as u32;
        Host::new(limits, config.cache_dir(), instances)
    }

    fn with_host(
        host: Host,
        entries: &[(PluginEntry, PluginKind)],
        workers: usize,
        capacity: usize,
        versions: Option<Versions>,
    ) -> Result<Plugins, PluginError> {
        let inner = Arc::new(Inner {
            host,
            set: ArcSwap::from_pointee(PluginSet::default()),
            idle: Mutex::new(Vec::with_capacity(workers)),
            stopped: std::sync::atomic::AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            changing: Mutex::new(()),
            uploading: Mutex::new(()),
            stats: Mutex::new(HashMap::new()),
            versions,
            capacity,
        });
        let plugins = Plugins { inner };
        let (set, _) = plugins.build_set(entries, &PluginSet::default())?;
        for plugin in set.all() {
            tracing::info!(plugin = %plugin.name, kind = %plugin.kind, source = ?plugin.source, hash = %&plugin.hash[..12], path = %plugin.path.display(), "plugin loaded");
        }
        plugins.inner.set.store(Arc::new(set));
        Ok(plugins)
    }

    /// The counters of plugin `name`, shared by all its versions.
    fn stats_for(&self, name: &str) -> Arc<PluginStats> {
        self.inner
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(PluginStats::new(name)))
            .clone()
    }

    /// The file that should serve for `entry`: an activated upload that replaced this
    /// very configured file, else the configured file.
    fn wanted_file(&self, entry: &PluginEntry) -> (PathBuf, Source) {
        let Some(versions) = &self.inner.versions else {
            return (entry.path.clone(), Source::Configured);
        };
        match versions.activations().remove(&entry.name) {
            Some(active) if active.configured != entry.path => {
                // The configuration now names another file: that ends the activation.
                tracing::info!(plugin = %entry.name, "the configured file changed; the uploaded version no longer serves");
                if let Err(error) = versions.set_activation(&entry.name, None) {
                    tracing::warn!(plugin = %entry.name, %error, "cannot record the end of the activation");
                }
                (entry.path.clone(), Source::Configured)
            }
            Some(active) => {
                let file = versions.file(&entry.name, &active.hash);
                if file.is_file() {
                    (file, Source::Uploaded)
                } else {
                    tracing::error!(plugin = %entry.name, file = %file.display(), "the activated upload is missing; the configured file serves");
                    (entry.path.clone(), Source::Configured)
                }
            }
            _ => (entry.path.clone(), Source::Configured),
        }
    }

    /// The set for `entries`, reusing the versions of `current` that would load the same
    /// way (same configuration, same file content), so that their instances stay warm.
    /// Returns it with the names of the plugins that were loaded anew.
    fn build_set(
        &self,
        entries: &[(PluginEntry, PluginKind)],
        current: &PluginSet,
    ) -> Result<(PluginSet, Vec<String>), PluginError> {
        let mut set = PluginSet::default();
        let mut loaded = Vec::new();
        for (entry, kind) in entries {
            let (file, source) = self.wanted_file(entry);
            let reusable = current.find(&entry.name).filter(|old| {
                old.entry == *entry
                    && old.kind == *kind
                    && old.path == file
                    && host::file_hash(&file).ok().as_deref() == Some(old.hash.as_str())
            });
            let plugin = match reusable {
                Some(old) => old.clone(),
                None => {
                    let plugin = match self.load(entry, *kind, &file, source) {
                        Err(error) if source == Source::Uploaded => {
                            tracing::error!(plugin = %entry.name, %error, "the activated upload does not load; the configured file serves");
                            self.load(entry, *kind, &entry.path, Source::Configured)?
                        }
                        other => other?,
                    };
                    loaded.push(entry.name.clone());
                    plugin
                }
            };
            match kind {
                PluginKind::Transform => set.transforms.push(plugin),
                PluginKind::Router => set.router = Some(plugin),
            }
        }
        Ok((set, loaded))
    }

    /// Loads one version of a plugin from `file` and proves it can start: instantiates
    /// it once and runs `init` with its configuration.
    fn load(
        &self,
        entry: &PluginEntry,
        kind: PluginKind,
        file: &Path,
        source: Source,
    ) -> Result<Arc<LoadedPlugin>, PluginError> {
        let host = &self.inner.host;
        let (prepared, hash) = host.load(file)?;
        if prepared.kind() != kind {
            return Err(PluginError::WrongKind {
                name: entry.name.clone(),
                path: file.to_path_buf(),
                expected: kind,
                actual: prepared.kind(),
            });
        }
        let config = entry
            .config
            .iter()
            .filter_map(|(key, value)| Some((key.clone(), plugin_config_value(value)?)))
            .collect();
        let plugin = Arc::new(LoadedPlugin {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            name: entry.name.clone(),
            kind,
            path: file.to_path_buf(),
            entry: entry.clone(),
            source,
            hash,
            loaded_at_ms: crate::message::now_ms(),
            prepared,
            config,
            stats: self.stats_for(&entry.name),
            scope: entry
                .topics
                .iter()
                .filter_map(|filter| crate::topic::TopicFilter::parse(filter).ok())
                .collect(),
        });
        // Loading happens off the request path (start, reloads, uploads); nothing `init`
        // can call waits on I/O, so the call finishes on this thread.
        futures_executor::block_on(worker::Instance::new(host, &plugin)).map_err(|reason| {
            PluginError::Init {
                name: entry.name.clone(),
                reason,
            }
        })?;
        Ok(plugin)
    }

    /// Makes `next` the active set, and lets the idle instance sets drop their instances
    /// of versions no longer in it (they would otherwise hold pool slots and memory until
    /// their set is lent again).
    fn install(&self, next: PluginSet) {
        self.inner.set.store(Arc::new(next));
        let current = self.current();
        for instances in self
            .inner
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter_mut()
        {
            instances.retain(|id, _| current.contains(*id));
        }
    }

    fn lock_changes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner
            .changing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Reloads every plugin whose configured file is `path` (and that no upload
    /// replaces); the old version keeps serving the batches that already started, and
    /// keeps serving everything if the new one fails.
    pub fn reload(&self, path: &Path) -> Result<Vec<String>, PluginError> {
        let _changing = self.lock_changes();
        let mut next = PluginSet {
            transforms: self.current().transforms.clone(),
            router: self.current().router.clone(),
        };
        let mut reloaded = Vec::new();
        for slot in next.slots() {
            if slot.source != Source::Configured || absolute(&slot.path) != absolute(path) {
                continue;
            }
            let loaded = self.load(&slot.entry, slot.kind, &slot.entry.path, Source::Configured)?;
            if loaded.hash == slot.hash {
                continue;
            }
            tracing::info!(plugin = %loaded.name, old = %&slot.hash[..12], new = %&loaded.hash[..12], "plugin reloaded");
            reloaded.push(loaded.name.clone());
            *slot = loaded;
        }
        if !reloaded.is_empty() {
            self.install(next);
        }
        Ok(reloaded)
    }

    /// Replaces the chain with the plugins `entries` (a configuration reload): every new
    /// or changed plugin is loaded and initialised first; if any fails, nothing changes.
    /// Returns the names of the plugins loaded anew and of those removed.
    pub fn reconfigure(
        &self,
        entries: &[(PluginEntry, PluginKind)],
    ) -> Result<(Vec<String>, Vec<String>), PluginError> {
        if entries.len() > self.inner.capacity {
            return Err(PluginError::Engine(format!(
                "{} plugins configured, but the instance pool was sized at start for at most \
                 {}: restart the gateway to run this many",
                entries.len(),
                self.inner.capacity
            )));
        }
        let _changing = self.lock_changes();
        let current = self.current();
        let (next, loaded) = self.build_set(entries, &current)?;
        let removed: Vec<String> = current
            .all()
            .filter(|old| next.find(&old.name).is_none())
            .map(|old| old.name.clone())
            .collect();
        let changed = current.all().map(|p| p.id).ne(next.all().map(|p| p.id));
        if changed {
            self.install(next);
        }
        Ok((loaded, removed))
    }

    /// The configured files of the active plugins (those the file watcher reloads).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.current()
            .all()
            .map(|plugin| plugin.entry.path.clone())
            .collect()
    }

    /// The active plugin set.
    pub fn current(&self) -> Arc<PluginSet> {
        self.inner.set.load_full()
    }

    /// Whether a transform of the active set is scoped to `topic` by one of its filters.
    pub fn scoped_to(&self, topic: &str) -> bool {
        self.current()
            .transforms
            .iter()
            .any(|plugin| plugin.scoped_to(topic))
    }

    /// Runs the chain from the plugin named `start` on (the whole chain when it is
    /// `None` or names no active plugin): a dead letter's message, stored as it entered
    /// the plugin that failed, is not transformed twice by the plugins before it.
    pub async fn run_from(&self, batch: Vec<Message>, start: Option<String>) -> Vec<InputResult> {
        use futures_util::FutureExt as _;

        let count = batch.len();
        if self.inner.stopped.load(Ordering::Relaxed) {
            return unavailable(count, batch);
        }
        // The batch runs on the set active now; a reload shows in the next batch, when
        // instances of versions no longer active are dropped.
        let set = self.current();
        if set.all().next().is_none() {
            return batch.into_iter().map(InputResult::passed).collect();
        }
        let mut instances = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        instances.retain(|id, _| set.contains(*id));
        let run = worker::run_chain(
            &self.inner.host,
            &set,
            &mut instances,
            batch,
            start.as_deref(),
        );
        match std::panic::AssertUnwindSafe(run).catch_unwind().await {
            Ok(results) => {
                self.inner
                    .idle
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(instances);
                results
            }
            Err(_) => {
                // A bug on the host side, not in a plugin: fail this batch, and let its
                // instances go (the next batch builds new ones).
                tracing::error!(
                    "the plugin host panicked; the batch fails and its instances are rebuilt"
                );
                (0..count).map(|_| InputResult::default()).collect()
            }
        }
    }

    /// Refuses batches from now on (the gateway is stopping), and lets the idle
    /// instances go.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::Relaxed);
        self.inner
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// `path` made absolute, for comparing file names.
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
