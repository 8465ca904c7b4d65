//! Running the chain: instances (one store per plugin), reused across batches, and the
//! calls with their failure handling.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use wasmtime::Store;

use crate::message::Message;
use crate::plugin::host::{Host, Prepared};
use crate::plugin::state::{HostState, memory_limit_hit};
use crate::plugin::{
    FailureKind, InputResult, LoadedPlugin, Output, PartFailure, PluginSet, RouterChoice,
};
use crate::route::Destination;
use crate::wit::router::Router;
use crate::wit::transform::Transform;
use crate::wit::{Decision, Destination as WitDestination, Outcome};

/// One instantiated plugin with its own store.
pub struct Instance {
    /// The plugin's store: its memory, limits and host state.
    store: Store<HostState>,
    /// The plugin's exports.
    bindings: Bindings,
}

/// A plugin's exports, by world.
enum Bindings {
    /// A transform plugin.
    Transform(Transform),
    /// A router plugin.
    Router(Router),
}

/// What one call returned, by world.
enum Results {
    /// A transform's outcome per message.
    Outcomes(Vec<Outcome>),
    /// A router's decision per message.
    Decisions(Vec<Decision>),
}

impl Results {
    fn len(&self) -> usize {
        match self {
            Results::Outcomes(outcomes) => outcomes.len(),
            Results::Decisions(decisions) => decisions.len(),
        }
    }
}

impl Instance {
    /// Instantiates `plugin` in a fresh store and runs its `init`.
    pub async fn new(host: &Host, plugin: &LoadedPlugin) -> Result<Instance, String> {
        let mut store = host.new_store(plugin.stats.clone());
        let instantiated = |e: wasmtime::Error| format!("{e:#}");
        let bindings = match &plugin.prepared {
            Prepared::Transform(pre) => Bindings::Transform(
                pre.instantiate_async(&mut store)
                    .await
                    .map_err(instantiated)?,
            ),
            Prepared::Router(pre) => Bindings::Router(
                pre.instantiate_async(&mut store)
                    .await
                    .map_err(instantiated)?,
            ),
        };
        let init = match &bindings {
            Bindings::Transform(b) => {
                let exports = b.sluice_plugin_transformer();
                exports.call_init(&mut store, &plugin.config).await
            }
            Bindings::Router(b) => {
                let exports = b.sluice_plugin_routing();
                exports.call_init(&mut store, &plugin.config).await
            }
        };
        init.map_err(|e| format!("init trapped: {e:#}"))??;
        Ok(Instance { store, bindings })
    }
}

/// Runs every transform, then the router, over one batch; with `start`, from the plugin
/// of that name on (the whole chain if no active plugin has that name).
pub async fn run_chain(
    host: &Host,
    set: &PluginSet,
    instances: &mut HashMap<u64, Instance>,
    batch: Vec<Message>,
    start: Option<&str>,
) -> Vec<InputResult> {
    let mut results: Vec<InputResult> = (0..batch.len()).map(|_| InputResult::default()).collect();
    let mut origins: Vec<usize> = (0..batch.len()).collect();
    let mut messages = batch;
    let skip = start
        .and_then(|name| {
            set.transforms
                .iter()
                .position(|p| p.name == name)
                .or_else(|| {
                    set.router
                        .as_ref()
                        .filter(|router| router.name == name)
                        .map(|_| set.transforms.len())
                })
        })
        .unwrap_or(0);
    for plugin in set.transforms.iter().skip(skip) {
        // Messages outside the plugin's topics go past it, in their place.
        let (inside, inside_origins, outside) = scope(plugin, messages, origins);
        (messages, origins) = (Vec::new(), Vec::new());
        if !inside.is_empty() {
            let called = call(host, plugin, instances, &inside).await;
            match called.and_then(|results| results.outcomes(plugin)) {
                Ok(outcomes) => {
                    (messages, origins) =
                        apply_outcomes(plugin, inside, inside_origins, outcomes, &mut results);
                }
                // The messages it was for fail; the others go on.
                Err((kind, reason)) => {
                    fail_all(plugin, kind, &reason, inside, inside_origins, &mut results);
                }
            }
        }
        (messages, origins) = merge(messages, origins, outside);
    }
    let mut choices: Vec<Option<RouterChoice>> = (0..messages.len()).map(|_| None).collect();
    if let Some(router) = &set.router {
        let (inside, inside_origins, outside) = scope(router, messages, origins);
        let mut decided: Vec<(Message, usize, Option<RouterChoice>)> = Vec::new();
        if !inside.is_empty() {
            let called = call(host, router, instances, &inside).await;
            match called.and_then(|results| results.decisions(router)) {
                Ok(decisions) => {
                    router.stats.metrics.routed.inc_by(decisions.len() as u64);
                    for ((message, origin), decision) in
                        inside.into_iter().zip(inside_origins).zip(decisions)
                    {
                        decided.push((message, origin, Some(choice(&router.name, decision))));
                    }
                }
                Err((kind, reason)) => {
                    fail_all(router, kind, &reason, inside, inside_origins, &mut results);
                }
            }
        }
        // Those outside its topics keep the built-in decision, back in their places.
        let mut all = decided;
        if !outside.is_empty() {
            all.extend(outside.into_iter().map(|(m, o)| (m, o, None)));
            all.sort_by_key(|(_, origin, _)| *origin);
        }
        messages = Vec::with_capacity(all.len());
        origins = Vec::with_capacity(all.len());
        choices = Vec::with_capacity(all.len());
        for (message, origin, choice) in all {
            messages.push(message);
            origins.push(origin);
            choices.push(choice);
        }
    }
    for ((message, origin), router) in messages.into_iter().zip(origins).zip(choices) {
        results[origin].outputs.push(Output { message, router });
    }
    results
}

