//! A sink's most recent committed records, kept in memory so that delivery in the
//! steady state does not read back what it was just handed.

use crate::record::Record;

/// Most records kept in memory per sink for delivery; beyond them (a slow or failing
/// sink) delivery reads the disk until it has caught up.
pub(super) const RECENT_MAX_RECORDS: usize = 20_000;

/// A sink's most recent committed records, in memory, so that delivery in the steady
/// state does not read back and decode what it was just handed. The disk stays the
/// source of truth: whenever this cannot vouch for a range, delivery reads the disk.
pub(super) struct Recent {
    /// Committed records with sequence numbers from `covered_from` on, in order; valid
    /// only while not `spilled`.
    entries: std::collections::VecDeque<(u64, Record)>,
    covered_from: u64,
    /// Entries were dropped (the cap was hit, or this is a fresh start): read the disk.
    spilled: bool,
    /// The last sequence number committed for this sink.
    last_committed: u64,
}

impl Recent {
    /// Nothing in memory yet, the next record being `next_seq`: delivery reads the disk
    /// first.
    pub(super) fn new(next_seq: u64) -> Recent {
        Recent {
            entries: std::collections::VecDeque::new(),
            covered_from: next_seq,
            spilled: true,
            last_committed: next_seq - 1,
        }
    }

    /// Up to `max_records` records (and about `max_bytes`) from `from` on, taken out;
    /// `None` when memory cannot vouch for the range and the disk must be read.
    pub(super) fn take(
        &mut self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Option<Vec<(u64, Record)>> {
        if self.spilled || self.covered_from > from {
            return None;
        }
        while self.entries.front().is_some_and(|(seq, _)| *seq < from) {
            self.entries.pop_front();
        }
        let mut out = Vec::new();
        let mut size = 0;
        while let Some((_, record)) = self.entries.front() {
            let len = record.message.payload.len();
            if !out.is_empty() && (out.len() >= max_records || size + len > max_bytes) {
                break;
            }
            size += len;
            out.extend(self.entries.pop_front());
        }
        Some(out)
    }

    /// Delivery caught up with the disk: from here on, what the writer commits is in
    /// memory.
    pub(super) fn caught_up(&mut self) {
        if self.spilled {
            self.spilled = false;
            self.entries.clear();
            self.covered_from = self.last_committed + 1;
        }
    }

    /// Keeps a committed record in memory for delivery, unless memory is over its cap
    /// (then delivery reads the disk until it catches up).
    pub(super) fn remember(&mut self, seq: u64, record: Record) {
        self.last_committed = seq;
        if self.spilled {
            return;
        }
        if self.entries.len() >= RECENT_MAX_RECORDS {
            self.spilled = true;
            self.entries.clear();
        } else {
            self.entries.push_back((seq, record));
        }
    }
}
