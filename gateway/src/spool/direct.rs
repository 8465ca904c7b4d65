//! Records for the local sink are written straight to its file, not queued: the local
//! sink is durable itself (its writer `fdatasync`s the file before it confirms), so a
//! copy in the queue log would only add a second write and sync, a delivery task's
//! read, and the delivery's own change, for the same guarantee. The device is
//! acknowledged once the line is synced, exactly as a spooled record is once the queue
//! log is; a write that fails (a full disk) is answered as the spool's own failure would
//! be, and nothing of it is acknowledged.
//!
//! Accounted as a delivery from the spool is ([`super::deliver`]): the sink's records
//! and its delivery latency count these lines too, and a record whose message expiry
//! has passed already (an expiry of 0 s) is not written but dead-lettered or dropped,
//! as `spool.expired` says.

use crate::config::ExpiredPath;
use crate::message::now_ms;
use crate::record::{Record, SinkId};
use crate::sink::Sinks;
use crate::spool::deliver::{count, delivered, keep_expired, split_expired};
use crate::spool::{Change, Spool, SpoolError};

/// Writes `records` (all for [`SinkId::Local`]) to the local sink; resolves once they
/// are on its disk (and the dead letters of expired ones in `spool`).
pub async fn write(
    spool: &Spool,
    sinks: &Sinks,
    expired: ExpiredPath,
    records: Vec<Record>,
) -> Result<(), SpoolError> {
    if records.is_empty() {
        return Ok(());
    }
    let (dead, live) = split_expired(SinkId::Local, records, now_ms());
    let dead = keep_expired(spool, expired, SinkId::Local, dead);
    if !dead.is_empty() {
        let mut change = Change::default();
        for letter in &dead {
            change.dead_letter(letter);
        }
        spool.commit(change).await?;
        count(SinkId::Local, 0, dead.len());
    }
    if live.is_empty() {
        return Ok(());
    }
    let received: Vec<u64> = live.iter().map(|r| r.message.received_at_ms).collect();
    sinks
        .local()
        .write(live)
        .await
        .map_err(|error| SpoolError::Storage(error.to_string()))?;
    delivered(SinkId::Local, &received, 0);
    Ok(())
}
