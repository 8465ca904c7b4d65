//! The Kinesis Data Streams sink: records collected into `PutRecords` calls within
//! Kinesis' quotas, flushed when a call is full or after a short linger, retried per
//! record with backoff and jitter, one ordered queue per stream.
//!
//! - [`batch`]: which queued records make the next call (ordering per partition key).
//! - [`aggregate`]: KPL aggregation, opt-in per stream: many user records per Kinesis
//!   record, grouped by the shard their keys map to (from the stream's shard map,
//!   refreshed every [`SHARD_MAP_TTL`]).
//! - [`service`]: the `PutRecords` call through `aws-sdk-kinesis`, behind a small trait,
//!   with errors sorted into throttled, transient and permanent.
//!
//! A record counts as delivered when the answer gives it a sequence number. A record
//! failed with a permanent error (missing stream, access denied, validation) is handed
//! back to the caller with the error text, for the dead-letter store. Throttling slows
//! the stream's worker down; its queue is bounded, so a slow stream pushes back on the
//! spool's delivery task; a record not confirmed within the delivery timeout fails its
//! delivery, and the spool sends it again (it may arrive twice: at least once).

pub mod aggregate;
pub mod batch;
pub mod service;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::config::KinesisSinkConfig;
use crate::record::Record;
use crate::route::Destination;
use crate::sink::kinesis::aggregate::{Aggregate, hash_key};
use crate::sink::kinesis::batch::{Planned, Queued, RETRY, plan, plan_aggregated};
use crate::sink::kinesis::service::{CallError, EntryResult, KinesisApi, PutEntry, ShardRange};
use crate::sink::{Rejected, SinkError, SinkFuture};

/// Records waiting per stream before new ones wait in the channel (and, behind it, at
/// ingress): about ten full calls.
const MAX_QUEUED_PER_STREAM: usize = 5_000;
/// Submissions (one per request) buffered per stream before `deliver` waits.
const CHANNEL_DEPTH: usize = 1_024;
/// How long an aggregating stream trusts its shard map before listing shards again.
pub const SHARD_MAP_TTL: Duration = Duration::from_secs(30);

/// Settings of the Kinesis sink.
#[derive(Debug, Clone)]
pub struct KinesisSettings {
    /// How long a call waits for more records before it is sent part-full.
    pub linger: Duration,
    /// How long a request waits for its records to be confirmed.
    pub delivery_timeout: Duration,
    /// The streams' maximum record size (data plus partition key).
    pub max_record_bytes: usize,
    /// Streams whose records are KPL-aggregated.
    pub aggregate_streams: Vec<String>,
    /// Send each message as a JSON envelope (id, device, topic, payload…; the local
    /// sink's line format) instead of the bare payload, so consumers see message ids.
    pub envelope: bool,
}

/// How one record ended.
enum Fate {
    /// Stored; Kinesis gave it this sequence number.
    Stored,
    /// Refused for good, with the reason.
    Rejected(String),
    /// Not confirmed within the delivery timeout; the last error seen.
    TimedOut(String),
}

/// A record in a stream's queue.
struct Entry {
    data: Vec<u8>,
    key: String,
    explicit_hash_key: Option<String>,
    not_before: Instant,
    deadline: Instant,
    attempts: u32,
    last_error: String,
    done: Option<oneshot::Sender<Fate>>,
}

impl Queued for Entry {
    fn key(&self) -> &str {
        &self.key
    }
    fn size(&self) -> usize {
        self.data.len() + self.key.len()
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
    fn aggregatable(&self) -> bool {
        self.explicit_hash_key.is_none()
    }
    fn not_before(&self) -> Instant {
        self.not_before
    }
}

impl Entry {
    fn finish(&mut self, fate: Fate) {
        if let Some(done) = self.done.take() {
            let _ = done.send(fate);
        }
    }
}

/// The Kinesis sink; one worker task per stream, started on first use.
pub struct KinesisSink {
    api: Arc<dyn KinesisApi>,
    settings: KinesisSettings,
    streams: Mutex<HashMap<String, mpsc::Sender<Vec<Entry>>>>,
}

impl KinesisSink {
    /// The sink `[sinks.kinesis]` configures, calling Kinesis with the shared AWS
    /// configuration (or the section's own endpoint), records up to `max_record_bytes`.
    pub fn build(
        settings: &KinesisSinkConfig,
        max_record_bytes: usize,
        shared: &aws_config::SdkConfig,
    ) -> KinesisSink {
        let shared = crate::sink::aws::with_endpoint(shared, settings.endpoint_url.as_deref());
        KinesisSink::new(
            Arc::new(service::AwsKinesis::new(&shared)),
            KinesisSettings {
                linger: Duration::from_millis(settings.linger_ms),
                delivery_timeout: Duration::from_millis(settings.delivery_timeout_ms),
                max_record_bytes,
                aggregate_streams: settings.aggregate_streams.clone(),
                envelope: settings.envelope,
            },
        )
    }

