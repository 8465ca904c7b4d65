//! Certificates registered at AWS IoT (`[auth.registry]`): a snapshot of the account's
//! certificates (their status) and the things attached to them, as IoT Core admits
//! devices. A client certificate whose SHA-256 fingerprint (IoT Core's certificate id) is
//! a registered ACTIVE certificate is accepted whatever CA issued it, and its device is
//! the one thing attached to it.
//!
//! - [`control_plane`]: the snapshot read from the IoT control plane (`aws-sdk-iot`).
//!
//! The snapshot is refreshed every `refresh_secs` (a certificate seen before keeps its
//! things unless its status changed; new ones are asked for theirs) and on demand
//! (`POST /admin/registry/refresh`, everything asked again), and written to
//! `<data_dir>/registry.json` after each change, so that a gateway restarted while the
//! control plane is unreachable still admits the devices it knew. A refresh that changes
//! anything tells the open sessions to check their certificates again: one made INACTIVE
//! or REVOKED (or deleted) ends its sessions. A snapshot older than `max_age_secs` makes
//! the gateway not ready.

pub mod control_plane;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::config::RegistryConfig;

/// The file in the data directory that keeps the snapshot.
pub const SNAPSHOT_FILE: &str = "registry.json";

/// The status IoT Core admits.
pub const ACTIVE: &str = "ACTIVE";

/// One registered certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// `ACTIVE`, `INACTIVE`, `REVOKED`, `PENDING_TRANSFER`, `REGISTER_INACTIVE`,
    /// `PENDING_ACTIVATION`.
    pub status: String,
    /// The things attached to it.
    pub things: Vec<String>,
}

/// The account's certificates, by id (the lower-case hex SHA-256 of the DER
/// certificate), as of `fetched_at_secs`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When the control plane said so (seconds since the Unix epoch; 0: never).
    pub fetched_at_secs: u64,
    /// The certificates.
    pub certificates: HashMap<String, Registered>,
}

impl Snapshot {
    /// Reads the snapshot kept in `path`; none there is an empty one.
    fn read(path: &Path) -> anyhow::Result<Snapshot> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a registry snapshot", path.display())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Snapshot::default()),
            Err(error) => Err(error).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Keeps the snapshot in `path`: written aside, synced, renamed over the old one.
    fn write(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write as _;
        let aside = path.with_extension("json.new");
        let mut file = std::fs::File::create(&aside)
            .with_context(|| format!("cannot write {}", aside.display()))?;
        file.write_all(&serde_json::to_vec(self)?)?;
        file.sync_all()?;
        std::fs::rename(&aside, path)
            .with_context(|| format!("cannot rename {} to {}", aside.display(), path.display()))
    }
}

/// What a refresh found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refreshed {
    /// Certificates in the snapshot.
    pub certificates: usize,
    /// Of them ACTIVE.
    pub active: usize,
    /// Whether anything changed.
    pub changed: bool,
}

/// The snapshot, kept fresh.
pub struct Registry {
    snapshot: ArcSwap<Snapshot>,
    path: PathBuf,
    plane: control_plane::ControlPlane,
    max_age: Duration,
    /// Why the last refresh failed; `None` after a success.
    last_error: Mutex<Option<String>>,
    /// Counts the refreshes that changed the snapshot.
    changes: tokio::sync::watch::Sender<u64>,
    /// One refresh at a time.
    refreshing: tokio::sync::Mutex<()>,
}

impl Registry {
    /// The registry of `config`, its snapshot read from `data_dir`, asking the control
    /// plane through `aws` (with `config.endpoint_url` when set).
    pub fn open(
        config: &RegistryConfig,
        data_dir: &Path,
        aws: &aws_config::SdkConfig,
    ) -> anyhow::Result<Arc<Registry>> {
        let path = data_dir.join(SNAPSHOT_FILE);
        let snapshot = Snapshot::read(&path)?;
        tracing::info!(
            certificates = snapshot.certificates.len(),
            fetched_at = snapshot.fetched_at_secs,
            "registry snapshot read"
        );
        Ok(Arc::new(Registry {
            snapshot: ArcSwap::from_pointee(snapshot),
            path,
            plane: control_plane::ControlPlane::new(aws, config.endpoint_url.as_deref()),
            max_age: Duration::from_secs(config.max_age_secs),
            last_error: Mutex::new(None),
            changes: tokio::sync::watch::Sender::new(0),
            refreshing: tokio::sync::Mutex::new(()),
        }))
    }

