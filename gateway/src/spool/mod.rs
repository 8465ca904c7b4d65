//! The spool: routed records are written here, durably, before the device is
//! acknowledged, and stay until their sink confirms them (records for the local sink,
//! durable itself, are written straight to its file: [`direct`]). Dead letters live
//! here too.
//!
//! Storage, in the data directory:
//! - `queue/`: the sinks' queues, an append-only log of segment files ([`log`]), each
//!   record under a sequence number;
//! - `spool.redb`: the dead letters, in [`redb`], an embedded, crash-safe B-tree store
//!   (keyed by sequence numbers from the same counter), where they can be listed, read
//!   and removed one by one. Spools written before the queue log kept the queues here
//!   too; opening one moves those records to the log.
//!
//! **Group commit.** One writer thread owns every change. It takes all the requests
//! waiting and writes them at once, so one `fsync` covers every request that arrived
//! while the previous one was on disk; only then does it answer them. Deliveries are
//! appended without an `fsync`; they become durable with the next append. A crash can
//! only undo deliveries, so records are delivered again, never lost.
//!
//! **Additions before removals.** A change can touch both stores (a sink refuses a record
//! for good: the record leaves its queue, a dead letter takes its place; a redrive: the
//! reverse). New records and dead letters are on disk before anything they replace is
//! removed, so a crash in between leaves a message twice, never nowhere.
//!
//! **Bounded.** Each sink's queue holds at most `spool.max_bytes_per_sink` bytes of
//! records; a request that would go over is refused whole ([`SpoolError::Full`]), and
//! nothing of it is written.
//!
//! [`deliver`] runs one delivery task per sink, reading the queue in order;
//! [`best_effort`] hands records of best-effort routes to their sinks without the
//! queue, accounted the same way; [`direct`] writes durable records for the local sink
//! straight to its file (durable itself), without the queue.
//!
//! The files: this one, the spool's API and its shared state (one [`SinkState`] per
//! sink); `change` (what a request asks of the writer); `writer` (the group-commit
//! thread); [`log`] (the queue log's segments); `recent` (the newest records in memory);
//! `dead` (the dead-letter table); `legacy` (moving an older spool's queues);
//! [`codec`] (the encodings on disk).

pub mod best_effort;
mod change;
pub mod codec;
mod dead;
pub mod deliver;
pub mod direct;
mod legacy;
mod log;
mod recent;
mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use redb::{Database, ReadableDatabase as _, ReadableTable as _, ReadableTableMetadata as _};
use serde::Serialize;
use tokio::sync::{oneshot, watch};

use crate::record::{PerSink, Record, SinkId};
use crate::spool::change::Op;
use crate::spool::codec::DeadLetter;
use crate::spool::dead::DEAD_LETTERS;
use crate::spool::legacy::{legacy_records, move_legacy_records};
use crate::spool::recent::Recent;

pub use crate::spool::change::Change;

/// Why the spool refused a write.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    /// The sink's queue is at its limit.
    #[error("the spool for the {sink} sink is full ({bytes} of {limit} bytes queued)")]
    Full {
        /// The sink.
        sink: &'static str,
        /// Bytes queued for it.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The storage failed (disk full, I/O error).
    #[error("the spool cannot write: {0}")]
    Storage(String),
    /// The change adds dead letters and the dead-letter store is at its limit.
    #[error("the dead-letter store is full ({bytes} of {limit} bytes kept)")]
    DeadLettersFull {
        /// Bytes of dead letters kept.
        bytes: u64,
        /// `spool.max_dead_letter_bytes`.
        limit: u64,
    },
    /// The spool is shutting down.
    #[error("the spool is closed")]
    Closed,
}

/// Counters read by the admin API and the benchmarks.
#[derive(Debug, Clone, Serialize)]
pub struct SpoolStats {
    /// Per sink: records and bytes waiting.
    pub queues: Vec<QueueStats>,
    /// Dead letters stored.
    pub dead_letters: u64,
    /// Their encoded size.
    pub dead_letter_bytes: u64,
    /// `spool.max_dead_letter_bytes`.
    pub max_dead_letter_bytes: u64,
    /// Requests refused because the dead-letter store was full, since start.
    pub refused_dead_letters_full: u64,
    /// Commits that ended with an `fsync` since start.
    pub durable_commits: u64,
    /// Commits in all since start.
    pub commits: u64,
    /// The per-sink limit, in bytes.
    pub max_bytes_per_sink: u64,
    /// Requests refused because a sink's queue was full, since start.
    pub refused_full: u64,
    /// The last sequence number handed out: everything acknowledged so far is at or
    /// below it.
    pub last_seq: u64,
}

