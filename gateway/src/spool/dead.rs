//! The dead-letter store's table in redb, and its one durable write.

use redb::TableDefinition;

use crate::spool::Shared;

pub(super) const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead-letters");

/// Adds and removes dead letters in one durable redb transaction; the change in their
/// number and in their bytes.
pub(super) fn commit_dead_letters(
    shared: &Shared,
    added: &[(u64, &[u8])],
    removed: &[u64],
) -> Result<(i64, i64), String> {
    let txn = shared.db.begin_write().map_err(|e| e.to_string())?;
    let mut delta = 0i64;
    let mut bytes = 0i64;
    {
        let mut dead = txn.open_table(DEAD_LETTERS).map_err(|e| e.to_string())?;
        for (key, value) in added {
            dead.insert(key, value).map_err(|e| e.to_string())?;
            delta += 1;
            bytes += value.len() as i64;
        }
        for key in removed {
            if let Some(value) = dead.remove(key).map_err(|e| e.to_string())? {
                delta -= 1;
                bytes -= value.value().len() as i64;
            }
        }
    }
    txn.commit().map_err(|e| e.to_string())?;
    Ok((delta, bytes))
}
