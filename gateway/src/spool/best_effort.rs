//! Best-effort delivery: a record on a `durability = "best-effort"` route is handed to
//! its sink without being written to the spool, and its device is acknowledged at once.
//! The other way out beside [`super::deliver`], and accounted the same way: a record
//! the sink refuses becomes the same dead letter, the sink metrics count both, and a
//! sink that fails is marked failing (`/readyz`, the console) until one succeeds.
//!
//! Per sink, one task hands records over in the order they were accepted: everything
//! waiting goes in one call, the next call only after it (so a device's later message
//! never overtakes an earlier one). A sink failure loses them, which is what
//! best-effort means. At most `spool.best_effort_max_in_flight` records wait for their
//! sinks at once; a batch that does not fit is refused whole.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::record::{PerSink, Record, SinkId};
use crate::sink::Sinks;
use crate::spool::deliver::{delivered, refused_by_sink, sink_failed};
use crate::spool::{Change, Spool};

/// The hand-over tasks and their bound.
pub struct BestEffort {
    /// Per sink, records in the order they were accepted.
    senders: PerSink<mpsc::UnboundedSender<HandOver>>,
    /// Places for records handed over and not yet answered by their sink.
    room: Arc<Semaphore>,
    /// `spool.best_effort_max_in_flight`.
    limit: usize,
}

/// Why best-effort records cannot be taken now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// `limit` records already wait for their sinks.
    Full {
        /// `spool.best_effort_max_in_flight`.
        limit: usize,
    },
    /// The batch alone holds `count` records, more than may ever wait at once.
    TooMany {
        /// Best-effort records in the batch.
        count: usize,
        /// `spool.best_effort_max_in_flight`.
        limit: usize,
    },
}

/// Room reserved for a batch's best-effort records.
pub struct Reserved(Option<OwnedSemaphorePermit>);

/// Records for one sink, with their places under the bound.
struct HandOver {
    records: Vec<Record>,
    _places: OwnedSemaphorePermit,
}

impl BestEffort {
    /// Starts the hand-over tasks, at most `limit` records waiting at once; refused
    /// records become dead letters in `spool`.
    pub fn start(sinks: Arc<Sinks>, spool: Arc<Spool>, limit: usize) -> BestEffort {
        let senders = PerSink::from_fn(|sink| {
            let (sender, receiver) = mpsc::unbounded_channel();
            tokio::spawn(hand_over_in_order(
                sink,
                sinks.clone(),
                spool.clone(),
                receiver,
            ));
            sender
        });
        BestEffort {
            senders,
            room: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// Reserves places for `count` records, all or none (a batch is taken whole).
    pub fn reserve(&self, count: usize) -> Result<Reserved, Busy> {
        let limit = self.limit;
        match count {
            0 => Ok(Reserved(None)),
            count if count > limit => Err(Busy::TooMany { count, limit }),
            count => self
                .room
                .clone()
                .try_acquire_many_owned(count as u32)
                .map(|permit| Reserved(Some(permit)))
                .map_err(|_| Busy::Full { limit }),
        }
    }

    /// Hands `records` to their sinks' tasks, in the order given, each holding a place
    /// of `reserved` until its sink answered.
    pub fn hand_over(&self, records: Vec<(SinkId, Record)>, reserved: Reserved) {
        let Reserved(Some(mut places)) = reserved else {
            return;
        };
        let mut by_sink: PerSink<Vec<Record>> = PerSink::default();
        for (sink, record) in records {
            by_sink[sink].push(record);
        }
        for sink in SinkId::ALL {
            let records = std::mem::take(&mut by_sink[sink]);
            if records.is_empty() {
                continue;
            }
            let Some(share) = places.split(records.len()) else {
                continue;
            };
            let _ = self.senders[sink].send(HandOver {
                records,
                _places: share,
            });
        }
    }
}

/// Hands one sink's best-effort records over, in order, until the gateway stops.
async fn hand_over_in_order(
    sink: SinkId,
    sinks: Arc<Sinks>,
    spool: Arc<Spool>,
    mut waiting: mpsc::UnboundedReceiver<HandOver>,
) {
    while let Some(first) = waiting.recv().await {
        let mut taken = vec![first];
        while let Ok(more) = waiting.try_recv() {
            taken.push(more);
        }
        let records: Vec<Record> = taken
            .iter_mut()
            .flat_map(|hand_over| std::mem::take(&mut hand_over.records))
            .collect();
        let received: Vec<u64> = records.iter().map(|r| r.message.received_at_ms).collect();
        match sinks.deliver_to(sink, records).await {
            Ok(rejected) => {
                spool.set_failing(sink, false);
                delivered(sink, &received, rejected.len());
                if !rejected.is_empty() {
                    let mut change = Change::default();
                    for rejected in rejected {
                        change.dead_letter(&refused_by_sink(rejected));
                    }
                    if let Err(error) = spool.commit(change).await {
                        tracing::error!(%error, "best-effort records refused by their sink could not be dead-lettered");
                    }
                }
            }
            Err(error) => {
                sink_failed(&spool, sink);
                tracing::error!(sink = sink.name(), lost = received.len(), %error, "best-effort messages lost: their sink failed");
            }
        }
        // The places under the bound are given back once the sink answered.
        drop(taken);
    }
}