/// Splits the messages (with their origins) into those `plugin` is for, and the rest
/// (counted as out of its scope).
fn scope(
    plugin: &LoadedPlugin,
    messages: Vec<Message>,
    origins: Vec<usize>,
) -> (Vec<Message>, Vec<usize>, Vec<(Message, usize)>) {
    if messages
        .iter()
        .all(|message| plugin.in_scope(&message.topic))
    {
        return (messages, origins, Vec::new());
    }
    let mut inside = Vec::with_capacity(messages.len());
    let mut inside_origins = Vec::with_capacity(messages.len());
    let mut outside = Vec::new();
    for (message, origin) in messages.into_iter().zip(origins) {
        if plugin.in_scope(&message.topic) {
            inside.push(message);
            inside_origins.push(origin);
        } else {
            outside.push((message, origin));
        }
    }
    plugin
        .stats
        .metrics
        .out_of_scope
        .inc_by(outside.len() as u64);
    (inside, inside_origins, outside)
}

/// The messages a plugin made, and those that went past it, back in arrival order (the
/// parts of a split stay together, in their order).
fn merge(
    mut messages: Vec<Message>,
    mut origins: Vec<usize>,
    outside: Vec<(Message, usize)>,
) -> (Vec<Message>, Vec<usize>) {
    if outside.is_empty() {
        return (messages, origins);
    }
    let mut all: Vec<(Message, usize)> = messages.drain(..).zip(origins.drain(..)).collect();
    all.extend(outside);
    all.sort_by_key(|(_, origin)| *origin);
    all.into_iter().unzip()
}

type CallError = (FailureKind, String);

/// Calls `plugin` with `messages` in its instance (made first if needed), within its
/// time limit; the instance is dropped if the call failed, so that it is made afresh
/// next time.
async fn call(
    host: &Host,
    plugin: &LoadedPlugin,
    instances: &mut HashMap<u64, Instance>,
    messages: &[Message],
) -> Result<Results, CallError> {
    let instance = match instances.entry(plugin.id) {
        Entry::Occupied(entry) => entry.into_mut(),
        Entry::Vacant(entry) => {
            let made = Instance::new(host, plugin).await.map_err(|reason| {
                (
                    FailureKind::Unavailable,
                    format!("plugin `{}` cannot start: {reason}", plugin.name),
                )
            })?;
            entry.insert(made)
        }
    };
    // The instance stays in the map during the call. A call cut short (its future
    // dropped while a plugin waits) leaves nothing behind: the map is the caller's, and
    // `Plugins::run_from` puts it back for the next batch only once the chain ran to its
    // end.
    let Instance { store, bindings } = instance;
    store.set_epoch_deadline(host.limits().deadline_ticks());
    let started = Instant::now();
    // Epoch interruption stops a plugin that computes too long; one that sleeps (a WASI
    // clock's pollable) runs no code meanwhile, so the wall-clock limit cuts it off too.
    // The instance is not reused after either.
    let limit = host.limits().call_timeout + 2 * crate::plugin::host::EPOCH_TICK;
    let results = {
        // Pinned where it is made: the call's future is large, and is not moved again.
        let running = std::pin::pin!(async {
            match bindings {
                Bindings::Transform(exports) => exports
                    .sluice_plugin_transformer()
                    .call_transform(&mut *store, messages)
                    .await
                    .map(Results::Outcomes),
                Bindings::Router(exports) => exports
                    .sluice_plugin_routing()
                    .call_route(&mut *store, messages)
                    .await
                    .map(Results::Decisions),
            }
        });
        within(started, limit, running).await
    };
    plugin.stats.call(messages.len(), started.elapsed());
    let results = match results {
        Some(Ok(results)) if results.len() == messages.len() => return Ok(results),
        Some(Ok(results)) => Err(bad_count(plugin, results.len(), messages.len())),
        Some(Err(error)) => Err(classify(host, store, plugin, error)),
        None => {
            let ms = host.limits().call_timeout.as_millis();
            Err((
                FailureKind::Timeout,
                format!(
                    "plugin `{}` ran over its time limit of {ms} ms",
                    plugin.name
                ),
            ))
        }
    };
    instances.remove(&plugin.id);
    results
}

