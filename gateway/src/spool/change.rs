//! A change for the spool's writer: records to queue, dead letters to add and remove,
//! deliveries to record; and the request that carries it to the writer.

use tokio::sync::oneshot;

use crate::record::{Record, SinkId};
use crate::spool::SpoolError;
use crate::spool::codec::{self, DeadLetter};

/// One change for the writer, answered once all of it is on disk. What it adds (records,
/// dead letters) is written before what it removes; if a part fails, the change fails,
/// and records already written stay queued (delivered at least once).
#[derive(Default)]
pub struct Change {
    /// Records to queue, per sink: encoded for the disk, and as they are for delivery.
    pub(super) queued: Vec<(SinkId, Vec<u8>, Record)>,
    /// Dead letters to add (encoded).
    pub(super) dead: Vec<Vec<u8>>,
    /// Dead letters to remove, by key.
    pub(super) remove_dead: Vec<u64>,
    /// Records a sink confirmed (or refused for good), to remove from its queue.
    pub(super) delivered: Option<(SinkId, Vec<u64>)>,
    /// Its dead letters count against `spool.max_dead_letter_bytes`: the change is
    /// refused whole if they would go over (a device's request; not a sink's refusals,
    /// which were acknowledged already).
    pub(super) bounded: bool,
}

impl Change {
    /// Queues `record` for `sink`.
    pub fn queue(&mut self, sink: SinkId, record: Record) {
        self.queued
            .push((sink, codec::encode_record(&record), record));
    }

    /// Adds a dead letter.
    pub fn dead_letter(&mut self, dead: &DeadLetter) {
        self.dead.push(codec::encode_dead_letter(dead));
    }

    /// Removes the dead letter `key` (after a redrive).
    pub fn remove_dead_letter(&mut self, key: u64) {
        self.remove_dead.push(key);
    }

    /// Holds the change's dead letters to `spool.max_dead_letter_bytes`.
    pub fn bound_dead_letters(&mut self) {
        self.bounded = true;
    }

    /// True when the change holds nothing.
    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
            && self.dead.is_empty()
            && self.remove_dead.is_empty()
            && self.delivered.is_none()
    }

    /// True when the change must be on disk before it is confirmed: it adds records or
    /// dead letters, or takes dead letters away (a redrive).
    pub(super) fn durable(&self) -> bool {
        !self.queued.is_empty() || !self.dead.is_empty() || !self.remove_dead.is_empty()
    }
}

pub(super) struct Op {
    pub(super) change: Change,
    pub(super) reply: oneshot::Sender<Result<(), SpoolError>>,
}