/// One sink's queue.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStats {
    /// The sink.
    pub sink: SinkId,
    /// Records waiting.
    pub records: u64,
    /// Their encoded size.
    pub bytes: u64,
    /// The sequence number of the oldest one, if any.
    pub oldest: Option<u64>,
}

struct Shared {
    db: Database,
    /// Where each queued record is in the queue log.
    index: Mutex<log::Index>,
    /// Per sink: its queue's counters and state.
    sinks: PerSink<SinkState>,
    dead_letters: AtomicU64,
    /// Encoded bytes of the dead letters stored.
    dead_letter_bytes: AtomicU64,
    /// `spool.max_dead_letter_bytes` (a reload can change it).
    dead_letter_limit: AtomicU64,
    /// Changes refused because their dead letters would not fit.
    refused_dead_full: AtomicU64,
    commits: AtomicU64,
    durable_commits: AtomicU64,
    refused_full: AtomicU64,
    /// Room made in a queue (records delivered): one waiter for room at a time is woken,
    /// and passes it on once it stored its messages ([`Spool::room_made`]).
    room: tokio::sync::Notify,
    /// Writers waiting in [`Spool::room`] now.
    waiting_for_room: std::sync::atomic::AtomicUsize,
    last_seq: AtomicU64,
    /// `spool.max_bytes_per_sink`.
    limit: u64,
}

/// One sink's queue, as the writer and the readers share it.
struct SinkState {
    /// Records waiting.
    records: AtomicU64,
    /// Their encoded bytes.
    bytes: AtomicU64,
    /// Refusing for lack of room (logged when it starts and ends).
    full: AtomicBool,
    /// The last sequence number committed: delivery tasks wait on it.
    appended: watch::Sender<u64>,
    /// The newest records, in memory.
    recent: Mutex<Recent>,
    /// Its delivery is failing (for readiness).
    failing: AtomicBool,
}

