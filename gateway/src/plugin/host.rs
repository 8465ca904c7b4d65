//! The engine and everything built once per process: the linker with the host imports,
//! the epoch ticker, the compiled-component cache, and loading with import checks. An
//! instance's store holds a [`HostState`] ([`crate::plugin::state`]); a plugin's counters
//! are its [`PluginStats`] ([`crate::plugin::stats`]).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store};

use crate::plugin::output::PluginOutput;
use crate::plugin::state::HostState;
use crate::plugin::stats::PluginStats;
use crate::plugin::{PluginError, PluginKind};
use crate::wit::router::RouterPre;
use crate::wit::transform::TransformPre;

/// How often the ticker thread advances the engine's epoch. Call time limits are
/// rounded up to whole ticks, so this is their resolution.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// What the host does with each WASI interface a plugin imports, by name prefix, with
/// the reason in words (`sluice plugin check` prints it). The language runtimes plugins
/// are built with import much of WASI whether the plugin uses it or not (CPython under
/// componentize-py: clocks, filesystem, stdio and every `wasi:sockets` interface;
/// SpiderMonkey under componentize-js: clocks, filesystem, stdio), so the host links
/// what is harmless and refuses at load only what would reach outside:
///
/// - clocks: the real wall clock and monotonic clock; reading the time is harmless. A
///   sleep counts against the call's time limit (the call is cut off at it), and a
///   message's time is still its `received-at-ms`;
/// - random: as for Rust's hash maps;
/// - stdin closed, environment and arguments empty, filesystem without a single
///   preopened directory (nothing to open);
/// - stdout and stderr: into the gateway's log, tagged with the plugin's name, bounded
///   ([`crate::plugin::output`]);
/// - sockets: linked with no network at all: every bind, connect and name lookup fails
///   with `access-denied` (CPython links them into every component);
/// - everything else (`wasi:http`, …): refused when the plugin loads, naming the import.
const IMPORT_RULES: &[(&str, &str)] = &[
    ("sluice:plugin/host@0.1.", "the gateway's log and counters"),
    ("sluice:plugin/types@0.1.", "the message types"),
    (
        "wasi:clocks/",
        "linked: real time; sleeping counts against the call's time limit",
    ),
    ("wasi:random/", "linked: random numbers"),
    (
        "wasi:cli/environment@0.2.",
        "linked: no variables, no arguments",
    ),
    ("wasi:cli/exit@0.2.", "linked: exiting fails the call"),
    ("wasi:cli/stdin@0.2.", "linked: closed"),
    (
        "wasi:cli/stdout@0.2.",
        "linked: into the gateway's log, with the plugin's name",
    ),
    (
        "wasi:cli/stderr@0.2.",
        "linked: into the gateway's log, with the plugin's name",
    ),
    ("wasi:cli/terminal-", "linked: not a terminal"),
    ("wasi:io/", "linked: streams and polling"),
    (
        "wasi:filesystem/",
        "linked: no preopened directory, so nothing to open",
    ),
    (
        "wasi:sockets/",
        "linked without a network: every socket operation fails with access-denied",
    ),
];

/// What the host does with one import: `Ok` with what it gets, or `Err` with why it is
/// refused.
pub fn import_rule(name: &str) -> Result<&'static str, &'static str> {
    IMPORT_RULES
        .iter()
        .find(|(prefix, _)| name.starts_with(prefix))
        .map(|(_, what)| *what)
        .ok_or("refused: plugins may not reach outside the gateway (no HTTP, no other host interfaces)")
}

/// Components at least this large get progress output while they compile.
const LARGE_COMPONENT_BYTES: usize = 2 << 20;

/// A component's identity: SHA-256 of its bytes, hex.
pub fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The [`content_hash`] of a file.
pub fn file_hash(path: &Path) -> std::io::Result<String> {
    Ok(content_hash(&std::fs::read(path)?))
}

/// Limits applied to every plugin instance.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time limit of one call.
    pub call_timeout: Duration,
    /// Memory limit of one instance, in bytes.
    pub memory_bytes: usize,
}

impl Limits {
    /// The call time limit in epoch ticks, rounded up, plus one because the current
    /// tick may be almost over when the call starts.
    pub fn deadline_ticks(&self) -> u64 {
        let tick = EPOCH_TICK.as_micros();
        (self.call_timeout.as_micros().div_ceil(tick) as u64) + 1
    }
}