    /// A sink calling `api`.
    pub fn new(api: Arc<dyn KinesisApi>, settings: KinesisSettings) -> KinesisSink {
        KinesisSink {
            api,
            settings,
            streams: Mutex::new(HashMap::new()),
        }
    }

    fn stream(&self, name: &str) -> mpsc::Sender<Vec<Entry>> {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sender) = streams.get(name).filter(|s| !s.is_closed()) {
            return sender.clone();
        }
        let (sender, receiver) = mpsc::channel(CHANNEL_DEPTH);
        let worker = StreamWorker {
            stream: name.to_string(),
            api: self.api.clone(),
            linger: self.settings.linger,
            max_record_bytes: self.settings.max_record_bytes,
            shards: self
                .settings
                .aggregate_streams
                .iter()
                .any(|s| s == name)
                .then(ShardMap::default),
        };
        tokio::spawn(worker.run(receiver));
        streams.insert(name.to_string(), sender.clone());
        sender
    }

    /// Delivers Kinesis-bound records; returns the ones refused for good.
    pub fn deliver(&self, records: Vec<Record>) -> SinkFuture<'_> {
        Box::pin(async move {
            let now = Instant::now();
            let deadline = now + self.settings.delivery_timeout;
            let mut by_stream: HashMap<String, Vec<Entry>> = HashMap::new();
            let mut waiting = Vec::with_capacity(records.len());
            let mut rejected = Vec::new();
            for record in records {
                let Destination::Kinesis {
                    stream,
                    partition_key,
                    explicit_hash_key,
                } = &record.decision.destination
                else {
                    rejected.push(Rejected {
                        reason: "not a Kinesis destination".to_string(),
                        record,
                    });
                    continue;
                };
                let data = if self.settings.envelope {
                    crate::sink::local::json_line(&record).into_bytes()
                } else {
                    record.message.payload.clone()
                };
                let size = data.len() + partition_key.len();
                if size > self.settings.max_record_bytes {
                    let reason = format!(
                        "record of {size} bytes (data plus partition key) is over the stream's limit of {} bytes",
                        self.settings.max_record_bytes
                    );
                    rejected.push(Rejected { reason, record });
                    continue;
                }
                let (done, fate) = oneshot::channel();
                by_stream.entry(stream.clone()).or_default().push(Entry {
                    data,
                    key: partition_key.clone(),
                    explicit_hash_key: explicit_hash_key.clone(),
                    not_before: now,
                    deadline,
                    attempts: 0,
                    last_error: String::new(),
                    done: Some(done),
                });
                waiting.push((record, fate));
            }
            for (stream, entries) in by_stream {
                if self.stream(&stream).send(entries).await.is_err() {
                    return Err(SinkError::Unavailable(format!(
                        "the Kinesis worker for `{stream}` stopped"
                    )));
                }
            }
            let mut timed_out = None;
            for (record, fate) in waiting {
                match fate.await {
                    Ok(Fate::Stored) => {}
                    Ok(Fate::Rejected(reason)) => rejected.push(Rejected { reason, record }),
                    Ok(Fate::TimedOut(error)) => timed_out = Some(error),
                    Err(_) => timed_out = Some("the Kinesis worker stopped".to_string()),
                }
            }
            match timed_out {
                Some(error) => Err(SinkError::Unavailable(format!(
                    "Kinesis did not confirm every record within {:?}: {error}",
                    self.settings.delivery_timeout
                ))),
                None => Ok(rejected),
            }
        })
    }
}

/// An aggregating stream's shard map: open shards' hash ranges, sorted.
#[derive(Default)]
struct ShardMap {
    ranges: Vec<ShardRange>,
    fetched: Option<Instant>,
}

impl ShardMap {
    /// Index of the shard `key` maps to (0 when the map is unknown: one group).
    fn shard_of(&self, key: &str) -> usize {
        let hash = hash_key(key);
        self.ranges
            .iter()
            .position(|range| range.start <= hash && hash <= range.end)
            .unwrap_or(0)
    }

    async fn refresh_if_stale(&mut self, api: &dyn KinesisApi, stream: &str) {
        if self.fetched.is_some_and(|at| at.elapsed() < SHARD_MAP_TTL) {
            return;
        }
        self.fetched = Some(Instant::now());
        match api.list_shards(stream).await {
            Ok(ranges) => {
                if ranges.len() != self.ranges.len() {
                    tracing::info!(%stream, shards = ranges.len(), "Kinesis shard map loaded");
                }
                self.ranges = ranges;
            }
            Err(error) => {
                tracing::warn!(%stream, ?error, "cannot list shards; aggregating without a shard map")
            }
        }
    }
}

