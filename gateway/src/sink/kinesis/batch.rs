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

use crate::backoff::Backoff;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// Records per `PutRecords` call (Kinesis quota).
pub const MAX_RECORDS_PER_CALL: usize = 500;
/// Bytes per `PutRecords` call, data plus partition keys (Kinesis quota: 5 MiB).
pub const MAX_BYTES_PER_CALL: usize = 5 * 1024 * 1024;
/// Pauses before a record (or, throttled, the whole stream) is tried again: 100 ms,
/// doubling to 2 s, jittered so that throttled gateways do not retry in lockstep.
pub const RETRY: Backoff = Backoff {
    first: Duration::from_millis(100),
    max: Duration::from_secs(2),
    jitter: true,
};

/// What the planner needs to know about a queued record.
pub trait Queued {
    /// The partition key.
    fn key(&self) -> &str;
    /// Data plus partition key, in bytes, as Kinesis counts them.
    fn size(&self) -> usize;
    /// Data alone, in bytes.
    fn data_len(&self) -> usize;
    /// Whether the record may share an aggregated record (not when it pins its shard
    /// with an explicit hash key).
    fn aggregatable(&self) -> bool {
        true
    }
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
        } // A record larger than a call's budget (streams raised beyond 5 MiB) goes alone.
        if bytes + record.size() > MAX_BYTES_PER_CALL && !chosen.is_empty() {
            // The call is full for a record this size; smaller ones may still fit.
            continue;
        }
        bytes += record.size();
        chosen.push(index);
    }
    chosen
}

/// One Kinesis record of the next call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Planned {
    /// One user record, sent as it is.
    Plain(usize),
    /// Several user records (indices, in queue order) in one KPL aggregated record.
    Aggregated(Vec<usize>),
}

impl Planned {
    /// The user records (queue indices) in this Kinesis record.
    pub fn members(&self) -> &[usize] {
        match self {
            Planned::Plain(index) => std::slice::from_ref(index),
            Planned::Aggregated(indices) => indices,
        }
    }
}

