//! The wasmtime host: runs the configured plugin chain over message batches.
//!
//! - [`host`]: the one engine (pooling allocator, epoch interruption), the linker with the
//!   host imports, the compiled-component cache, import checks at load.
//! - [`worker`]: worker threads, each owning one store per plugin, reused across batches
//!   and rebuilt after a trap, a timeout or a memory blow-up.
//! - [`reload`]: watches plugin files and swaps in new versions; in-flight batches finish
//!   on the version they started with.
//!
//! Plugins run with synchronous calls on dedicated threads, never on the async runtime;
//! the runtime hands them batches over a bounded channel, which is also where
//! backpressure starts when the plugins are the bottleneck.

pub mod bindings;
pub mod host;
pub mod offline;
pub mod reload;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::{Config, PluginEntry, plugin_config_value};
use crate::message::Message;
use crate::plugin::host::{Host, Limits, PluginStats, Prepared};
use crate::route::Destination;

/// Batches waiting for a worker, per worker: enough to keep workers busy, small enough
/// that a slow plugin pushes back on ingress quickly.
const QUEUED_BATCHES_PER_WORKER: usize = 4;

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
        "plugin {path} is refused: it imports {}, which plugins may not use (allowed: \
         sluice:plugin/host and the parts of WASI that Rust's standard library needs, \
         linked without files, network, environment or clocks)",
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

/// One loaded version of one plugin.
pub struct LoadedPlugin {
    /// Unique per load, so workers can tell versions apart.
    pub id: u64,
    /// The configured name.
    pub name: String,
    /// The component file.
    pub path: PathBuf,
    /// SHA-256 of the component file, hex.
    pub hash: String,
    /// The pre-instantiated component.
    pub prepared: Prepared,
    /// The key/value pairs handed to `init`.
    pub config: Vec<(String, String)>,
    /// Counters and the name used in logs; shared across versions of the same plugin.
    pub stats: Arc<PluginStats>,
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

    fn contains(&self, id: u64) -> bool {
        self.all().any(|plugin| plugin.id == id)
    }
}

/// Why a part of an input message did not go on to routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The plugin returned `fail` for it.
    Refused,
    /// The plugin trapped (a panic, an illegal operation).
    Trap,
    /// The call ran over its time limit.
    Timeout,
    /// The instance ran over its memory limit.
    MemoryLimit,
    /// The plugin returned the wrong number of outcomes.
    BadOutput,
    /// No instance of the plugin could be created.
    Unavailable,
}

impl FailureKind {
    /// A stable code for API responses and dead-letter records.
    pub fn code(self) -> &'static str {
        match self {
            FailureKind::Refused => "plugin_refused",
            FailureKind::Trap => "plugin_trap",
            FailureKind::Timeout => "plugin_timeout",
            FailureKind::MemoryLimit => "plugin_memory_limit",
            FailureKind::BadOutput => "plugin_bad_output",
            FailureKind::Unavailable => "plugin_unavailable",
        }
    }
}

/// A message (or a part of one) that failed in a plugin.
pub struct PartFailure {
    /// The message as it entered the failing plugin.
    pub message: Message,
    /// The failing plugin.
    pub plugin: String,
    /// What went wrong.
    pub kind: FailureKind,
    /// In words.
    pub reason: String,
}

/// A router plugin's answer for one message.
pub struct RouterChoice {
    /// The router plugin's name.
    pub plugin: String,
    /// Its destination; `None` keeps the built-in decision.
    pub destination: Option<Destination>,
    /// Its reason.
    pub reason: String,
}

/// A message that made it through the transforms.
pub struct Output {
    /// The transformed message.
    pub message: Message,
    /// The router plugin's choice, if there is a router.
    pub router: Option<RouterChoice>,
}

/// What the chain made of one input message.
#[derive(Default)]
pub struct InputResult {
    /// Messages to route (several after a split).
    pub outputs: Vec<Output>,
    /// Parts discarded by a plugin.
    pub dropped: usize,
    /// Parts that failed.
    pub failures: Vec<PartFailure>,
}

/// One batch waiting for a worker.
struct Job {
    batch: Vec<Message>,
    /// Run the chain from this plugin on (a dead letter's redrive); `None`: all of it.
    start: Option<String>,
    reply: tokio::sync::oneshot::Sender<Vec<InputResult>>,
}

