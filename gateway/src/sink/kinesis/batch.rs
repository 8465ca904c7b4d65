//! Choosing which queued records go into the next `PutRecords` call: pure, so the rules
//! are table-tested without a server.
//!
//! # Ordering per partition key
//!
//! Kinesis keeps the order of records with one partition key only as long as they
//! arrive in order; a `PutRecords` answer may fail record 3 and accept record 4 of the
//! same key, and retrying 3 would then put it after 4. So a call carries **at most one
//! record per partition key**, and a key whose oldest record is waiting for a retry
//! blocks the key's later records until it is through. Records of different keys fill
//! the call, so a fleet of devices still gets full batches.

use std::collections::HashSet;
use std::time::{Duration, Instant};

/// Records per `PutRecords` call (Kinesis quota).
pub const MAX_RECORDS_PER_CALL: usize = 500;
/// Bytes per `PutRecords` call, data plus partition keys (Kinesis quota: 5 MiB).
pub const MAX_BYTES_PER_CALL: usize = 5 * 1024 * 1024;
/// First retry delay; doubled per attempt, with full jitter.
pub const RETRY_BASE: Duration = Duration::from_millis(50);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(2);

/// What the planner needs to know about a queued record.
pub trait Queued {
    /// The partition key.
    fn key(&self) -> &str;
    /// Data plus partition key, in bytes, as Kinesis counts them.
    fn size(&self) -> usize;
    /// Not to be sent before this instant (retry backoff).
    fn not_before(&self) -> Instant;
}

/// Indices (into `queue`, in order) of the records for the next call.
pub fn plan<Q: Queued>(queue: &[Q], now: Instant) -> Vec<usize> {
    let mut keys: HashSet<&str> = HashSet::new();
    let mut chosen = Vec::new();
    let mut bytes = 0;
    for (index, record) in queue.iter().enumerate() {
        if chosen.len() == MAX_RECORDS_PER_CALL {
            break;
        }
        // Seen already, whether chosen or waiting: either way this record must wait.
        if !keys.insert(record.key()) {
            continue;
        }
        if record.not_before() > now {
            continue;
        }
        if bytes + record.size() > MAX_BYTES_PER_CALL {
            // The call is full for a record this size; smaller ones may still fit.
            continue;
        }
        bytes += record.size();
        chosen.push(index);
    }
    chosen
}

/// The delay before retry number `attempt` (1 for the first retry): exponential with
/// full jitter, so throttled gateways do not retry in lockstep.
pub fn backoff(attempt: u32) -> Duration {
    let ceiling = RETRY_BASE
        .saturating_mul(1u32 << attempt.min(16))
        .min(RETRY_MAX);
    let jitter: f64 = rand::random();
    ceiling.mul_f64(0.5 + jitter / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Q(&'static str, usize, u64);

    impl Queued for Q {
        fn key(&self) -> &str {
            self.0
        }
        fn size(&self) -> usize {
            self.1
        }
        fn not_before(&self) -> Instant {
            base() + Duration::from_millis(self.2)
        }
    }

    fn base() -> Instant {
        static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *BASE.get_or_init(Instant::now)
    }

    #[test]
    fn one_record_per_key_and_waiting_keys_block_their_later_records() {
        let now = base() + Duration::from_millis(10);
        let cases: Vec<(Vec<Q>, Vec<usize>)> = vec![
            (
                vec![Q("a", 1, 0), Q("b", 1, 0), Q("a", 1, 0), Q("c", 1, 0)],
                vec![0, 1, 3],
            ),
            (vec![Q("a", 1, 99), Q("a", 1, 0), Q("b", 1, 0)], vec![2]),
            (vec![Q("a", 1, 0), Q("a", 1, 0), Q("a", 1, 0)], vec![0]),
            (vec![], vec![]),
        ];
        for (queue, expected) in cases {
            assert_eq!(plan(&queue, now), expected);
        }
    }

    #[test]
    fn calls_respect_the_record_and_byte_quotas() {
        let now = base() + Duration::from_millis(10);
        let keys: Vec<&'static str> = (0..600)
            .map(|i| &*Box::leak(format!("k{i}").into_boxed_str()))
            .collect();
        let many: Vec<Q> = keys.iter().map(|k| Q(k, 10, 0)).collect();
        assert_eq!(plan(&many, now).len(), MAX_RECORDS_PER_CALL);

        let mib = 1024 * 1024;
        let big = vec![
            Q("a", mib, 0),
            Q("b", mib, 0),
            Q("c", mib, 0),
            Q("d", mib, 0),
            Q("e", mib, 0),
            Q("f", 10, 0),
        ];
        assert_eq!(
            plan(&big, now),
            vec![0, 1, 2, 3, 4],
            "5 MiB are full: the 10 bytes wait"
        );
        let bigger = vec![Q("a", 3 * mib, 0), Q("b", 3 * mib, 0), Q("c", mib, 0)];
        assert_eq!(plan(&bigger, now), vec![0, 2]);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 1..30 {
            let delay = backoff(attempt);
            let ceiling = RETRY_BASE
                .saturating_mul(1 << attempt.min(16))
                .min(RETRY_MAX);
            assert!(
                delay <= ceiling && delay >= ceiling / 2,
                "{attempt}: {delay:?}"
            );
        }
    }
}