/// One stream's worker: fills calls from its queue, sends them, settles the answers.
struct StreamWorker {
    stream: String,
    api: Arc<dyn KinesisApi>,
    linger: Duration,
    max_record_bytes: usize,
    /// `Some` when the stream's records are aggregated.
    shards: Option<ShardMap>,
}

impl StreamWorker {
    /// The next call: Kinesis records, each with its user records' queue indices.
    async fn plan(&mut self, queue: &[Entry], now: Instant) -> Vec<Planned> {
        match &mut self.shards {
            None => plan(queue, now).into_iter().map(Planned::Plain).collect(),
            Some(map) => {
                map.refresh_if_stale(self.api.as_ref(), &self.stream).await;
                plan_aggregated(queue, now, |key| map.shard_of(key), self.max_record_bytes)
            }
        }
    }

    /// After a reshard, records land on shards the map does not know: the map is
    /// listed again before the next call, so aggregation follows the new shards.
    fn notice_resharding(&mut self, chosen: &[Planned], results: &[EntryResult], queue: &[Entry]) {
        let Some(map) = &mut self.shards else { return };
        for (planned, result) in chosen.iter().zip(results) {
            let EntryResult::Stored { shard_id } = result else {
                continue;
            };
            let key = &queue[planned.members()[0]].key;
            let predicted = map
                .ranges
                .get(map.shard_of(key))
                .map(|range| range.shard_id.as_str());
            if predicted.is_some_and(|predicted| predicted != shard_id) {
                tracing::info!(stream = %self.stream, %shard_id, "a record landed on an unexpected shard; reloading the shard map");
                map.fetched = None;
                return;
            }
        }
    }