/// The open spool; cheap to share behind an `Arc`.
pub struct Spool {
    shared: Arc<Shared>,
    ops: Mutex<Option<mpsc::Sender<Op>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Spool {
    /// Opens (creating if needed) the spool under `dir`, counts what it holds, and starts
    /// the writer.
    pub fn open(dir: &Path, max_bytes_per_sink: u64) -> anyhow::Result<Spool> {
        Spool::open_with(dir, max_bytes_per_sink, log::SEGMENT_BYTES)
    }

    fn open_with(dir: &Path, max_bytes_per_sink: u64, segment_bytes: u64) -> anyhow::Result<Spool> {
        use anyhow::Context as _;
        let path = dir.join("spool.redb");
        let db = Database::builder().create(&path).map_err(|error| match error {
            redb::DatabaseError::DatabaseAlreadyOpen => anyhow::anyhow!(
                "the spool {} is in use by another process (is another sluice running on this data directory?)",
                path.display()
            ),
            other => anyhow::anyhow!("cannot open the spool {}: {other}", path.display()),
        })?;
        let mut next_seq = 1u64;
        let dead_letters;
        let mut dead_letter_bytes = 0u64;
        {
            let txn = db.begin_write().context("spool: begin")?;
            {
                let dead = txn.open_table(DEAD_LETTERS).context("spool: open table")?;
                dead_letters = dead.len().context("spool: count")?;
                if let Some(last) = dead.last().context("spool: scan")? {
                    next_seq = last.0.value() + 1;
                }
                for entry in dead.iter().context("spool: scan")? {
                    let (_, value) = entry.context("spool: scan")?;
                    dead_letter_bytes += value.value().len() as u64;
                }
            }
            txn.commit().context("spool: commit")?;
        }
        let legacy = legacy_records(&db)?;
        if let Some((_, seq, _)) = legacy.iter().max_by_key(|(_, seq, _)| *seq) {
            next_seq = next_seq.max(seq + 1);
        }
        let opened = log::Log::open(&dir.join("queue"), segment_bytes, next_seq)?;
        let (mut log, index) = (opened.log, Mutex::new(opened.index));
        let next_seq = opened.next_seq;
        if !legacy.is_empty() {
            move_legacy_records(&db, &mut log, &index, next_seq, &legacy)?;
        }
        let totals = {
            let index = index.lock().unwrap_or_else(|p| p.into_inner());
            PerSink::from_fn(|sink| index.totals(sink))
        };
        if totals.iter().any(|(_, &(records, _))| records > 0) {
            tracing::info!(
                kinesis = totals[SinkId::Kinesis].0,
                iot_core = totals[SinkId::IotCore].0,
                local = totals[SinkId::Local].0,
                "spool holds undelivered records from an earlier run; delivering them"
            );
        }
        let shared = Arc::new(Shared {
            db,
            index,
            sinks: PerSink::from_fn(|sink| SinkState {
                records: AtomicU64::new(totals[sink].0),
                bytes: AtomicU64::new(totals[sink].1),
                full: AtomicBool::new(false),
                appended: watch::channel(next_seq - 1).0,
                recent: Mutex::new(Recent::new(next_seq)),
                failing: AtomicBool::new(false),
            }),
            dead_letters: AtomicU64::new(dead_letters),
            dead_letter_bytes: AtomicU64::new(dead_letter_bytes),
            dead_letter_limit: AtomicU64::new(u64::MAX),
            refused_dead_full: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            durable_commits: AtomicU64::new(0),
            refused_full: AtomicU64::new(0),
            room: tokio::sync::Notify::new(),
            waiting_for_room: std::sync::atomic::AtomicUsize::new(0),
            last_seq: AtomicU64::new(next_seq - 1),
            limit: max_bytes_per_sink,
        });
        let (ops, queue) = mpsc::channel::<Op>();
        let writer_shared = shared.clone();
        let writer = crate::disk_thread::spawn("sluice-spool", move || {
            writer::write_loop(&writer_shared, log, next_seq, &queue)
        })?;
        Ok(Spool {
            shared,
            ops: Mutex::new(Some(ops)),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Commits `change`; resolves once it is on disk (or, for deliveries alone, applied).
    pub async fn commit(&self, change: Change) -> Result<(), SpoolError> {
        if change.is_empty() {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        let sent = match &*self.ops.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(ops) => ops.send(Op { change, reply }).is_ok(),
            None => false,
        };
        if !sent {
            return Err(SpoolError::Closed);
        }
        answer.await.unwrap_or(Err(SpoolError::Closed))
    }

    /// Removes delivered records from `sink`'s queue and adds `dead` letters, in one
    /// commit.
    pub async fn delivered(
        &self,
        sink: SinkId,
        seqs: Vec<u64>,
        dead: Vec<DeadLetter>,
    ) -> Result<(), SpoolError> {
        let mut change = Change {
            delivered: Some((sink, seqs)),
            ..Change::default()
        };
        for letter in &dead {
            change.dead_letter(letter);
        }
        self.commit(change).await
    }

    /// Up to `max_records` records (and about `max_bytes`) queued for `sink`, from
    /// sequence number `from` on, in order: from memory when it holds them, else from
    /// the disk.
    pub fn take(
        &self,
        sink: SinkId,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Record)>, SpoolError> {
        if let Some(window) = self.take_recent(sink, from, max_records, max_bytes) {
            return Ok(window);
        }
        let (window, reached_end) = self.read_disk(sink, from, max_records, max_bytes)?;
        if reached_end {
            // Caught up with the disk: from here on, what the writer commits is in memory.
            self.shared.sinks[sink]
                .recent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .caught_up();
        }
        Ok(window)
    }

    /// Like [`Spool::take`], from memory only: `None` when memory cannot vouch for the
    /// range and the disk must be read. Never blocks on I/O.
    pub fn take_recent(
        &self,
        sink: SinkId,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Option<Vec<(u64, Record)>> {
        self.shared.sinks[sink]
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(from, max_records, max_bytes)
    }

    /// Up to `max_records` records (and about `max_bytes`) queued for `sink` on disk,
    /// from sequence number `from` on, in order, and whether that reached the end of the
    /// queue. Entries that cannot be decoded are logged and left in place.
    pub fn read_disk(
        &self,
        sink: SinkId,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<(Vec<(u64, Record)>, bool), SpoolError> {
        let (window, reached_end) = self
            .shared
            .index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .window(sink, from, max_records, max_bytes);
        let mut out = Vec::with_capacity(window.len());
        for (seq, loc, source) in window {
            let record = log::read_record(&source, seq, loc)
                .and_then(|bytes| codec::decode_record(&bytes).map_err(|e| e.to_string()));
            match record {
                Ok(record) => out.push((seq, record)),
                Err(error) => tracing::error!(
                    sink = sink.name(),
                    seq,
                    %error,
                    "a spooled record cannot be read; left in the spool"
                ),
            }
        }
        Ok((out, reached_end))
    }

    /// Dead letters with keys from `from` on, at most `limit`, oldest first.
    pub fn dead_letters(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, DeadLetter)>, SpoolError> {
        let storage = |e: &dyn std::fmt::Display| SpoolError::Storage(e.to_string());
        let txn = self.shared.db.begin_read().map_err(|e| storage(&e))?;
        let table = txn.open_table(DEAD_LETTERS).map_err(|e| storage(&e))?;
        let mut out = Vec::new();
        for entry in table.range(from..).map_err(|e| storage(&e))? {
            if out.len() >= limit {
                break;
            }
            let (key, value) = entry.map_err(|e| storage(&e))?;
            match codec::decode_dead_letter(value.value()) {
                Ok(dead) => out.push((key.value(), dead)),
                Err(error) => {
                    tracing::error!(key = key.value(), %error, "a dead letter cannot be decoded")
                }
            }
        }
        Ok(out)
    }

    /// One dead letter by key.
    pub fn dead_letter(&self, key: u64) -> Result<Option<DeadLetter>, SpoolError> {
        Ok(self
            .dead_letters(key, 1)?
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, dead)| dead))
    }

    /// What the spool holds and has done.
    pub fn stats(&self) -> SpoolStats {
        let shared = &self.shared;
        // Read before the queues, so that `oldest > last_seq` means "all of it delivered".
        let last_seq = shared.last_seq.load(Ordering::Acquire);
        let oldest = |sink: SinkId| -> Option<u64> {
            shared
                .index
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .oldest(sink)
        };
        SpoolStats {
            queues: SinkId::ALL
                .iter()
                .map(|&sink| QueueStats {
                    sink,
                    records: shared.sinks[sink].records.load(Ordering::Relaxed),
                    bytes: shared.sinks[sink].bytes.load(Ordering::Relaxed),
                    oldest: oldest(sink),
                })
                .collect(),
            last_seq,
            dead_letters: shared.dead_letters.load(Ordering::Relaxed),
            dead_letter_bytes: shared.dead_letter_bytes.load(Ordering::Relaxed),
            max_dead_letter_bytes: shared.dead_letter_limit.load(Ordering::Relaxed),
            refused_dead_letters_full: shared.refused_dead_full.load(Ordering::Relaxed),
            durable_commits: shared.durable_commits.load(Ordering::Relaxed),
            commits: shared.commits.load(Ordering::Relaxed),
            max_bytes_per_sink: shared.limit,
            refused_full: shared.refused_full.load(Ordering::Relaxed),
        }
    }

    /// Sets `spool.max_dead_letter_bytes` (at start, and on a reload).
    pub fn set_dead_letter_limit(&self, bytes: u64) {
        self.shared
            .dead_letter_limit
            .store(bytes, Ordering::Relaxed);
    }

    /// Whether `bytes` more of dead letters fit under the limit now.
    pub fn dead_letters_fit(&self, bytes: u64) -> bool {
        let shared = &self.shared;
        shared
            .dead_letter_bytes
            .load(Ordering::Relaxed)
            .saturating_add(bytes)
            <= shared.dead_letter_limit.load(Ordering::Relaxed)
    }

    /// Marks whether `sink`'s delivery is failing.
    pub fn set_failing(&self, sink: SinkId, failing: bool) {
        self.shared.sinks[sink]
            .failing
            .store(failing, Ordering::Relaxed);
    }

    /// The sinks whose delivery is failing now.
    pub fn failing_sinks(&self) -> Vec<SinkId> {
        SinkId::ALL
            .into_iter()
            .filter(|&sink| self.shared.sinks[sink].failing.load(Ordering::Relaxed))
            .collect()
    }

    /// Resolves once records were delivered from a queue since the last caller was
    /// woken: a writer refused with [`SpoolError::Full`] waits here instead of for a
    /// fixed time. Waiters are woken one at a time; one that then stored its messages
    /// calls [`Spool::room_made`] so that the next tries too, and the turn stops at the
    /// first that finds no room, so a full spool costs about one refused try per delivered
    /// window rather than one per waiting session.
    pub async fn room(&self) {
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.shared.waiting_for_room.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.shared.waiting_for_room);
        self.shared.room.notified().await;
    }

    /// Whether writers wait for room now: one that can wait should queue behind them
    /// rather than take the room delivery made for them.
    pub fn waiting_for_room(&self) -> bool {
        self.shared.waiting_for_room.load(Ordering::Relaxed) > 0
    }

    /// Whether a change of about `bytes` might be refused as [`SpoolError::Full`] by the
    /// time it is written: a queue is refusing now, or is within `bytes` of half its
    /// limit (the other half is for what other writers add meanwhile). A writer that would
    /// try again after such a refusal keeps a copy of its batch only then.
    pub fn may_refuse_for_room(&self, bytes: u64) -> bool {
        let shared = &self.shared;
        SinkId::ALL.into_iter().any(|sink| {
            let state = &shared.sinks[sink];
            state.full.load(Ordering::Relaxed)
                || state.bytes.load(Ordering::Relaxed).saturating_add(bytes) > shared.limit / 2
        })
    }

    /// Passes the turn on to the next waiter in [`Spool::room`] (there may be room left).
    pub fn room_made(&self) {
        self.shared.room.notify_one();
    }

    /// Records waiting for `sink`.
    pub fn depth(&self, sink: SinkId) -> u64 {
        self.shared.sinks[sink].records.load(Ordering::Relaxed)
    }

    /// A receiver that changes whenever records are queued for `sink`.
    pub fn watch(&self, sink: SinkId) -> watch::Receiver<u64> {
        self.shared.sinks[sink].appended.subscribe()
    }

    /// Stops taking changes, commits what is queued, and waits for the writer.
    pub fn close(&self) {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(writer) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = writer.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::route::{Decision, Destination};
    use crate::spool::legacy::legacy_table;
    use crate::spool::recent::RECENT_MAX_RECORDS;

    fn record(id: &str, payload: &[u8]) -> Record {
        Record {
            message: Message {
                id: id.to_string(),
                device_id: "dev-1".to_string(),
                topic: "t/1".to_string(),
                content_type: String::new(),
                qos: 1,
                attributes: vec![("k".to_string(), "v".to_string())],
                received_at_ms: 7,
                payload: payload.to_vec(),
            },
            decision: Decision {
                destination: Destination::Kinesis {
                    stream: "s".to_string(),
                    partition_key: "dev-1".to_string(),
                    explicit_hash_key: None,
                },
                rule: "rule:x".to_string(),
                reason: "because".to_string(),
            },
        }
    }

    #[tokio::test]
    async fn records_survive_a_reopen_until_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let mut change = Change::default();
        for i in 0..5 {
            change.queue(SinkId::Kinesis, record(&format!("m{i}"), b"hello"));
        }
        spool.commit(change).await.unwrap();
        let read = spool.read_disk(SinkId::Kinesis, 0, 100, 1 << 20).unwrap().0;
        assert_eq!(read.len(), 5);
        assert_eq!(read[2].1.message.id, "m2");
        assert_eq!(read[2].1.decision, record("m2", b"").decision);
        let first_two: Vec<u64> = read[..2].iter().map(|(seq, _)| *seq).collect();
        spool
            .delivered(SinkId::Kinesis, first_two, Vec::new())
            .await
            .unwrap();
        spool.close();
        drop(spool);

        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let read = spool.read_disk(SinkId::Kinesis, 0, 100, 1 << 20).unwrap().0;
        let ids: Vec<&str> = read.iter().map(|(_, r)| r.message.id.as_str()).collect();
        assert_eq!(ids, ["m2", "m3", "m4"]);
        assert_eq!(spool.depth(SinkId::Kinesis), 3);
        // New records are numbered after the old ones, so order holds across restarts.
        let mut change = Change::default();
        change.queue(SinkId::Kinesis, record("m5", b"x"));
        spool.commit(change).await.unwrap();
        let read = spool.read_disk(SinkId::Kinesis, 0, 100, 1 << 20).unwrap().0;
        assert_eq!(read.last().unwrap().1.message.id, "m5");
    }

    /// Delivery takes every record once and in order, whether it comes from memory or,
    /// past the in-memory cap, from the disk, and whatever the interleaving with commits.
    #[tokio::test]
    async fn take_yields_every_record_once_in_order_across_memory_and_disk() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let mut next = 0usize;
        let mut commit = async |n: usize| {
            let mut change = Change::default();
            for _ in 0..n {
                change.queue(SinkId::Local, record(&format!("m{next}"), b"p"));
                next += 1;
            }
            spool.commit(change).await.unwrap();
        };
        let mut seen = Vec::new();
        let mut cursor = 0;
        let mut take = |spool: &Spool, seen: &mut Vec<String>| {
            let window = spool.take(SinkId::Local, cursor, 700, 1 << 20).unwrap();
            if let Some((seq, _)) = window.last() {
                cursor = seq + 1;
            }
            seen.extend(window.into_iter().map(|(_, r)| r.message.id));
        };
        commit(10).await;
        take(&spool, &mut seen); // from disk (fresh start), then memory takes over
        commit(10).await;
        take(&spool, &mut seen); // from memory
        commit(RECENT_MAX_RECORDS + 50).await; // over the cap: spilled
        commit(5).await;
        for _ in 0..40 {
            take(&spool, &mut seen);
        }
        commit(3).await;
        take(&spool, &mut seen);
        let expected: Vec<String> = (0..RECENT_MAX_RECORDS + 78)
            .map(|i| format!("m{i}"))
            .collect();
        assert_eq!(seen.len(), expected.len());
        assert!(seen == expected, "every record once, in order");
    }

    #[tokio::test]
    async fn a_full_queue_refuses_the_whole_change_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 2_000).unwrap();
        let mut change = Change::default();
        change.queue(SinkId::Kinesis, record("a", &[1; 900]));
        spool.commit(change).await.unwrap();
        let mut change = Change::default();
        change.queue(SinkId::Local, record("b", &[1; 100]));
        change.queue(SinkId::Kinesis, record("c", &[1; 1_500]));
        let error = spool.commit(change).await.unwrap_err();
        assert!(
            matches!(
                error,
                SpoolError::Full {
                    sink: "kinesis",
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(
            spool.depth(SinkId::Local),
            0,
            "nothing of a refused change is kept"
        );
        // Other sinks are not affected by a full one.
        let mut change = Change::default();
        change.queue(SinkId::Local, record("d", &[1; 1_500]));
        spool.commit(change).await.unwrap();
        // Delivery frees room.
        let seqs = spool
            .read_disk(SinkId::Kinesis, 0, 10, 1 << 20)
            .unwrap()
            .0
            .into_iter()
            .map(|(seq, _)| seq)
            .collect();
        spool
            .delivered(SinkId::Kinesis, seqs, Vec::new())
            .await
            .unwrap();
        let mut change = Change::default();
        change.queue(SinkId::Kinesis, record("c", &[1; 1_500]));
        spool.commit(change).await.unwrap();
    }

    /// A writer refused for lack of room waits for its turn: it is woken when delivery
    /// removed records (not before), and while it waits, others see that someone does.
    #[tokio::test]
    async fn a_writer_waiting_for_room_is_woken_by_a_delivery() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(dir.path(), 2_000).unwrap());
        let mut change = Change::default();
        change.queue(SinkId::Local, record("a", &[1; 1_500]));
        spool.commit(change).await.unwrap();
        let mut change = Change::default();
        change.queue(SinkId::Local, record("b", &[1; 1_500]));
        assert!(matches!(
            spool.commit(change).await,
            Err(SpoolError::Full { .. })
        ));
        assert!(!spool.waiting_for_room());
        let waiter = tokio::spawn({
            let spool = spool.clone();
            async move { spool.room().await }
        });
        while !spool.waiting_for_room() {
            tokio::task::yield_now().await;
        }
        // A commit that removes nothing does not wake it.
        let mut change = Change::default();
        change.queue(SinkId::Kinesis, record("k", b"x"));
        spool.commit(change).await.unwrap();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let seqs = spool.read_disk(SinkId::Local, 0, 10, 1 << 20).unwrap().0;
        let seqs = seqs.into_iter().map(|(seq, _)| seq).collect();
        spool
            .delivered(SinkId::Local, seqs, Vec::new())
            .await
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("woken by the delivery")
            .unwrap();
        assert!(!spool.waiting_for_room());
        let mut change = Change::default();
        change.queue(SinkId::Local, record("b", &[1; 1_500]));
        spool.commit(change).await.unwrap();
    }

    #[tokio::test]
    async fn dead_letters_are_listed_and_removed() {
        use crate::spool::codec::Origin;
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let mut change = Change::default();
        change.queue(SinkId::Kinesis, record("a", b"1"));
        spool.commit(change).await.unwrap();
        let (seq, rejected) = spool
            .read_disk(SinkId::Kinesis, 0, 1, 1 << 20)
            .unwrap()
            .0
            .remove(0);
        let dead = DeadLetter {
            record: rejected,
            origin: Origin::Sink {
                sink: "kinesis".to_string(),
            },
            reason: "ResourceNotFoundException".to_string(),
            at_ms: 9,
        };
        spool
            .delivered(SinkId::Kinesis, vec![seq], vec![dead])
            .await
            .unwrap();
        assert_eq!(spool.depth(SinkId::Kinesis), 0);
        let letters = spool.dead_letters(0, 10).unwrap();
        assert_eq!(letters.len(), 1);
        let (key, letter) = &letters[0];
        assert_eq!(letter.record.message.id, "a");
        assert_eq!(letter.reason, "ResourceNotFoundException");
        assert!(spool.dead_letter(*key).unwrap().is_some());
        let mut change = Change::default();
        change.remove_dead_letter(*key);
        spool.commit(change).await.unwrap();
        assert!(spool.dead_letters(0, 10).unwrap().is_empty());
        assert_eq!(spool.stats().dead_letters, 0);
    }

    /// The names of the segment files (not the spares), in order.
    fn segments(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join("queue"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.ends_with(".log"))
            .collect();
        names.sort();
        names
    }

    /// The message ids queued for `sink`, in order, read from the disk.
    fn ids(spool: &Spool, sink: SinkId) -> Vec<String> {
        let window = spool.read_disk(sink, 0, 100_000, usize::MAX).unwrap().0;
        window.into_iter().map(|(_, r)| r.message.id).collect()
    }

    fn seqs(spool: &Spool, sink: SinkId) -> Vec<u64> {
        let window = spool.read_disk(sink, 0, 100_000, usize::MAX).unwrap().0;
        window.into_iter().map(|(seq, _)| seq).collect()
    }

    /// The entry for record `seq` of `sink` as segment `segment` holds it, in today's
    /// format (`legacy`: without the marker).
    fn entry(segment: u64, sink: SinkId, seq: u64, id: &str, legacy: bool) -> Vec<u8> {
        let mut body = vec![1, sink.code()];
        body.extend_from_slice(&seq.to_le_bytes());
        body.extend_from_slice(&codec::encode_record(&record(id, b"9")));
        let mut entry = Vec::new();
        if !legacy {
            entry.extend_from_slice(&log::MARKER.to_le_bytes());
        }
        entry.extend_from_slice(&(body.len() as u32).to_le_bytes());
        entry.extend_from_slice(&log::checksum(segment, &body).to_le_bytes());
        entry.extend_from_slice(&body);
        entry
    }

    /// A write cut short by a crash (an entry whose body never made it) ends what is read
    /// of a segment on the next start: what came before is kept, and new records go to a
    /// new segment.
    #[tokio::test]
    async fn a_torn_write_ends_the_segment_and_what_came_before_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let mut change = Change::default();
        change.queue(SinkId::Local, record("a", b"1"));
        change.queue(SinkId::Local, record("b", b"2"));
        spool.commit(change).await.unwrap();
        spool.close();
        drop(spool);
        let name = segments(dir.path()).pop().unwrap();
        let segment: u64 = name.strip_suffix(".log").unwrap().parse().unwrap();
        let path = dir.path().join("queue").join(&name);
        let mut bytes = std::fs::read(&path).unwrap();
        // Where the data ends, the zeros written ahead of it begin.
        let end = bytes.len() - bytes.iter().rev().take_while(|&&b| b == 0).count();
        let torn = entry(segment, SinkId::Local, 99, "ghost", false);
        bytes.truncate(end);
        bytes.extend_from_slice(&torn[..torn.len() - 5]);
        std::fs::write(&path, &bytes).unwrap();

        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.depth(SinkId::Local), 2);
        let mut change = Change::default();
        change.queue(SinkId::Local, record("c", b"3"));
        spool.commit(change).await.unwrap();
        spool.close();
        drop(spool);
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&spool, SinkId::Local), ["a", "b", "c"]);
    }

    /// One damaged entry (a flipped byte on the disk) costs that entry alone: replay finds
    /// the next whole entry again by its marker, and counts the damage.
    #[tokio::test]
    async fn a_damaged_entry_is_skipped_and_the_rest_of_its_segment_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let mut change = Change::default();
        for id in ["a", "b", "c", "d", "e"] {
            change.queue(SinkId::Kinesis, record(id, b"payload"));
        }
        spool.commit(change).await.unwrap();
        spool.close();
        drop(spool);
        let name = segments(dir.path()).pop().unwrap();
        let path = dir.path().join("queue").join(&name);
        let mut bytes = std::fs::read(&path).unwrap();
        // The second entry starts at the second marker; flip a byte inside its body.
        let marker = log::MARKER.to_le_bytes();
        let starts: Vec<usize> = bytes
            .windows(4)
            .enumerate()
            .filter(|(_, w)| *w == marker)
            .map(|(at, _)| at)
            .collect();
        assert_eq!(starts.len(), 5);
        bytes[starts[1] + 20] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();

        let damaged = || crate::metrics::METRICS.spool_damaged_entries.get();
        let before = damaged();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&spool, SinkId::Kinesis), ["a", "c", "d", "e"]);
        assert_eq!(spool.depth(SinkId::Kinesis), 4);
        assert!(damaged() > before, "the damaged entry is counted");
    }

    /// Segments written before entries had a marker are still read.
    #[tokio::test]
    async fn segments_of_the_format_without_markers_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("queue")).unwrap();
        let mut bytes = entry(1, SinkId::IotCore, 1, "old-1", true);
        bytes.extend(entry(1, SinkId::IotCore, 2, "old-2", true));
        bytes.extend_from_slice(&[0; 64]);
        std::fs::write(
            dir.path().join("queue").join(format!("{:020}.log", 1)),
            &bytes,
        )
        .unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&spool, SinkId::IotCore), ["old-1", "old-2"]);
        let mut change = Change::default();
        change.queue(SinkId::IotCore, record("new", b"y"));
        spool.commit(change).await.unwrap();
        assert_eq!(seqs(&spool, SinkId::IotCore), [1, 2, 3]);
    }

    /// In the older format a bad entry cannot be skipped (there is no marker to find the
    /// next by), but it is counted and logged rather than passed over in silence.
    #[tokio::test]
    async fn a_bad_entry_in_a_segment_without_markers_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("queue")).unwrap();
        let mut bytes = entry(1, SinkId::IotCore, 1, "old-1", true);
        let mut damaged = entry(1, SinkId::IotCore, 2, "old-2", true);
        damaged[12] ^= 0x40;
        bytes.extend(damaged);
        std::fs::write(
            dir.path().join("queue").join(format!("{:020}.log", 1)),
            &bytes,
        )
        .unwrap();
        let counted = || crate::metrics::METRICS.spool_damaged_entries.get();
        let before = counted();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&spool, SinkId::IotCore), ["old-1"]);
        assert!(counted() > before);
    }

    /// Segments are cut at their size and retired once every record in them is
    /// delivered, in whatever order: two kept for reuse, the rest deleted; the newest
    /// stays.
    #[tokio::test]
    async fn delivered_segments_are_reused_or_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open_with(dir.path(), 1 << 30, 1_000).unwrap();
        for round in 0..10 {
            let mut change = Change::default();
            for i in 0..5 {
                change.queue(SinkId::Kinesis, record(&format!("k{round}.{i}"), &[7; 100]));
                change.queue(SinkId::Local, record(&format!("l{round}.{i}"), &[7; 100]));
            }
            spool.commit(change).await.unwrap();
        }
        assert_eq!(segments(dir.path()).len(), 10, "{:?}", segments(dir.path()));
        let kinesis = seqs(&spool, SinkId::Kinesis);
        let local = seqs(&spool, SinkId::Local);
        // Kinesis delivers everything, newest window first; local only its first half.
        for window in kinesis.chunks(7).rev() {
            spool
                .delivered(SinkId::Kinesis, window.to_vec(), Vec::new())
                .await
                .unwrap();
        }
        spool
            .delivered(SinkId::Local, local[..25].to_vec(), Vec::new())
            .await
            .unwrap();
        // Rounds 0-4 are all delivered; rounds 5-9 hold local records; the deliveries
        // went to a new segment, the tenth round having filled the last one.
        assert_eq!(segments(dir.path()).len(), 6, "{:?}", segments(dir.path()));
        spool.close();
        drop(spool);

        let spool = Spool::open_with(dir.path(), 1 << 30, 1_000).unwrap();
        assert_eq!(spool.depth(SinkId::Kinesis), 0);
        assert_eq!(seqs(&spool, SinkId::Local), local[25..].to_vec());
        spool
            .delivered(SinkId::Local, local[25..].to_vec(), Vec::new())
            .await
            .unwrap();
        assert_eq!(
            segments(dir.path()).len(),
            1,
            "only the newest segment is left"
        );
        assert_eq!(spool.stats().queues.iter().map(|q| q.bytes).sum::<u64>(), 0);
        let files = || std::fs::read_dir(dir.path().join("queue")).unwrap().count();
        assert_eq!(files(), 3, "the newest segment and two spares");

        // Spares become the next segments; what they held before does not count.
        for round in 0..4 {
            let mut change = Change::default();
            for i in 0..5 {
                change.queue(SinkId::Local, record(&format!("n{round}.{i}"), &[8; 100]));
            }
            spool.commit(change).await.unwrap();
        }
        // Four rounds fill the newest segment and then both spares.
        assert_eq!(segments(dir.path()).len(), 3);
        assert_eq!(files(), 3, "both spares reused");
        spool.close();
        drop(spool);
        let spool = Spool::open_with(dir.path(), 1 << 30, 1_000).unwrap();
        let expected: Vec<String> = (0..4)
            .flat_map(|round| (0..5).map(move |i| format!("n{round}.{i}")))
            .collect();
        assert_eq!(ids(&spool, SinkId::Local), expected);
        assert_eq!(spool.depth(SinkId::Kinesis), 0);
    }

    /// A spool written before the queue log kept its queues in redb: opening it moves
    /// them to the log, in order, and new records are numbered after them.
    #[tokio::test]
    async fn queues_of_an_older_spool_are_moved_to_the_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Database::builder()
                .create(dir.path().join("spool.redb"))
                .unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut table = txn.open_table(legacy_table(SinkId::IotCore)).unwrap();
                for (seq, id) in [(4u64, "old-a"), (9, "old-b")] {
                    let bytes = codec::encode_record(&record(id, b"x"));
                    table.insert(seq, bytes.as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(seqs(&spool, SinkId::IotCore), [4, 9]);
        let mut change = Change::default();
        change.queue(SinkId::IotCore, record("new", b"y"));
        spool.commit(change).await.unwrap();
        spool.close();
        drop(spool);

        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let read = spool.read_disk(SinkId::IotCore, 0, 10, 1 << 20).unwrap().0;
        let ids: Vec<(u64, &str)> = read
            .iter()
            .map(|(seq, r)| (*seq, r.message.id.as_str()))
            .collect();
        assert_eq!(ids, [(4, "old-a"), (9, "old-b"), (10, "new")]);
    }
}