    /// Refreshes the snapshot after `first`, then every `every`, as long as the registry
    /// is in use.
    pub fn keep_fresh(self: &Arc<Self>, first: Duration, every: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
            loop {
                tick.tick().await;
                let Some(registry) = weak.upgrade() else {
                    return;
                };
                let _ = registry.refresh(false).await;
            }
        });
    }

    /// The registered certificate whose SHA-256 fingerprint is `fingerprint`.
    pub fn lookup(&self, fingerprint: &[u8]) -> Option<Registered> {
        self.snapshot
            .load()
            .certificates
            .get(&hex::encode(fingerprint))
            .cloned()
    }

    /// Fires after each refresh that changed the snapshot.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Seconds since the snapshot was read from the control plane; `None`: never.
    pub fn age_secs(&self) -> Option<u64> {
        let fetched = self.snapshot.load().fetched_at_secs;
        (fetched > 0).then(|| now_secs().saturating_sub(fetched))
    }

    /// Why the registry cannot be trusted now: no snapshot, or one past `max_age_secs`.
    pub fn not_ready(&self) -> Option<String> {
        let error = self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .map(|e| format!(" (last refresh: {e})"))
            .unwrap_or_default();
        match self.age_secs() {
            None => Some(format!(
                "auth.registry: no snapshot of the registered certificates yet{error}"
            )),
            Some(age) if age > self.max_age.as_secs() => Some(format!(
                "auth.registry: the snapshot of the registered certificates is {age} s old, over max_age_secs {}{error}",
                self.max_age.as_secs()
            )),
            Some(_) => None,
        }
    }

    /// Reads the registry from the control plane; with `full`, every certificate's things
    /// are asked again, else only those of certificates new or changed since the last
    /// snapshot. The snapshot is kept on disk when it changed.
    pub async fn refresh(&self, full: bool) -> Result<Refreshed, String> {
        let _one = self.refreshing.lock().await;
        let previous = self.snapshot.load_full();
        let known = if full { None } else { Some(&*previous) };
        let read = match self.plane.read(known).await {
            Ok(read) => read,
            Err(error) => {
                tracing::warn!(%error, "cannot refresh the registry snapshot");
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.clone());
                return Err(error);
            }
        };
        let changed = read.certificates != previous.certificates;
        let snapshot = Snapshot {
            fetched_at_secs: now_secs(),
            certificates: read.certificates,
        };
        let refreshed = Refreshed {
            certificates: snapshot.certificates.len(),
            active: snapshot
                .certificates
                .values()
                .filter(|c| c.status == ACTIVE)
                .count(),
            changed,
        };
        // Written every time: the time of the last good read is part of it.
        if let Err(error) = snapshot.write(&self.path) {
            tracing::warn!(error = %format!("{error:#}"), "cannot keep the registry snapshot on disk");
        }
        self.snapshot.store(Arc::new(snapshot));
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if changed {
            self.changes.send_modify(|n| *n += 1);
        }
        tracing::info!(
            certificates = refreshed.certificates,
            active = refreshed.active,
            changed,
            "registry snapshot refreshed"
        );
        Ok(refreshed)
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let snapshot = self.snapshot.load();
        f.debug_struct("Registry")
            .field("certificates", &snapshot.certificates.len())
            .field("fetched_at_secs", &snapshot.fetched_at_secs)
            .finish()
    }
}

fn now_secs() -> u64 {
    crate::message::now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot kept on disk is what a restarted gateway admits from; past
    /// `max_age_secs` it makes the gateway not ready, and with none at all too.
    #[test]
    fn a_kept_snapshot_is_read_back_and_its_age_judged() {
        let dir = tempfile::tempdir().unwrap();
        let config: RegistryConfig = toml::from_str("max_age_secs = 3600").unwrap();
        let aws = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build();
        let empty = Registry::open(&config, dir.path(), &aws).unwrap();
        assert!(empty.not_ready().unwrap().contains("no snapshot"));
        let fingerprint = [7u8; 32];
        let old = Snapshot {
            fetched_at_secs: now_secs() - 7200,
            certificates: HashMap::from([(
                hex::encode(fingerprint),
                Registered {
                    status: ACTIVE.to_string(),
                    things: vec!["pump-1".to_string()],
                },
            )]),
        };
        old.write(&dir.path().join(SNAPSHOT_FILE)).unwrap();
        let registry = Registry::open(&config, dir.path(), &aws).unwrap();
        assert_eq!(registry.lookup(&fingerprint).unwrap().things, ["pump-1"]);
        assert_eq!(registry.lookup(&[8u8; 32]), None);
        let age = registry.age_secs().unwrap();
        assert!((7200..7210).contains(&age), "{age}");
        assert!(
            registry
                .not_ready()
                .unwrap()
                .contains("over max_age_secs 3600")
        );
    }
}