/// Plans a call of aggregated records: user records are grouped by the shard their key
/// maps to (`shard_of`), one aggregated record per shard, so a device that sends rarely
/// still shares a record with its neighbours on the shard, as the KPL does.
///
/// Ordering per key holds because all of a key's records in a call sit in one Kinesis
/// record (stored or failed together); a key whose next record does not fit, or waits
/// for a retry, waits whole until the next call. A record too large to aggregate goes
/// alone, as the KPL sends it, if its key has nothing else in the call.
pub fn plan_aggregated<Q: Queued>(
    queue: &[Q],
    now: Instant,
    shard_of: impl Fn(&str) -> usize,
    max_record_bytes: usize,
) -> Vec<Planned> {
    use crate::sink::kinesis::aggregate::Sizer;
    use std::collections::HashMap;

    let mut blocked: HashSet<&str> = HashSet::new();
    let mut in_call: HashSet<&str> = HashSet::new();
    let mut group_of: HashMap<usize, usize> = HashMap::new();
    let mut groups: Vec<(Sizer, Vec<usize>)> = Vec::new();
    let mut plain: Vec<usize> = Vec::new();
    let mut call_bytes = 0;
    for (index, record) in queue.iter().enumerate() {
        let key = record.key();
        if blocked.contains(key) {
            continue;
        }
        if record.not_before() > now {
            blocked.insert(key);
            continue;
        }
        let shard = shard_of(key);
        let group = match group_of.get(&shard) {
            Some(&group) => group,
            None if groups.len() + plain.len() < MAX_RECORDS_PER_CALL => {
                groups.push((Sizer::default(), Vec::new()));
                group_of.insert(shard, groups.len() - 1);
                groups.len() - 1
            }
            None => {
                blocked.insert(key);
                continue;
            }
        };
        let slots_used = groups.len() + plain.len();
        let (sizer, members) = &mut groups[group];
        let before = sizer.size();
        let after = sizer.size_with(key, record.data_len());
        if after > max_record_bytes || !record.aggregatable() {
            // Too large to aggregate even alone, or pinned to a shard by an explicit hash
            // key: it goes as a plain record, if its key has nothing else in this call.
            // Otherwise the key waits for the next call.
            let alone = Sizer::default().size_with(key, record.data_len());
            let fits_call = call_bytes + record.size() <= MAX_BYTES_PER_CALL || call_bytes == 0;
            let room = slots_used < MAX_RECORDS_PER_CALL;
            if (alone > max_record_bytes || !record.aggregatable())
                && record.size() <= max_record_bytes
                && !in_call.contains(key)
                && fits_call
                && room
            {
                call_bytes += record.size();
                plain.push(index);
                in_call.insert(key);
            }
            blocked.insert(key);
            continue;
        }
        if call_bytes - before + after > MAX_BYTES_PER_CALL {
            blocked.insert(key);
            continue;
        }
        call_bytes = call_bytes - before + after;
        sizer.add(key, record.data_len());
        members.push(index);
        in_call.insert(key);
    }
    let mut planned: Vec<Planned> = groups
        .into_iter()
        .filter(|(_, members)| !members.is_empty())
        .map(|(_, members)| Planned::Aggregated(members))
        .chain(plain.into_iter().map(Planned::Plain))
        .collect();
    planned.sort_by_key(|p| p.members()[0]);
    planned
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
            self.1 + self.0.len()
        }
        fn data_len(&self) -> usize {
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
            vec![0, 1, 2, 3, 5],
            "the fifth MiB does not fit (keys count too); the small record still does"
        );
        let bigger = vec![Q("a", 3 * mib, 0), Q("b", 3 * mib, 0), Q("c", mib, 0)];
        // (3 MiB, then 3 MiB would pass 5 MiB, then 1 MiB still fits.)
        assert_eq!(plan(&bigger, now), vec![0, 2]);
    }

    #[test]
    fn aggregation_groups_by_shard_and_keeps_keys_whole() {
        let now = base() + Duration::from_millis(10);
        // Keys map to shards by their first letter.
        let shard = |key: &str| usize::from(key.as_bytes()[0] - b'a');
        let queue = vec![
            Q("a1", 10, 0),
            Q("b1", 10, 0),
            Q("a2", 10, 0),
            Q("a1", 10, 0),
            Q("c1", 10, 99),
            Q("c1", 10, 0),
        ];
        assert_eq!(
            plan_aggregated(&queue, now, shard, 1024 * 1024),
            vec![
                Planned::Aggregated(vec![0, 2, 3]),
                Planned::Aggregated(vec![1])
            ],
            "c1 waits for its retry, and so does its later record"
        );

        // A full aggregate: the key that does not fit waits whole, others still fit.
        let queue = vec![
            Q("a1", 600, 0),
            Q("a2", 600, 0),
            Q("a3", 100, 0),
            Q("a2", 10, 0),
        ];
        let planned = plan_aggregated(&queue, now, shard, 1000);
        assert_eq!(planned, vec![Planned::Aggregated(vec![0, 2])]);

        // Too big to aggregate: alone, as a plain record.
        let queue = vec![Q("a1", 995, 0), Q("a1", 10, 0), Q("a2", 10, 0)];
        let planned = plan_aggregated(&queue, now, shard, 1000);
        assert_eq!(
            planned,
            vec![Planned::Plain(0), Planned::Aggregated(vec![2])]
        );
    }

    /// A record pinned to its shard by an explicit hash key (or not).
    struct Pinned(&'static str, bool);

    impl Queued for Pinned {
        fn key(&self) -> &str {
            self.0
        }
        fn size(&self) -> usize {
            10 + self.0.len()
        }
        fn data_len(&self) -> usize {
            10
        }
        fn aggregatable(&self) -> bool {
            !self.1
        }
        fn not_before(&self) -> Instant {
            base()
        }
    }

    #[test]
    fn a_record_with_an_explicit_hash_key_is_never_aggregated() {
        let now = base() + Duration::from_millis(10);
        let queue = vec![
            Pinned("a1", false),
            Pinned("a2", true),
            Pinned("a3", false),
            Pinned("a4", true),
        ];
        let planned = plan_aggregated(&queue, now, |_| 0, 1024 * 1024);
        assert_eq!(
            planned,
            vec![
                Planned::Aggregated(vec![0, 2]),
                Planned::Plain(1),
                Planned::Plain(3)
            ],
            "same shard, room to spare: the pinned ones still go alone"
        );
    }
}
