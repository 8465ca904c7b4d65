//! The commands waiting for devices, on disk (`commands.redb` in the data directory), so
//! that a restart loses none: each is written when it arrives and removed once a device
//! took it (its PUBACK, for an MQTT QoS 1 command), expired or was pushed out.
//!
//! Writes go through `spawn_blocking`: a redb commit waits for the disk.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};

use super::Command;

/// Commands by their sequence number (arrival order, across devices).
const COMMANDS: TableDefinition<u64, &[u8]> = TableDefinition::new("commands");

/// A command as stored.
#[derive(Serialize, Deserialize)]
struct Stored {
    device: String,
    id: String,
    topic: String,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
    received_at_ms: u64,
}

/// A command kept from before a restart: its sequence number and device.
pub struct Held {
    /// Its place in the store.
    pub seq: u64,
    /// The device it is for.
    pub device: String,
    /// The command.
    pub command: Command,
}

/// The store.
#[derive(Clone)]
pub struct CommandStore {
    db: Arc<Database>,
}

impl CommandStore {
    /// Opens (creating) the store in `dir`, with what it holds, in arrival order.
    pub fn open(dir: &Path) -> anyhow::Result<(CommandStore, Vec<Held>)> {
        let path = dir.join("commands.redb");
        let db = Database::create(&path).map_err(|error| {
            anyhow::anyhow!("cannot open the command queue {}: {error}", path.display())
        })?;
        {
            let txn = db.begin_write()?;
            txn.open_table(COMMANDS)?;
            txn.commit()?;
        }
        let mut held = Vec::new();
        {
            let txn = db.begin_read()?;
            let table = txn.open_table(COMMANDS)?;
            for entry in table.iter()? {
                let (seq, bytes) = entry?;
                match postcard::from_bytes::<Stored>(bytes.value()) {
                    Ok(stored) => held.push(Held {
                        seq: seq.value(),
                        device: stored.device,
                        command: Command {
                            id: stored.id,
                            topic: stored.topic,
                            payload: stored.payload,
                            received_at_ms: stored.received_at_ms,
                        },
                    }),
                    Err(error) => {
                        tracing::error!(seq = seq.value(), %error, "a queued command cannot be read; skipped")
                    }
                }
            }
        }
        Ok((CommandStore { db: Arc::new(db) }, held))
    }

    /// Writes a command, durably.
    pub async fn put(&self, seq: u64, device: &str, command: &Command) -> anyhow::Result<()> {
        let bytes = postcard::to_stdvec(&Stored {
            device: device.to_string(),
            id: command.id.clone(),
            topic: command.topic.clone(),
            payload: command.payload.clone(),
            received_at_ms: command.received_at_ms,
        })?;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write()?;
            txn.open_table(COMMANDS)?.insert(seq, bytes.as_slice())?;
            txn.commit()?;
            Ok(())
        })
        .await?
    }

    /// Removes commands, durably.
    pub async fn remove(&self, seqs: Vec<u64>) -> anyhow::Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(COMMANDS)?;
                for seq in seqs {
                    table.remove(seq)?;
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commands_are_kept_until_removed_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let command = |id: &str| Command {
            id: id.to_string(),
            topic: format!("cmd/dev-1/{id}"),
            payload: vec![0, 1, 2],
            received_at_ms: 7,
        };
        let (store, held) = CommandStore::open(dir.path()).unwrap();
        assert!(held.is_empty());
        store.put(1, "dev-1", &command("a")).await.unwrap();
        store.put(2, "dev-2", &command("b")).await.unwrap();
        store.put(3, "dev-1", &command("c")).await.unwrap();
        store.remove(vec![2]).await.unwrap();
        drop(store);
        let (_, held) = CommandStore::open(dir.path()).unwrap();
        let kept: Vec<(u64, &str, &str)> = held
            .iter()
            .map(|h| (h.seq, h.device.as_str(), h.command.id.as_str()))
            .collect();
        assert_eq!(kept, [(1, "dev-1", "a"), (3, "dev-1", "c")]);
        assert_eq!(held[0].command.payload, [0, 1, 2]);
    }
}
