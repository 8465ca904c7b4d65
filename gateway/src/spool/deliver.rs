//! Delivery from the spool: one task per sink reads its queue in order and hands windows
//! of records to the sink, a few windows in flight at once. A window's records leave the
//! spool only when the sink has confirmed every one of them (a Kinesis sequence number,
//! an MQTT PUBACK, an HTTP 200, a flushed file) or refused some for good; refused records
//! become dead letters, stored before the records leave their queue.
//!
//! A record whose `mqtt.message_expiry` (seconds, from IoT Core's publish API) passed
//! while it waited is not sent: it becomes a dead letter (origin `expired`), or, with
//! `spool.expired = "drop"` or while the dead-letter store is full, it is dropped and
//! counted (`sluice_dead_letters_refused_total`, `expired_dropped` or `store_full`).
//!
//! When a window fails (the sink is unreachable, or did not confirm within its delivery
//! timeout), the task lets the windows already sent finish, waits with exponential
//! backoff, and starts again from the oldest record still spooled ("go back N"): records
//! keep their order per partition key and topic, and the price of a failure is records
//! delivered twice, never records skipped.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesOrdered;
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::config::ExpiredPath;
use crate::message::{attribute, now_ms};
use crate::metrics::{SinkLabel, SinkOutcome};
use crate::record::Record;
use crate::record::SinkId;
use crate::sink::{Rejected, Sinks};
use crate::spool::Spool;
use crate::spool::codec::{DeadLetter, Origin};

/// Records per window.
const WINDOW_RECORDS: usize = 1_000;
/// Bytes per window (about): a few full `PutRecords` calls.
const WINDOW_BYTES: usize = 8 << 20;
/// Windows in flight per sink. Enough to keep a sink's own batching busy while the next
/// window is read; few enough that a failure re-sends little.
const MAX_WINDOWS: usize = 4;
/// Pauses between attempts while a sink keeps failing: 100 ms, doubling to 5 s.
const RETRY: Backoff = Backoff {
    first: Duration::from_millis(100),
    max: Duration::from_secs(5),
    jitter: false,
};

/// Starts one delivery task per sink. Each runs until `drain` turns true and its queue
/// is empty; the caller aborts them when the shutdown deadline passes.
pub fn start(
    spool: Arc<Spool>,
    sinks: Arc<Sinks>,
    expired: ExpiredPath,
    drain: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    SinkId::ALL
        .into_iter()
        .map(|sink| {
            let task = Deliverer {
                sink,
                spool: spool.clone(),
                sinks: sinks.clone(),
                expired,
            };
            tokio::spawn(task.run(drain.clone()))
        })
        .collect()
}

struct Deliverer {
    sink: SinkId,
    spool: Arc<Spool>,
    sinks: Arc<Sinks>,
    /// `spool.expired`.
    expired: ExpiredPath,
}

/// A window's sequence numbers and how its delivery ended.
type Sent = (Vec<u64>, Result<Vec<DeadLetter>, String>);

impl Deliverer {
    async fn run(self, mut drain: watch::Receiver<bool>) {
        let me = Arc::new(self);
        let mut appended = me.spool.watch(me.sink);
        let mut cursor = 0u64;
        let mut in_flight: FuturesOrdered<_> = FuturesOrdered::new();
        let mut failures = 0u32;
        let mut failed = false;
        loop {
            while !failed && in_flight.len() < MAX_WINDOWS {
                // Seen before reading: a commit after this read wakes the task.
                appended.borrow_and_update();
                match me.read(cursor).await {
                    Ok(window) if window.is_empty() => break,
                    Ok(window) => {
                        cursor = window.last().map_or(cursor, |(seq, _)| seq + 1);
                        let me = me.clone();
                        in_flight.push_back(async move { me.send(window).await });
                    }
                    Err(error) => {
                        tracing::error!(sink = me.sink.name(), %error, "cannot read the spool");
                        failed = true;
                    }
                }
            }
            if in_flight.is_empty() {
                if failed {
                    failures = failures.saturating_add(1);
                    tokio::time::sleep(RETRY.delay(failures)).await;
                    failed = false;
                    cursor = 0;
                    continue;
                }
                if *drain.borrow_and_update() {
                    return;
                }
                tokio::select! {
                    _ = appended.changed() => {}
                    _ = drain.changed() => {}
                }
                continue;
            }
            tokio::select! {
                Some((seqs, result)) = in_flight.next() => {
                    match result {
                        Ok(dead) => {
                            me.spool.set_failing(me.sink, false);
                            if let Err(error) = me.spool.delivered(me.sink, seqs, dead).await {
                                tracing::error!(sink = me.sink.name(), %error, "cannot mark records delivered; they will be sent again");
                                failed = true;
                            } else if !failed {
                                failures = 0;
                            }
                        }
                        Err(error) => {
                            sink_failed(&me.spool, me.sink);
                            if !failed {
                                tracing::warn!(sink = me.sink.name(), %error, waiting = me.spool.depth(me.sink), "delivery failed; records stay spooled and are retried");
                            }
                            failed = true;
                        }
                    }
                }
                _ = appended.changed(), if !failed && in_flight.len() < MAX_WINDOWS => {}
            }
        }
    }