/// Runs `call` (started at `started`) to its end, or until `limit` has passed since
/// `started` (`None` then). The timer is set only once the call waits (a plugin sleeping
/// on a WASI clock): a call that runs to its end when first polled, as nearly every call
/// does, never touches the runtime's timer (setting and clearing it were about 14% of
/// the host's side of a pass-through call: BENCHMARKS.md, the plugin stage).
async fn within<T>(
    started: Instant,
    limit: Duration,
    mut call: Pin<&mut impl Future<Output = T>>,
) -> Option<T> {
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(done) = call.as_mut().poll(cx) {
            return Poll::Ready(Some(done));
        }
        let deadline = tokio::time::Instant::from_std(started + limit);
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        timer.as_mut().poll(cx).map(|()| None)
    })
    .await
}

impl Results {
    /// A transform's outcomes; an error if `plugin` answered as a router.
    fn outcomes(self, plugin: &LoadedPlugin) -> Result<Vec<Outcome>, CallError> {
        match self {
            Results::Outcomes(outcomes) => Ok(outcomes),
            Results::Decisions(_) => Err(wrong_world(plugin, "transform")),
        }
    }

    /// A router's decisions; an error if `plugin` answered as a transform.
    fn decisions(self, plugin: &LoadedPlugin) -> Result<Vec<Decision>, CallError> {
        match self {
            Results::Decisions(decisions) => Ok(decisions),
            Results::Outcomes(_) => Err(wrong_world(plugin, "router")),
        }
    }
}

fn wrong_world(plugin: &LoadedPlugin, want: &str) -> CallError {
    (
        FailureKind::Unavailable,
        format!("plugin `{}` is not a {want}", plugin.name),
    )
}

fn bad_count(plugin: &LoadedPlugin, got: usize, want: usize) -> CallError {
    (
        FailureKind::BadOutput,
        format!(
            "plugin `{}` returned {got} results for {want} messages",
            plugin.name
        ),
    )
}

/// Says precisely why a call failed.
fn classify(
    host: &Host,
    store: &Store<HostState>,
    plugin: &LoadedPlugin,
    error: wasmtime::Error,
) -> CallError {
    let name = &plugin.name;
    let limits = host.limits();
    if memory_limit_hit(store) {
        let mib = limits.memory_bytes >> 20;
        return (
            FailureKind::MemoryLimit,
            format!("plugin `{name}` ran over its memory limit of {mib} MiB"),
        );
    }
    if matches!(
        error.downcast_ref::<wasmtime::Trap>(),
        Some(wasmtime::Trap::Interrupt)
    ) {
        let ms = limits.call_timeout.as_millis();
        return (
            FailureKind::Timeout,
            format!("plugin `{name}` ran over its time limit of {ms} ms"),
        );
    }
    let detail = match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => error.to_string(),
    };
    tracing::warn!(plugin = %name, error = %format!("{error:?}"), "plugin trapped");
    (
        FailureKind::Trap,
        format!("plugin `{name}` trapped: {detail}"),
    )
}

