//! `[spool]`: when devices are acknowledged, and the bounds of the queues and the
//! dead-letter store.

use serde::Deserialize;

use super::Config;

/// When a device is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// After the message is written to the spool and the write is on disk (`fsync`,
    /// shared by every request in the same group commit). Survives a crash or power loss.
    Durable,
    /// As soon as the message is handed to its sink, before the sink confirms it.
    /// Faster, but a crash or a sink that stays unreachable loses what was in flight.
    BestEffort,
}

/// `[spool]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// When devices are acknowledged, unless a topic rule says otherwise. Default
    /// `durable`.
    #[serde(default = "default_durability")]
    pub durability: Durability,
    /// Most bytes of records waiting per sink; beyond it devices get `503` with
    /// `Retry-After`. Default 256 MiB.
    #[serde(default = "default_spool_bytes")]
    pub max_bytes_per_sink: u64,
    /// Most best-effort messages handed to sinks and not yet confirmed; beyond it
    /// best-effort messages get `503`. Default 10000.
    #[serde(default = "default_best_effort_in_flight")]
    pub best_effort_max_in_flight: usize,
    /// Most bytes of dead letters kept. A request whose messages would be dead-lettered
    /// past it is refused (`503 dead_letters_full`), and expired records are dropped
    /// (counted) instead of kept. Records a sink refuses for good are kept past it: they
    /// were acknowledged. Default 1 GiB.
    #[serde(default = "default_dead_letter_bytes")]
    pub max_dead_letter_bytes: u64,
    /// What happens to a record whose `mqtt.message_expiry` passed before delivery:
    /// `dead-letter` (default) keeps it as a dead letter, `drop` drops it and counts it
    /// (`sluice_dead_letters_refused_total{status="expired_dropped"}`).
    #[serde(default = "default_expired")]
    pub expired: ExpiredPath,
}

/// `spool.expired`: what becomes of records that expired before delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExpiredPath {
    /// Kept as dead letters (origin `expired`), up to `spool.max_dead_letter_bytes`.
    DeadLetter,
    /// Dropped and counted.
    Drop,
}

fn default_durability() -> Durability {
    Durability::Durable
}

fn default_spool_bytes() -> u64 {
    256 * 1024 * 1024
}

fn default_best_effort_in_flight() -> usize {
    10_000
}

fn default_dead_letter_bytes() -> u64 {
    1 << 30
}

fn default_expired() -> ExpiredPath {
    ExpiredPath::DeadLetter
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            durability: Durability::Durable,
            max_bytes_per_sink: default_spool_bytes(),
            best_effort_max_in_flight: default_best_effort_in_flight(),
            max_dead_letter_bytes: default_dead_letter_bytes(),
            expired: default_expired(),
        }
    }
}

impl Config {
    pub(super) fn validate_spool(&self, problems: &mut Vec<String>) {
        let spool = &self.spool;
        // A queue smaller than one request could never take that request.
        if spool.max_bytes_per_sink < 2 * self.limits.max_batch_bytes as u64 {
            problems.push(format!(
                "spool.max_bytes_per_sink must be at least twice limits.max_batch_bytes ({} bytes), not {}",
                2 * self.limits.max_batch_bytes,
                spool.max_bytes_per_sink
            ));
        }
        if spool.best_effort_max_in_flight == 0 {
            problems.push("spool.best_effort_max_in_flight must be at least 1".to_string());
        }
    }
}