/// The engine and what is built once with it.
pub struct Host {
    /// One engine for every plugin, with the pooling allocator and epoch interruption.
    engine: Engine,
    /// WASI plus the `sluice:plugin/host` imports.
    linker: Linker<HostState>,
    /// Compiled components, keyed by content hash and engine compatibility.
    cache_dir: PathBuf,
    /// Limits for every instance.
    limits: Limits,
    /// Advances the epoch; stopped and joined on drop.
    ticker: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

/// A component that passed the checks, ready to instantiate.
pub enum Prepared {
    /// A transform plugin.
    Transform(TransformPre<HostState>),
    /// A router plugin.
    Router(RouterPre<HostState>),
}

impl Prepared {
    /// Which world the component targets.
    pub fn kind(&self) -> PluginKind {
        match self {
            Prepared::Transform(_) => PluginKind::Transform,
            Prepared::Router(_) => PluginKind::Router,
        }
    }
}

/// What `sluice plugin check` reports about a component.
#[derive(Debug)]
pub struct Inspection {
    /// The world it targets, or why the gateway refuses it.
    pub verdict: Result<PluginKind, PluginError>,
    /// Every import, with what the host does with it, or why it is refused.
    pub imports: Vec<(String, Result<&'static str, &'static str>)>,
    /// Every export.
    pub exports: Vec<String>,
}

impl Host {
    /// Builds the engine, the linker and the epoch ticker.
    pub fn new(
        limits: Limits,
        cache_dir: PathBuf,
        max_instances: u32,
    ) -> Result<Host, PluginError> {
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        pool.total_component_instances(max_instances)
            .total_core_instances(max_instances.saturating_mul(8))
            .total_memories(max_instances.saturating_mul(4))
            .total_tables(max_instances.saturating_mul(8))
            .max_memory_size(limits.memory_bytes.saturating_mul(2).max(16 << 20))
            .total_stacks(max_instances);
        let mut config = wasmtime::Config::new();
        config
            .epoch_interruption(true)
            .allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool))
            .max_wasm_stack(1 << 20);
        let engine = Engine::new(&config).map_err(|e| PluginError::Engine(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| PluginError::Engine(e.to_string()))?;
        crate::wit::transform::Transform::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| {
            state
        })
        .map_err(|e| PluginError::Engine(e.to_string()))?;

        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let engine = engine.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("sluice-epoch".to_string())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| PluginError::Engine(format!("cannot start the epoch ticker: {e}")))?
        };
        Ok(Host {
            engine,
            linker,
            cache_dir,
            limits,
            ticker: Some((stop, ticker)),
        })
    }

    /// The limits every instance gets.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A fresh store for one instance of a plugin.
    pub fn new_store(&self, stats: Arc<PluginStats>) -> Store<HostState> {
        let wasi = wasmtime_wasi::WasiCtx::builder()
            .stdout(PluginOutput::new(stats.clone(), "stdout"))
            .stderr(PluginOutput::new(stats.clone(), "stderr"))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = HostState::new(wasi, stats, self.limits.memory_bytes);
        let mut store = Store::new(&self.engine, state);
        store.limiter(HostState::limiter);
        store.set_epoch_deadline(self.limits.deadline_ticks());
        store
    }

    /// Reads a component file, compiles it (or loads it from the cache), and checks its
    /// imports and its world. Returns the component's content hash too.
    pub fn load(&self, path: &Path) -> Result<(Prepared, String), PluginError> {
        let (component, hash) = self.read_and_compile(path)?;
        let prepared = self.prepare(&component, path)?;
        Ok((prepared, hash))
    }

    /// Checks a compiled component's imports and world, and pre-instantiates it.
    fn prepare(&self, component: &Component, path: &Path) -> Result<Prepared, PluginError> {
        let refused: Vec<String> = self
            .imports_of(component)
            .into_iter()
            .filter(|(_, rule)| rule.is_err())
            .map(|(name, _)| name)
            .collect();
        if !refused.is_empty() {
            return Err(PluginError::ForbiddenImports {
                path: path.to_path_buf(),
                imports: refused,
            });
        }
        let pre = self
            .linker
            .instantiate_pre(component)
            .map_err(|e| PluginError::Invalid {
                path: path.to_path_buf(),
                reason: format!("cannot link: {e:#}"),
            })?;
        if let Ok(transform) = TransformPre::new(pre.clone()) {
            return Ok(Prepared::Transform(transform));
        }
        if let Ok(router) = RouterPre::new(pre) {
            return Ok(Prepared::Router(router));
        }
        Err(PluginError::Invalid {
            path: path.to_path_buf(),
            reason: "exports neither `sluice:plugin/transformer@0.1.0` (transform world) nor \
                     `sluice:plugin/routing@0.1.0` (router world)"
                .to_string(),
        })
    }

    /// Lists a component's imports and exports and whether the gateway accepts it, for
    /// `sluice plugin check`.
    pub fn inspect(&self, path: &Path) -> Result<Inspection, PluginError> {
        let (component, _) = self.read_and_compile(path)?;
        Ok(Inspection {
            verdict: self
                .prepare(&component, path)
                .map(|prepared| prepared.kind()),
            imports: self.imports_of(&component),
            exports: self.exports_of(&component),
        })
    }

    /// Every import of a component, with what the host does with it ([`import_rule`]).
    fn imports_of(
        &self,
        component: &Component,
    ) -> Vec<(String, Result<&'static str, &'static str>)> {
        let ty = component.component_type();
        ty.imports(&self.engine)
            .map(|(name, _)| (name.to_string(), import_rule(name)))
            .collect()
    }

    /// Every export of a component, described.
    fn exports_of(&self, component: &Component) -> Vec<String> {
        let ty = component.component_type();
        ty.exports(&self.engine)
            .map(|(name, item)| match item.ty {
                ComponentItem::ComponentInstance(_) => format!("{name} (interface)"),
                ComponentItem::ComponentFunc(_) => format!("{name} (function)"),
                _ => name.to_string(),
            })
            .collect()
    }

    /// Reads a component file and compiles it; returns it with its content hash.
    fn read_and_compile(&self, path: &Path) -> Result<(Component, String), PluginError> {
        let bytes = std::fs::read(path).map_err(|e| PluginError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let hash = content_hash(&bytes);
        let component = self.compile(&bytes, &hash, path)?;
        Ok((component, hash))
    }

    /// Compiles `bytes`, going through the on-disk cache.
    fn compile(&self, bytes: &[u8], hash: &str, path: &Path) -> Result<Component, PluginError> {
        let mut hasher = std::hash::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        let cached = self
            .cache_dir
            .join(format!("{hash}-{:016x}.cwasm", hasher.finish()));
        if cached.is_file() {
            // SAFETY: `deserialize_file` trusts its input to be a component compiled by
            // Wasmtime. Only the gateway writes this directory, always from
            // `Component::serialize` of a component it compiled itself, and the file name
            // binds the content hash and this engine's compatibility hash.
            #[allow(unsafe_code)]
            let loaded = unsafe { Component::deserialize_file(&self.engine, &cached) };
            match loaded {
                Ok(component) => return Ok(component),
                Err(error) => {
                    tracing::warn!(%error, cache = %cached.display(), "ignoring an unusable cache entry");
                }
            }
        }
        // Python and JavaScript components (12–18 MB) take seconds to compile: say so.
        let large = bytes.len() >= LARGE_COMPONENT_BYTES;
        let progress = large.then(|| {
            crate::progress::Progress::start(format!(
                "compiling plugin {} ({:.1} MB) for the first time; it is cached afterwards",
                path.display(),
                bytes.len() as f64 / 1e6
            ))
        });
        let component = Component::new(&self.engine, bytes).map_err(|e| PluginError::Invalid {
            path: path.to_path_buf(),
            reason: format!("not a valid WebAssembly component: {e:#}"),
        })?;
        if let Some(progress) = progress {
            progress.done(&format!("compiled plugin {}", path.display()));
        }
        if let Err(error) = self.store_in_cache(&component, &cached) {
            tracing::warn!(%error, cache = %cached.display(), "cannot cache a compiled plugin");
        }
        Ok(component)
    }

    fn store_in_cache(&self, component: &Component, cached: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.cache_dir)?;
        let serialized = component.serialize().map_err(|e| anyhow::anyhow!("{e}"))?;
        let temporary = cached.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&temporary, serialized)?;
        std::fs::rename(&temporary, cached)?;
        Ok(())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some((stop, ticker)) = self.ticker.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = ticker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_round_up_to_whole_ticks() {
        let limits = |ms| Limits {
            call_timeout: Duration::from_millis(ms),
            memory_bytes: 0,
        };
        assert_eq!(limits(5).deadline_ticks(), 2);
        assert_eq!(limits(6).deadline_ticks(), 3);
        assert_eq!(limits(200).deadline_ticks(), 41);
    }
}