/// Applies one transform's outcomes, returning the messages that go on.
fn apply_outcomes(
    plugin: &LoadedPlugin,
    inputs: Vec<Message>,
    origins: Vec<usize>,
    outcomes: Vec<Outcome>,
    results: &mut [InputResult],
) -> (Vec<Message>, Vec<usize>) {
    if outcomes
        .iter()
        .all(|outcome| matches!(outcome, Outcome::Pass))
    {
        // Every message goes on as it came (an observer, a filter that kept all): the
        // batch is not rebuilt.
        plugin.stats.metrics.passed.inc_by(inputs.len() as u64);
        return (inputs, origins);
    }
    let mut messages = Vec::with_capacity(inputs.len());
    let mut next_origins = Vec::with_capacity(inputs.len());
    let (mut passed, mut split, mut dropped, mut refused) = (0u64, 0u64, 0u64, 0u64);
    let mut last_refusal = String::new();
    for ((input, origin), outcome) in inputs.into_iter().zip(origins).zip(outcomes) {
        match outcome {
            Outcome::Pass => {
                passed += 1;
                messages.push(input);
                next_origins.push(origin);
            }
            Outcome::Keep(mut kept) => {
                passed += 1;
                kept.id = input.id;
                kept.device_id = input.device_id;
                messages.push(kept);
                next_origins.push(origin);
            }
            Outcome::Drop => {
                dropped += 1;
                results[origin].dropped += 1;
            }
            Outcome::Split(parts) if parts.is_empty() => {
                dropped += 1;
                results[origin].dropped += 1;
            }
            Outcome::Split(parts) => {
                split += 1;
                for (index, mut part) in parts.into_iter().enumerate() {
                    if part.id.is_empty() || part.id == input.id {
                        part.id = format!("{}-{index}", input.id);
                    }
                    part.device_id.clone_from(&input.device_id);
                    messages.push(part);
                    next_origins.push(origin);
                }
            }
            Outcome::Fail(reason) => {
                refused += 1;
                last_refusal.clone_from(&reason);
                results[origin].failures.push(PartFailure {
                    message: input,
                    plugin: plugin.name.clone(),
                    kind: FailureKind::Refused,
                    reason,
                });
            }
        }
    }
    let metrics = &plugin.stats.metrics;
    metrics.passed.inc_by(passed);
    metrics.split.inc_by(split);
    metrics.dropped.inc_by(dropped);
    if refused > 0 {
        plugin
            .stats
            .failed(FailureKind::Refused.code(), &last_refusal, refused);
    }
    (messages, next_origins)
}

/// Fails every message of a batch a plugin crashed on.
fn fail_all(
    plugin: &LoadedPlugin,
    kind: FailureKind,
    reason: &str,
    messages: Vec<Message>,
    origins: Vec<usize>,
    results: &mut [InputResult],
) {
    plugin
        .stats
        .failed(kind.code(), reason, messages.len() as u64);
    for (message, origin) in messages.into_iter().zip(origins) {
        results[origin].failures.push(PartFailure {
            message,
            plugin: plugin.name.clone(),
            kind,
            reason: reason.to_string(),
        });
    }
}

fn choice(plugin: &str, decision: Decision) -> RouterChoice {
    let destination = decision.destination.map(|destination| match destination {
        WitDestination::IotCore(target) => Destination::IotCore {
            topic: target.topic,
            qos: target.qos,
        },
        WitDestination::Kinesis(target) => Destination::Kinesis {
            stream: target.stream,
            partition_key: target.partition_key,
            explicit_hash_key: target.explicit_hash_key,
        },
        WitDestination::Local => Destination::Local,
        WitDestination::Drop => Destination::Drop,
        WitDestination::DeadLetter => Destination::DeadLetter,
    });
    RouterChoice {
        plugin: plugin.to_string(),
        destination,
        reason: decision.reason,
    }
}

/// Runs the chain in the calling thread, with instances of its own: the offline loop of
/// `sluice plugin run`, and the benchmarks. The thread must be in a Tokio runtime's
/// context (entered, not running on it): a call's time limit is a timer there.
#[derive(Default)]
pub struct LocalRunner {
    /// This runner's own instances, by plugin load id.
    instances: HashMap<u64, Instance>,
}

impl LocalRunner {
    /// Runs the plugins' current set over `batch`.
    pub fn run(
        &mut self,
        plugins: &crate::plugin::Plugins,
        batch: Vec<Message>,
    ) -> Vec<InputResult> {
        let set = plugins.current();
        // Nothing a plugin can call waits on I/O, so the calls finish on this thread.
        futures_executor::block_on(run_chain(
            &plugins.inner.host,
            &set,
            &mut self.instances,
            batch,
            None,
        ))
    }
}