    async fn read(&self, from: u64) -> Result<Vec<(u64, Record)>, String> {
        // In the steady state the records are in memory: no thread hop for them.
        if let Some(window) = self
            .spool
            .take_recent(self.sink, from, WINDOW_RECORDS, WINDOW_BYTES)
        {
            return Ok(window);
        }
        let spool = self.spool.clone();
        let sink = self.sink;
        tokio::task::spawn_blocking(move || spool.take(sink, from, WINDOW_RECORDS, WINDOW_BYTES))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    async fn send(&self, window: Vec<(u64, Record)>) -> Sent {
        let (seqs, records): (Vec<u64>, Vec<Record>) = window.into_iter().unzip();
        let (dead, live) = split_expired(self.sink, records, now_ms());
        let mut dead = keep_expired(&self.spool, self.expired, self.sink, dead);
        if live.is_empty() {
            count(self.sink, 0, dead.len());
            return (seqs, Ok(dead));
        }
        let received: Vec<u64> = live.iter().map(|r| r.message.received_at_ms).collect();
        crate::metrics::METRICS
            .sink_window_records
            .get_or_create(&SinkLabel {
                sink: self.sink.name().to_string(),
            })
            .observe(live.len() as f64);
        let expired_count = dead.len();
        let result = match self.sinks.deliver_to(self.sink, live).await {
            Ok(rejected) => {
                let refused = rejected.len();
                delivered(self.sink, &received, refused);
                Ok(rejected
                    .into_iter()
                    .map(refused_by_sink)
                    .chain(dead.drain(..))
                    .collect::<Vec<DeadLetter>>())
            }
            Err(error) => Err(error.to_string()),
        };
        if result.is_ok() {
            count(self.sink, 0, expired_count);
        }
        (seqs, result)
    }
}

/// Splits `records` into the dead letters (origin `expired`) of those whose message
/// expiry passed by `now` before `sink` could take them, and the others, in order.
pub(super) fn split_expired(
    sink: SinkId,
    records: Vec<Record>,
    now: u64,
) -> (Vec<DeadLetter>, Vec<Record>) {
    let (expired, live): (Vec<Record>, Vec<Record>) =
        records.into_iter().partition(|r| expired(r, now));
    let dead = expired
        .into_iter()
        .map(|record| DeadLetter {
            origin: Origin::Expired,
            reason: format!(
                "its message expiry of {} s passed before {} could take it",
                attribute(&record, attribute::MESSAGE_EXPIRY).unwrap_or_default(),
                sink.name()
            ),
            record,
            at_ms: now,
        })
        .collect();
    (dead, live)
}

/// The expired records' dead letters to keep: none with `spool.expired = "drop"`
/// (`expired`), and none when they do not fit in the store; the others are dropped and
/// counted.
pub(super) fn keep_expired(
    spool: &Spool,
    expired: ExpiredPath,
    sink: SinkId,
    dead: Vec<DeadLetter>,
) -> Vec<DeadLetter> {
    if dead.is_empty() {
        return dead;
    }
    let why = match expired {
        ExpiredPath::Drop => "expired_dropped",
        ExpiredPath::DeadLetter => {
            let bytes: usize = dead
                .iter()
                .map(|letter| crate::spool::codec::encode_dead_letter(letter).len())
                .sum();
            if spool.dead_letters_fit(bytes as u64) {
                return dead;
            }
            "store_full"
        }
    };
    tracing::info!(
        sink = sink.name(),
        dropped = dead.len(),
        why,
        "expired records dropped instead of kept as dead letters"
    );
    for _ in &dead {
        crate::metrics::METRICS.dead_letter_refused(why);
    }
    Vec::new()
}

/// The dead letter of a record its sink refused for good.
pub(super) fn refused_by_sink(rejected: Rejected) -> DeadLetter {
    tracing::warn!(id = %rejected.record.message.id, reason = %rejected.reason, "record refused by the sink; dead-lettered");
    DeadLetter {
        origin: Origin::Sink {
            sink: rejected.record.decision.destination.kind().to_string(),
        },
        reason: rejected.reason,
        record: rejected.record,
        at_ms: now_ms(),
    }
}

/// `sink` answered for records received at `received` (ms), `refused` of them for
/// good: their delivery latency, and the records delivered and dead-lettered.
pub(super) fn delivered(sink: SinkId, received: &[u64], refused: usize) {
    let now = now_ms();
    let label = SinkLabel {
        sink: sink.name().to_string(),
    };
    let histogram = crate::metrics::METRICS
        .delivery_latency
        .get_or_create(&label);
    for at in received {
        histogram.observe(now.saturating_sub(*at) as f64 / 1000.0);
    }
    count(sink, received.len().saturating_sub(refused), refused);
}

/// `sink` failed a delivery: it counts as failing until one succeeds.
pub(super) fn sink_failed(spool: &Spool, sink: SinkId) {
    spool.set_failing(sink, true);
    crate::metrics::METRICS
        .sink_failures
        .get_or_create(&SinkLabel {
            sink: sink.name().to_string(),
        })
        .inc();
}

pub(super) fn count(sink: SinkId, delivered: usize, dead_lettered: usize) {
    for (outcome, n) in [("delivered", delivered), ("dead-lettered", dead_lettered)] {
        if n > 0 {
            crate::metrics::METRICS
                .sink_records
                .get_or_create(&SinkOutcome {
                    sink: sink.name().to_string(),
                    outcome: outcome.to_string(),
                })
                .inc_by(n as u64);
        }
    }
}

fn attribute<'a>(record: &'a Record, key: &str) -> Option<&'a str> {
    record
        .message
        .attributes
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Whether the record's message expiry (if it has one) passed by `now_ms`.
fn expired(record: &Record, now_ms: u64) -> bool {
    attribute(record, attribute::MESSAGE_EXPIRY)
        .and_then(|secs| secs.parse::<u64>().ok())
        .is_some_and(|secs| {
            record
                .message
                .received_at_ms
                .saturating_add(secs.saturating_mul(1000))
                <= now_ms
        })
}
