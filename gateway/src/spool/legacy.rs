//! Spools written before the queue log kept the sinks' queues in redb: opening one moves
//! those records to the log.

use std::sync::Mutex;

use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};

use crate::record::SinkId;
use crate::spool::log;

/// The sink's queue table in spools written before the queue log.
pub(super) fn legacy_table(sink: SinkId) -> TableDefinition<'static, u64, &'static [u8]> {
    match sink {
        SinkId::Kinesis => TableDefinition::new("queue/kinesis"),
        SinkId::IotCore => TableDefinition::new("queue/iot-core"),
        SinkId::Local => TableDefinition::new("queue/local"),
    }
}

/// The queued records of a spool written before the queue log: `(sink, seq, bytes)`.
pub(super) fn legacy_records(db: &Database) -> anyhow::Result<Vec<(SinkId, u64, Vec<u8>)>> {
    use anyhow::Context as _;
    let txn = db.begin_read().context("spool: begin")?;
    let mut out = Vec::new();
    for sink in SinkId::ALL {
        let table = match txn.open_table(legacy_table(sink)) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => continue,
            Err(error) => return Err(error).context("spool: open table"),
        };
        for entry in table.iter().context("spool: scan")? {
            let (key, value) = entry.context("spool: scan")?;
            out.push((sink, key.value(), value.value().to_vec()));
        }
    }
    Ok(out)
}

/// Moves `legacy` records into the queue log (durably), then drops redb's queue tables.
/// A crash in between moves them again on the next start; those already in the log are
/// skipped.
pub(super) fn move_legacy_records(
    db: &Database,
    log: &mut log::Log,
    index: &Mutex<log::Index>,
    next_seq: u64,
    legacy: &[(SinkId, u64, Vec<u8>)],
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    log.begin(index, next_seq).context("spool: queue log")?;
    let mut staged = Vec::new();
    {
        let index = index.lock().unwrap_or_else(|p| p.into_inner());
        for (sink, seq, bytes) in legacy {
            if !index.contains(*sink, *seq) {
                staged.push((*sink, *seq, log.stage_record(*sink, *seq, bytes)));
            }
        }
    }
    log.write(true).context("spool: queue log")?;
    {
        let mut index = index.lock().unwrap_or_else(|p| p.into_inner());
        for (sink, seq, loc) in staged {
            index.insert(sink, seq, loc);
        }
    }
    let txn = db.begin_write().context("spool: begin")?;
    for sink in SinkId::ALL {
        txn.delete_table(legacy_table(sink))
            .context("spool: drop table")?;
    }
    txn.commit().context("spool: commit")?;
    tracing::info!(
        records = legacy.len(),
        "moved the queued records of spool.redb to the queue log"
    );
    Ok(())
}
