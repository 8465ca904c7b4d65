//! MQTT sessions that outlive their connection (clean session off in 3.1.1, clean start
//! off with a session expiry in 5.0), on disk (`mqtt-sessions.redb` in the data
//! directory), so that a device reconnecting, to this gateway after a restart or to
//! another instance on the same data directory, keeps its subscriptions and gets the
//! commands queued meanwhile without subscribing again. The commands themselves wait in
//! the downlink's queue, per device, whatever protocol takes them.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};

/// Saved sessions by client id.
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");

/// What a session keeps between connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    /// The device it belongs to (another device cannot take it over).
    pub device: String,
    /// Its subscriptions: filter and granted QoS.
    pub filters: Vec<(String, u8)>,
    /// How long it outlives its connection, in seconds.
    pub expiry_secs: u32,
    /// When it was last connected (ms since the epoch).
    pub last_seen_ms: u64,
}

impl Saved {
    fn expired(&self, now_ms: u64) -> bool {
        self.last_seen_ms + u64::from(self.expiry_secs) * 1000 < now_ms
    }
}

/// The saved sessions.
#[derive(Clone)]
pub struct SavedSessions {
    db: Arc<Database>,
    /// The client ids saved, so that a clean CONNECT with nothing saved (most of them)
    /// costs no disk transaction: a burst of those made every one wait for an fsync on
    /// a blocking thread of its own (300 threads for 256 CONNECTs at once, measured).
    saved: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl SavedSessions {
    /// Opens (creating) the store in `dir` and forgets the sessions that expired.
    pub fn open(dir: &Path) -> anyhow::Result<SavedSessions> {
        let path = dir.join("mqtt-sessions.redb");
        let db = Database::create(&path).map_err(|error| {
            anyhow::anyhow!("cannot open the MQTT sessions {}: {error}", path.display())
        })?;
        let now = crate::message::now_ms();
        let txn = db.begin_write()?;
        let mut saved = std::collections::HashSet::new();
        {
            let mut table = txn.open_table(SESSIONS)?;
            table.retain(|_, bytes| {
                postcard::from_bytes::<Saved>(bytes).is_ok_and(|saved| !saved.expired(now))
            })?;
            for entry in table.iter()? {
                saved.insert(entry?.0.value().to_string());
            }
        }
        txn.commit()?;
        Ok(SavedSessions {
            db: Arc::new(db),
            saved: Arc::new(std::sync::Mutex::new(saved)),
        })
    }

    fn is_saved(&self, client_id: &str) -> bool {
        self.saved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(client_id)
    }

    /// The session saved for `client_id`, unless it expired.
    pub async fn load(&self, client_id: &str) -> anyhow::Result<Option<Saved>> {
        if !self.is_saved(client_id) {
            return Ok(None);
        }
        let db = self.db.clone();
        let client_id = client_id.to_string();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read()?;
            let table = txn.open_table(SESSIONS)?;
            let bytes = table.get(client_id.as_str())?;
            let saved = bytes.and_then(|b| postcard::from_bytes::<Saved>(b.value()).ok());
            Ok(saved.filter(|s| !s.expired(crate::message::now_ms())))
        })
        .await?
    }

    /// Saves `client_id`'s session, durably.
    pub async fn save(&self, client_id: &str, saved: &Saved) -> anyhow::Result<()> {
        let bytes = postcard::to_stdvec(saved)?;
        let db = self.db.clone();
        let id = client_id.to_string();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write()?;
            txn.open_table(SESSIONS)?
                .insert(id.as_str(), bytes.as_slice())?;
            txn.commit()?;
            anyhow::Ok(())
        })
        .await??;
        self.saved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(client_id.to_string());
        Ok(())
    }

    /// Forgets `client_id`'s session.
    pub async fn remove(&self, client_id: &str) -> anyhow::Result<()> {
        if !self
            .saved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(client_id)
        {
            return Ok(());
        }
        let db = self.db.clone();
        let client_id = client_id.to_string();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write()?;
            txn.open_table(SESSIONS)?.remove(client_id.as_str())?;
            txn.commit()?;
            Ok(())
        })
        .await?
    }
}