struct Inner {
    host: Host,
    set: ArcSwap<PluginSet>,
    /// The configured plugins, for reloads.
    entries: Vec<(PluginEntry, PluginKind)>,
    jobs: async_channel::Sender<Job>,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    next_id: AtomicU64,
}

/// The running plugin host; cheap to clone.
#[derive(Clone)]
pub struct Plugins {
    inner: Arc<Inner>,
}

impl Plugins {
    /// Loads every configured plugin (compiling, checking imports, running `init` once)
    /// and starts the worker threads.
    pub fn start(config: &Config) -> Result<Plugins, PluginError> {
        let entries: Vec<(PluginEntry, PluginKind)> = config
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
            .collect();
        Plugins::with_entries(config, entries)
    }

    /// A host running just one plugin file, of whichever kind it is (for `sluice plugin
    /// run`).
    pub fn single(
        config: &Config,
        path: &Path,
        plugin_config: Vec<(String, String)>,
    ) -> Result<Plugins, PluginError> {
        let host = Plugins::make_host(config, 1)?;
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
        };
        Plugins::with_host(host, vec![(entry, kind)], 1)
    }

    fn make_host(config: &Config, workers: usize) -> Result<Host, PluginError> {
        let limits = Limits {
            call_timeout: Duration::from_millis(config.plugins.call_timeout_ms),
            memory_bytes: (config.plugins.memory_limit_mib as usize) << 20,
        };
        let plugins = config.plugins.transform.len() + usize::from(config.plugins.router.is_some());
        // Each worker holds one instance per plugin, twice over during a reload, plus one
        // for validating a new version.
        let instances = (workers * plugins.max(1) * 2 + 4) as u32;
        Host::new(limits, config.cache_dir(), instances)
    }

    fn with_entries(
        config: &Config,
        entries: Vec<(PluginEntry, PluginKind)>,
    ) -> Result<Plugins, PluginError> {
        let workers = config.plugins.workers.max(1);
        let host = Plugins::make_host(config, workers)?;
        Plugins::with_host(host, entries, workers)
    }

    fn with_host(
        host: Host,
        entries: Vec<(PluginEntry, PluginKind)>,
        workers: usize,
    ) -> Result<Plugins, PluginError> {
        let (jobs, queue) = async_channel::bounded(workers * QUEUED_BATCHES_PER_WORKER);
        let inner = Arc::new(Inner {
            host,
            set: ArcSwap::from_pointee(PluginSet::default()),
            entries,
            jobs,
            workers: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        });
        let plugins = Plugins { inner };
        let mut set = PluginSet::default();
        for (entry, kind) in &plugins.inner.entries {
            let loaded = plugins.load_entry(entry, *kind, None)?;
            match kind {
                PluginKind::Transform => set.transforms.push(loaded),
                PluginKind::Router => set.router = Some(loaded),
            }
        }
        for plugin in set.all() {
            tracing::info!(plugin = %plugin.name, kind = %plugin.prepared.kind(), hash = %&plugin.hash[..12], path = %plugin.path.display(), "plugin loaded");
        }
        plugins.inner.set.store(Arc::new(set));
        let mut handles = plugins
            .inner
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for index in 0..workers {
            let inner = plugins.inner.clone();
            let queue = queue.clone();
            let handle = std::thread::Builder::new()
                .name(format!("sluice-plugin-{index}"))
                .spawn(move || worker::run(&inner.host, &inner.set, queue))
                .map_err(|e| PluginError::Engine(format!("cannot start a plugin worker: {e}")))?;
            handles.push(handle);
        }
        drop(handles);
        Ok(plugins)
    }

    /// Loads one version of a configured plugin and proves it can start: instantiates
    /// it once and runs `init` with its configuration.
    fn load_entry(
        &self,
        entry: &PluginEntry,
        kind: PluginKind,
        stats: Option<Arc<PluginStats>>,
    ) -> Result<Arc<LoadedPlugin>, PluginError> {
        let host = &self.inner.host;
        let (prepared, hash) = host.load(&entry.path)?;
        if prepared.kind() != kind {
            return Err(PluginError::WrongKind {
                name: entry.name.clone(),
                path: entry.path.clone(),
                expected: kind,
                actual: prepared.kind(),
            });
        }
        let config = entry
            .config
            .iter()
            .filter_map(|(key, value)| Some((key.clone(), plugin_config_value(value)?)))
            .collect();
        let stats = stats.unwrap_or_else(|| {
            Arc::new(PluginStats {
                name: entry.name.clone(),
                ..PluginStats::default()
            })
        });
        let plugin = Arc::new(LoadedPlugin {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            name: entry.name.clone(),
            path: entry.path.clone(),
            hash,
            prepared,
            config,
            stats,
        });
        worker::Instance::new(host, &plugin).map_err(|reason| PluginError::Init {
            name: entry.name.clone(),
            reason,
        })?;
        Ok(plugin)
    }

    /// Reloads every plugin whose file is `path`; the old version keeps serving the
    /// batches that already started, and keeps serving everything if the new one fails.
    pub fn reload(&self, path: &Path) -> Result<Vec<String>, PluginError> {
        let current = self.inner.set.load_full();
        let mut next = PluginSet {
            transforms: current.transforms.clone(),
            router: current.router.clone(),
        };
        let mut reloaded = Vec::new();
        let slots = next.transforms.iter_mut().chain(next.router.as_mut());
        for slot in slots.filter(|plugin| plugin.path == path) {
            let Some((entry, kind)) = self.inner.entries.iter().find(|(e, _)| e.name == slot.name)
            else {
                continue;
            };
            let loaded = self.load_entry(entry, *kind, Some(slot.stats.clone()))?;
            if loaded.hash == slot.hash {
                continue;
            }
            tracing::info!(plugin = %loaded.name, old = %&slot.hash[..12], new = %&loaded.hash[..12], "plugin reloaded");
            reloaded.push(loaded.name.clone());
            *slot = loaded;
        }
        if !reloaded.is_empty() {
            self.inner.set.store(Arc::new(next));
        }
        Ok(reloaded)
    }

    /// The files of the configured plugins.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.inner
            .entries
            .iter()
            .map(|(entry, _)| entry.path.clone())
            .collect()
    }

    /// The active plugin set.
    pub fn current(&self) -> Arc<PluginSet> {
        self.inner.set.load_full()
    }

    /// Runs the chain over a batch, returning one result per input, in order.
    pub async fn run(&self, batch: Vec<Message>) -> Vec<InputResult> {
        self.run_from(batch, None).await
    }

    /// Runs the chain from the plugin named `start` on (the whole chain when it is
    /// `None` or names no active plugin): a dead letter's message, stored as it entered
    /// the plugin that failed, is not transformed twice by the plugins before it.
    pub async fn run_from(&self, batch: Vec<Message>, start: Option<String>) -> Vec<InputResult> {
        if self.inner.entries.is_empty() {
            return batch.into_iter().map(InputResult::passed).collect();
        }
        let count = batch.len();
        let (reply, answer) = tokio::sync::oneshot::channel();
        let sent = self
            .inner
            .jobs
            .send(Job {
                batch,
                start,
                reply,
            })
            .await;
        match sent {
            Ok(()) => match answer.await {
                Ok(results) => results,
                Err(_) => unavailable(count, Vec::new()),
            },
            Err(async_channel::SendError(job)) => unavailable(count, job.batch),
        }
    }

    /// Stops the workers after the queued batches, and waits for them.
    pub fn stop(&self) {
        self.inner.jobs.close();
        let handles =
            std::mem::take(&mut *self.inner.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for handle in handles {
            let _ = handle.join();
        }
    }
}

impl InputResult {
    /// A message that no plugin touched.
    fn passed(message: Message) -> InputResult {
        InputResult {
            outputs: vec![Output {
                message,
                router: None,
            }],
            ..InputResult::default()
        }
    }
}

/// Results for a batch no worker could take (the host is stopping).
fn unavailable(count: usize, batch: Vec<Message>) -> Vec<InputResult> {
    let mut results: Vec<InputResult> = (0..count).map(|_| InputResult::default()).collect();
    for (result, message) in results.iter_mut().zip(batch) {
        result.failures.push(PartFailure {
            message,
            plugin: String::new(),
            kind: FailureKind::Unavailable,
            reason: "the plugin host is shutting down".to_string(),
        });
    }
    results
}
