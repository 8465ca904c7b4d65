//! The state of one plugin instance's store: its WASI context (as the host's import rules
//! set it up), its memory limit, and the host imports it calls (`log`, `counter-add`).

use std::sync::Arc;

use wasmtime::ResourceLimiter;
use wasmtime::Store;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::plugin::stats::PluginStats;
use crate::wit::sluice::plugin::{host, types};

/// The state of one plugin instance's store.
pub struct HostState {
    /// The WASI context (see the host's import rules).
    wasi: WasiCtx,
    /// WASI's resource handles (streams and the like).
    table: ResourceTable,
    /// Enforces the instance's memory limit and remembers that it was hit.
    limiter: MemoryLimiter,
    /// Where `log` and `counter-add` go.
    stats: Arc<PluginStats>,
}

impl HostState {
    /// The state of a new instance of the plugin counted in `stats`, with `max_bytes` of
    /// memory at most.
    pub fn new(wasi: WasiCtx, stats: Arc<PluginStats>, max_bytes: usize) -> HostState {
        HostState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                max_bytes,
                hit: false,
            },
            stats,
        }
    }

    /// The limiter a store installs (`Store::limiter`).
    pub fn limiter(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.limiter
    }
}

/// The per-instance memory limit. Wasmtime's `StoreLimits` enforces a limit too, but
/// cannot tell afterwards whether a trap came from it; the gateway must report
/// "memory limit" precisely, so this limiter records the fact.
struct MemoryLimiter {
    /// Most bytes of linear memory (and table elements) an instance may have.
    max_bytes: usize,
    /// Set when a growth was refused; read after a failed call.
    hit: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit = true;
            return Err(wasmtime::format_err!(
                "plugin memory limit of {} MiB reached",
                self.max_bytes >> 20
            ));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl host::Host for HostState {
    fn log(&mut self, level: host::Level, message: String, fields: Vec<(String, String)>) {
        let plugin = self.stats.name.as_str();
        let fields = FieldList(&fields);
        match level {
            host::Level::Trace => tracing::trace!(plugin, %fields, "{message}"),
            host::Level::Debug => tracing::debug!(plugin, %fields, "{message}"),
            host::Level::Info => tracing::info!(plugin, %fields, "{message}"),
            host::Level::Warn => tracing::warn!(plugin, %fields, "{message}"),
            host::Level::Error => tracing::error!(plugin, %fields, "{message}"),
        }
    }

    fn counter_add(&mut self, name: String, delta: u64) {
        self.stats.add_counter(&name, delta);
    }
}

/// A plugin's log fields as `k=v k=v`.
struct FieldList<'a>(&'a [(String, String)]);

impl std::fmt::Display for FieldList<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (index, (key, value)) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{key}={value:?}")?;
        }
        Ok(())
    }
}

/// Whether the store's memory limit was hit during the last call.
pub fn memory_limit_hit(store: &Store<HostState>) -> bool {
    store.data().limiter.hit
}