/// A connection's part in its session: what it took over, and how long the session
/// outlives it.
#[derive(Debug)]
pub struct Kept {
    client_id: String,
    device: String,
    /// 0: the session ends with the connection.
    pub expiry_secs: u32,
    /// A session from an earlier connection goes on (CONNACK's session present).
    pub present: bool,
    /// Its subscriptions.
    pub filters: Vec<(String, u8)>,
    /// Saved here; not when the device's session at IoT Core holds it (`[upstream]`).
    here: bool,
}

impl Kept {
    /// A session that IoT Core holds (`[upstream]`): nothing of it is saved here, and
    /// whether it goes on is IoT Core's answer.
    pub fn at_iot_core(client_id: &str, device: &str, expiry_secs: u32) -> Kept {
        Kept {
            client_id: client_id.to_string(),
            device: device.to_string(),
            expiry_secs,
            present: false,
            filters: Vec::new(),
            here: false,
        }
    }
}

impl SavedSessions {
    /// At CONNECT: a clean one forgets what was saved; another takes it over, if it is
    /// `device`'s. A session that outlives its connection is saved at once, so that a
    /// crash keeps it.
    pub async fn begin(
        &self,
        client_id: &str,
        device: &str,
        clean: bool,
        expiry_secs: u32,
    ) -> anyhow::Result<Kept> {
        let saved = if clean {
            None
        } else {
            self.load(client_id)
                .await?
                .filter(|saved| saved.device == device)
        };
        let kept = Kept {
            client_id: client_id.to_string(),
            device: device.to_string(),
            expiry_secs,
            present: saved.is_some(),
            filters: saved.map(|s| s.filters).unwrap_or_default(),
            here: true,
        };
        if expiry_secs > 0 {
            self.keep(&kept, kept.filters.clone()).await?;
        } else {
            self.remove(client_id).await?;
        }
        Ok(kept)
    }

    /// Saves the session's subscriptions now (after a SUBSCRIBE or UNSUBSCRIBE, and at
    /// the end of its connection); nothing for a session that ends with its connection.
    pub async fn keep(&self, kept: &Kept, filters: Vec<(String, u8)>) -> anyhow::Result<()> {
        if kept.expiry_secs == 0 || !kept.here {
            return Ok(());
        }
        let saved = Saved {
            device: kept.device.clone(),
            filters,
            expiry_secs: kept.expiry_secs,
            last_seen_ms: crate::message::now_ms(),
        };
        self.save(&kept.client_id, &saved).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_session_is_kept_across_opens_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let now = crate::message::now_ms();
        let sessions = SavedSessions::open(dir.path()).unwrap();
        let kept = Saved {
            device: "dev-1".to_string(),
            filters: vec![("cmd/dev-1/#".to_string(), 1)],
            expiry_secs: 3600,
            last_seen_ms: now,
        };
        let gone = Saved {
            expiry_secs: 1,
            last_seen_ms: now - 5_000,
            ..kept.clone()
        };
        sessions.save("dev-1", &kept).await.unwrap();
        sessions.save("dev-2", &gone).await.unwrap();
        assert_eq!(sessions.load("dev-2").await.unwrap(), None, "expired");
        drop(sessions);
        let sessions = SavedSessions::open(dir.path()).unwrap();
        assert_eq!(sessions.load("dev-1").await.unwrap(), Some(kept));
        sessions.remove("dev-1").await.unwrap();
        assert_eq!(sessions.load("dev-1").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_clean_connect_or_another_device_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = SavedSessions::open(dir.path()).unwrap();
        let first = sessions.begin("c1", "dev-1", false, 60).await.unwrap();
        assert!(!first.present);
        let filters = vec![("cmd/dev-1/#".to_string(), 1)];
        sessions.keep(&first, filters.clone()).await.unwrap();
        let again = sessions.begin("c1", "dev-1", false, 60).await.unwrap();
        assert!(again.present);
        assert_eq!(again.filters, filters);
        let other = sessions.begin("c1", "dev-2", false, 60).await.unwrap();
        assert!(!other.present, "another device's session is not taken over");
        sessions.keep(&again, filters).await.unwrap();
        let clean = sessions.begin("c1", "dev-1", true, 60).await.unwrap();
        assert!(!clean.present);
        assert!(clean.filters.is_empty());
    }
}
