//! The spool's writer thread: group commit. It takes every change waiting, writes them
//! in one go (one `pwrite` and one `fdatasync` for the queue log, one redb transaction
//! for dead letters), and only then answers them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use crate::record::{PerSink, SinkId};
use crate::spool::change::Op;
use crate::spool::dead::commit_dead_letters;
use crate::spool::{Shared, SpoolError, log};

/// Most requests one commit takes; the rest wait for the next.
const MAX_GROUP: usize = 4_096;

/// How long a commit may wait for more changes when the last one carried several (see
/// `write_loop`): short next to an fsync's latency, long enough for concurrent requests
/// to join.
const GROUP_LINGER: std::time::Duration = std::time::Duration::from_micros(200);

/// The writer thread: one write (and `fsync`) per group of waiting changes.
pub(super) fn write_loop(
    shared: &Shared,
    mut log: log::Log,
    mut next_seq: u64,
    queue: &mpsc::Receiver<Op>,
) {
    let mut last_group = 0;
    while let Ok(first) = queue.recv() {
        let mut ops = vec![first];
        ops.extend(queue.try_iter().take(MAX_GROUP - 1));
        // Under concurrent load (the last commit carried several changes), wait a moment
        // for more before paying for an fsync: fewer fsyncs leave more CPU for requests.
        // A lone writer (one device, one request at a time) never waits.
        if last_group > 1 && ops.len() < last_group && ops[0].change.durable() {
            let until = std::time::Instant::now() + GROUP_LINGER;
            while ops.len() < last_group.min(MAX_GROUP) {
                match queue.recv_timeout(until.saturating_duration_since(std::time::Instant::now()))
                {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
        }
        // Only changes that need the fsync count: a delivery's deletions riding along do
        // not make a lone writer look concurrent.
        last_group = ops.iter().filter(|op| op.change.durable()).count();
        let outcome = apply(shared, &mut log, &mut next_seq, &ops);
        if let Some(error) = &outcome.error {
            tracing::error!(%error, "spool commit failed");
        }
        // Records go to memory before anyone is told about them: a delivery task woken by
        // `appended` must find them there.
        let mut replies = Vec::with_capacity(ops.len());
        {
            let mut recent = shared
                .sinks
                .each_ref()
                .map(|s| s.recent.lock().unwrap_or_else(|p| p.into_inner()));
            let mut seqs = outcome.seqs.into_iter();
            let done = outcome.results.into_iter().zip(outcome.written);
            for (op, (result, written)) in ops.into_iter().zip(done) {
                if written {
                    let queued = op.change.queued.into_iter().zip(&mut seqs);
                    for ((sink, _, record), seq) in queued {
                        recent[sink].remember(seq, record);
                    }
                }
                replies.push((op.reply, result));
            }
        }
        shared.commits.fetch_add(1, Ordering::Relaxed);
        shared.last_seq.store(next_seq - 1, Ordering::Release);
        if outcome.durable {
            shared.durable_commits.fetch_add(1, Ordering::Relaxed);
        }
        for sink in SinkId::ALL {
            add_signed(&shared.sinks[sink].records, outcome.records[sink]);
            add_signed(&shared.sinks[sink].bytes, outcome.bytes[sink]);
            if let Some(seq) = outcome.last_seq[sink] {
                shared.sinks[sink].appended.send_replace(seq);
            }
            // Room again once a tenth of the queue has drained.
            let bytes = shared.sinks[sink].bytes.load(Ordering::Relaxed);
            if bytes < shared.limit - shared.limit / 10
                && shared.sinks[sink].full.swap(false, Ordering::Relaxed)
            {
                tracing::info!(sink = sink.name(), bytes, "spool has room again; accepting");
            }
        }
        // Records delivered: room for a writer waiting for it (`Spool::room`).
        if SinkId::ALL.into_iter().any(|sink| outcome.bytes[sink] < 0) {
            shared.room.notify_one();
        }
        add_signed(&shared.dead_letters, outcome.dead_letters);
        add_signed(&shared.dead_letter_bytes, outcome.dead_letter_bytes);
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
    }
}

fn add_signed(counter: &AtomicU64, delta: i64) {
    if delta >= 0 {
        counter.fetch_add(delta as u64, Ordering::Relaxed);
    } else {
        counter.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
    }
}

/// What one group commit did.
#[derive(Default)]
struct Outcome {
    /// Per change: its answer.
    results: Vec<Result<(), SpoolError>>,
    /// Per change: its records are in the queue log (even if another part of it failed,
    /// they will be delivered).
    written: Vec<bool>,
    /// Something was `fsync`ed.
    durable: bool,
    records: PerSink<i64>,
    bytes: PerSink<i64>,
    dead_letters: i64,
    dead_letter_bytes: i64,
    last_seq: PerSink<Option<u64>>,
    /// The sequence numbers given to written records, in order.
    seqs: Vec<u64>,
    /// What failed, for the log.
    error: Option<String>,
}

impl Outcome {
    /// Nothing of `changes` changes was written.
    fn failed(changes: usize, error: String) -> Outcome {
        Outcome {
            results: vec![Err(SpoolError::Storage(error.clone())); changes],
            written: vec![false; changes],
            error: Some(error),
            ..Outcome::default()
        }
    }
}

/// Applies a group of changes: records (and deliveries, unless dead letters come with
/// the group) in one write to the queue log, `fsync`ed if it adds records; then dead
/// letters in one redb transaction; then the deliveries held back for them.
fn apply(shared: &Shared, log: &mut log::Log, next_seq: &mut u64, ops: &[Op]) -> Outcome {
    if let Err(error) = log.begin(&shared.index, *next_seq) {
        return Outcome::failed(ops.len(), error.to_string());
    }
    // A delivery that dead-letters records is written only once its dead letters are on
    // disk; so are the other deliveries of the group, to keep one order.
    let deliveries_last = ops.iter().any(|op| !op.change.dead.is_empty());
    let mut results = Vec::with_capacity(ops.len());
    let mut accepted = vec![false; ops.len()];
    let mut staged = Vec::new();
    let mut adding: PerSink<i64> = PerSink::default();
    let mut dead_added: Vec<(u64, &[u8])> = Vec::new();
    let mut dead_removed: Vec<u64> = Vec::new();
    let mut dead_adding = 0u64;
    let dead_limit = shared.dead_letter_limit.load(Ordering::Relaxed);
    // The accepted changes' deliveries: (sink, sequence numbers).
    let mut deliveries: Vec<(SinkId, &[u64])> = Vec::new();
    let mut seq = *next_seq;
    for (n, op) in ops.iter().enumerate() {
        let change = &op.change;
        let mut more: PerSink<i64> = PerSink::default();
        for (sink, bytes, _) in &change.queued {
            more[*sink] += bytes.len() as i64;
        }
        let full = SinkId::ALL.into_iter().find(|&sink| {
            let queued = shared.sinks[sink].bytes.load(Ordering::Relaxed) as i64 + adding[sink];
            more[sink] > 0 && (queued + more[sink]) as u64 > shared.limit
        });
        if let Some(sink) = full {
            shared.refused_full.fetch_add(1, Ordering::Relaxed);
            if !shared.sinks[sink].full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    sink = sink.name(),
                    limit = shared.limit,
                    "spool full: refusing messages for this sink with 503 until it drains"
                );
            }
            results.push(Err(SpoolError::Full {
                sink: sink.name(),
                bytes: (shared.sinks[sink].bytes.load(Ordering::Relaxed) as i64 + adding[sink])
                    as u64,
                limit: shared.limit,
            }));
            continue;
        }
        let dead_bytes: u64 = change.dead.iter().map(|d| d.len() as u64).sum();
        let dead_kept = shared.dead_letter_bytes.load(Ordering::Relaxed) + dead_adding;
        if change.bounded && dead_bytes > 0 && dead_kept + dead_bytes > dead_limit {
            shared.refused_dead_full.fetch_add(1, Ordering::Relaxed);
            crate::metrics::METRICS.dead_letter_refused("store_full");
            results.push(Err(SpoolError::DeadLettersFull {
                bytes: dead_kept,
                limit: dead_limit,
            }));
            continue;
        }
        dead_adding += dead_bytes;
        accepted[n] = true;
        results.push(Ok(()));
        for (sink, bytes, _) in &change.queued {
            adding[*sink] += bytes.len() as i64;
            staged.push((*sink, seq, log.stage_record(*sink, seq, bytes)));
            seq += 1;
        }
        for bytes in &change.dead {
            dead_added.push((seq, bytes.as_slice()));
            seq += 1;
        }
        dead_removed.extend(&change.remove_dead);
        if let Some((sink, seqs)) = &change.delivered {
            deliveries.push((*sink, seqs));
            if !deliveries_last {
                log.stage_delivery(*sink, seqs);
            }
        }
    }
    let adds_records = !staged.is_empty();
    // Numbers handed out are never used again, even if the write fails.
    *next_seq = seq;
    if let Err(error) = log.write(adds_records) {
        return Outcome::failed(ops.len(), error.to_string());
    }
    let mut outcome = Outcome {
        written: accepted.clone(),
        durable: adds_records,
        ..Outcome::default()
    };
    {
        let mut index = shared.index.lock().unwrap_or_else(|p| p.into_inner());
        for (sink, seq, loc) in staged {
            index.insert(sink, seq, loc);
            outcome.seqs.push(seq);
            outcome.records[sink] += 1;
            outcome.bytes[sink] += loc.len() as i64;
            outcome.last_seq[sink] = Some(seq);
        }
    }
    let dead_ok = if dead_added.is_empty() && dead_removed.is_empty() {
        true
    } else {
        match commit_dead_letters(shared, &dead_added, &dead_removed) {
            Ok((delta, bytes)) => {
                outcome.dead_letters = delta;
                outcome.dead_letter_bytes = bytes;
                outcome.durable = true;
                true
            }
            Err(error) => {
                outcome.error = Some(error);
                false
            }
        }
    };
    let mut deliveries_written = !deliveries_last;
    if deliveries_last && dead_ok {
        for &(sink, seqs) in &deliveries {
            log.stage_delivery(sink, seqs);
        }
        match log.write(false) {
            Ok(()) => deliveries_written = true,
            Err(error) => outcome.error = Some(error.to_string()),
        }
    }
    if deliveries_written {
        let mut index = shared.index.lock().unwrap_or_else(|p| p.into_inner());
        for &(sink, seqs) in &deliveries {
            for &seq in seqs {
                if let Some(loc) = index.remove(sink, seq) {
                    outcome.records[sink] -= 1;
                    outcome.bytes[sink] -= loc.len() as i64;
                }
            }
        }
        log.drop_delivered(&mut index);
    }
    // A change fails if a part of it did not make it; its records, if written, stay.
    for ((op, result), accepted) in ops.iter().zip(&mut results).zip(&accepted) {
        let change = &op.change;
        let dead_failed = !dead_ok && (!change.dead.is_empty() || !change.remove_dead.is_empty());
        let delivery_failed = !deliveries_written && change.delivered.is_some();
        if *accepted && (dead_failed || delivery_failed) {
            let error = outcome.error.clone().unwrap_or_default();
            *result = Err(SpoolError::Storage(error));
        }
    }
    outcome.results = results;
    outcome
}