    async fn run(mut self, mut incoming: mpsc::Receiver<Vec<Entry>>) {
        let stream = self.stream.clone();
        let api = self.api.clone();
        let linger = self.linger;
        let mut queue: Vec<Entry> = Vec::new();
        let mut throttles: u32 = 0;
        let mut failing_calls: u32 = 0;
        loop {
            // Nothing ready to send (empty, or everything in backoff): wait for new
            // records or the first retry; new records linger so that others can join.
            let now = Instant::now();
            if !queue.iter().any(|entry| entry.not_before <= now) {
                let first_retry = queue.iter().map(|entry| entry.not_before).min();
                let arrived = match first_retry {
                    None => match incoming.recv().await {
                        Some(entries) => {
                            queue.extend(entries);
                            true
                        }
                        None => return,
                    },
                    Some(at) => {
                        let at = tokio::time::Instant::from_std(at);
                        tokio::select! {
                            more = incoming.recv() => match more {
                                Some(entries) => {
                                    queue.extend(entries);
                                    true
                                }
                                None => {
                                    tokio::time::sleep_until(at).await;
                                    false
                                }
                            },
                            () = tokio::time::sleep_until(at) => false,
                        }
                    }
                };
                if !arrived {
                    continue;
                }
                // Give concurrent requests a moment to join this call.
                let linger_end = tokio::time::Instant::now() + linger;
                while queue.len() < batch::MAX_RECORDS_PER_CALL {
                    tokio::select! {
                        more = incoming.recv() => match more {
                            Some(entries) => queue.extend(entries),
                            None => break,
                        },
                        () = tokio::time::sleep_until(linger_end) => break,
                    }
                }
            }
            while queue.len() < MAX_QUEUED_PER_STREAM {
                match incoming.try_recv() {
                    Ok(entries) => queue.extend(entries),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            for entry in queue.iter_mut().filter(|e| e.deadline <= now) {
                let error = if entry.last_error.is_empty() {
                    "no answer yet".to_string()
                } else {
                    entry.last_error.clone()
                };
                entry.finish(Fate::TimedOut(error));
            }
            queue.retain(|entry| entry.done.is_some());
            let chosen = self.plan(&queue, now).await;
            if chosen.is_empty() {
                // Everything waits for a retry: sleep until the first is due, or new work.
                let Some(next) = queue.iter().map(|e| e.not_before).min() else {
                    continue;
                };
                // Never in the past: a due record that cannot go would otherwise spin.
                let soonest = Instant::now() + Duration::from_millis(5);
                let until = tokio::time::Instant::from_std(next.max(soonest));
                if queue.len() < MAX_QUEUED_PER_STREAM {
                    tokio::select! {
                        more = incoming.recv() => match more {
                            Some(entries) => queue.extend(entries),
                            // Closed (shutting down): finish what is queued, without spinning.
                            None => tokio::time::sleep_until(until).await,
                        },
                        () = tokio::time::sleep_until(until) => {}
                    }
                } else {
                    tokio::time::sleep_until(until).await;
                }
                continue;
            }
            let request: Vec<PutEntry> = chosen
                .iter()
                .map(|planned| put_entry(&queue, planned))
                .collect();
            let metrics = &crate::metrics::METRICS;
            let sink = crate::metrics::SinkLabel {
                sink: "kinesis".to_string(),
            };
            metrics
                .sink_call_records
                .get_or_create(&sink)
                .observe(request.len() as f64);
            let answer = api.put_records(&stream, request).await;
            if answer.is_ok() {
                if failing_calls > 0 {
                    tracing::info!(%stream, failed = failing_calls, "PutRecords works again");
                }
                failing_calls = 0;
            }
            let now = Instant::now();
            let mut throttled = false;
            let mut retries = 0u64;
            match answer {
                Ok(results) => {
                    self.notice_resharding(&chosen, &results, &queue);
                    for (planned, result) in chosen.iter().zip(results) {
                        for &i in planned.members() {
                            let entry = &mut queue[i];
                            match &result {
                                EntryResult::Stored { .. } => entry.finish(Fate::Stored),
                                EntryResult::Retry { code, message } => {
                                    throttled |=
                                        code.contains("Throughput") || code.contains("Throttling");
                                    retry_later(entry, now, format!("{code}: {message}"));
                                    retries += 1;
                                }
                                EntryResult::Permanent { code, message } => {
                                    entry.finish(Fate::Rejected(format!(
                                        "Kinesis refused the record: {code}: {message}"
                                    )));
                                }
                            }
                        }
                    }
                }
                Err(CallError::Throttled(message)) => {
                    throttled = true;
                    for &i in chosen.iter().flat_map(Planned::members) {
                        retry_later(&mut queue[i], now, message.clone());
                        retries += 1;
                    }
                }
                Err(CallError::Transient(message)) => {
                    // Once per outage, not once per attempt.
                    if failing_calls == 0 {
                        tracing::warn!(%stream, error = %message, "PutRecords failed; retrying");
                    } else {
                        tracing::debug!(%stream, error = %message, "PutRecords failed again");
                    }
                    failing_calls += 1;
                    for &i in chosen.iter().flat_map(Planned::members) {
                        retry_later(&mut queue[i], now, message.clone());
                        retries += 1;
                    }
                }
                Err(CallError::Permanent(message)) => {
                    tracing::error!(%stream, error = %message, "PutRecords refused");
                    for &i in chosen.iter().flat_map(Planned::members) {
                        queue[i].finish(Fate::Rejected(format!(
                            "Kinesis refused the call: {message}"
                        )));
                    }
                }
            }
            queue.retain(|entry| entry.done.is_some());
            if retries > 0 {
                metrics.sink_retries.get_or_create(&sink).inc_by(retries);
            }
            if throttled {
                metrics.sink_throttles.get_or_create(&sink).inc();
                // Slow the whole stream down, not only the records concerned: the shard is
                // over its quota, so sending the next call at once would be refused too.
                throttles = throttles.saturating_add(1);
                let pause = RETRY.delay(throttles);
                tracing::debug!(%stream, ?pause, "throttled by Kinesis; slowing down");
                tokio::time::sleep(pause).await;
            } else {
                throttles = 0;
            }
        }
    }
}

/// The request entry for a planned Kinesis record.
fn put_entry(queue: &[Entry], planned: &Planned) -> PutEntry {
    match planned {
        Planned::Plain(i) => PutEntry {
            data: queue[*i].data.clone(),
            partition_key: queue[*i].key.clone(),
            explicit_hash_key: queue[*i].explicit_hash_key.clone(),
        },
        Planned::Aggregated(indices) => {
            let mut aggregate = Aggregate::default();
            for &i in indices {
                aggregate.push(&queue[i].key, queue[i].data.clone());
            }
            let (data, partition_key) = aggregate.finish();
            PutEntry {
                data,
                partition_key,
                explicit_hash_key: None,
            }
        }
    }
}

fn retry_later(entry: &mut Entry, now: Instant, error: String) {
    entry.attempts = entry.attempts.saturating_add(1);
    entry.not_before = now + RETRY.delay(entry.attempts);
    entry.last_error = error;
}

impl crate::sink::Sink for KinesisSink {
    fn deliver(&self, records: Vec<Record>) -> SinkFuture<'_> {
        KinesisSink::deliver(self, records)
    }
}
