//! KPL aggregation: many small user records packed into one Kinesis record in the
//! format the Kinesis Producer Library writes and the Kinesis Client Library reads
//! (`aws-kinesis-agg` and KCL de-aggregate it unchanged):
//!
//! ```text
//! magic F3 89 9A C2 | protobuf AggregatedRecord | MD5 of the protobuf bytes (16)
//! ```
//!
//! Sizes are accounted exactly while records are added, so an aggregated record is
//! never over the stream's record limit (the limit counts the data and the Kinesis
//! record's partition key, which is the first user record's key).

use std::collections::HashMap;

use md5::{Digest, Md5};
use prost::Message as _;
use prost::encoding::encoded_len_varint;

/// The first four bytes of every aggregated record.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
/// Bytes of an MD5 digest (the trailer).
const DIGEST_LEN: usize = 16;

/// The KPL's `AggregatedRecord` message (proto2).
#[derive(Clone, PartialEq, prost::Message)]
struct AggregatedRecord {
    #[prost(string, repeated, tag = "1")]
    partition_key_table: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    explicit_hash_key_table: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    records: Vec<UserRecord>,
}

/// The KPL's `Record` message (proto2).
#[derive(Clone, PartialEq, prost::Message)]
struct UserRecord {
    #[prost(uint64, required, tag = "1")]
    partition_key_index: u64,
    #[prost(uint64, optional, tag = "2")]
    explicit_hash_key_index: Option<u64>,
    #[prost(bytes = "vec", required, tag = "3")]
    data: Vec<u8>,
}

/// Exact size accounting of an aggregated record, without its data: what the planner
/// uses to decide what fits, and what [`Aggregate`] checks itself against.
#[derive(Default)]
pub struct Sizer {
    /// Partition keys so far, with their index in the key table.
    key_index: HashMap<String, u64>,
    /// The protobuf's encoded length so far.
    proto_len: usize,
    /// Length of the first key: the Kinesis record's partition key.
    first_key_len: Option<usize>,
}

/// Protobuf bytes of a length-delimited field with a one-byte tag.
fn field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

impl Sizer {
    /// The Kinesis record's size (data plus partition key) with one more user record.
    pub fn size_with(&self, key: &str, data_len: usize) -> usize {
        let (index, key_entry) = match self.key_index.get(key) {
            Some(index) => (*index, 0),
            None => (self.key_index.len() as u64, field_len(key.len())),
        };
        let record = 1 + encoded_len_varint(index) + field_len(data_len);
        let proto = self.proto_len + key_entry + field_len(record);
        MAGIC.len() + proto + DIGEST_LEN + self.first_key_len.unwrap_or(key.len())
    }

    /// The Kinesis record's size so far (0 when empty).
    pub fn size(&self) -> usize {
        match self.first_key_len {
            Some(first) => MAGIC.len() + self.proto_len + DIGEST_LEN + first,
            None => 0,
        }
    }

    /// Counts one more user record; returns its key's index in the key table and
    /// whether the key is new.
    pub fn add(&mut self, key: &str, data_len: usize) -> (u64, bool) {
        let next = self.key_index.len() as u64;
        let mut new_key = false;
        let index = *self.key_index.entry(key.to_string()).or_insert_with(|| {
            new_key = true;
            next
        });
        if new_key {
            self.proto_len += field_len(key.len());
        }
        self.proto_len += field_len(1 + encoded_len_varint(index) + field_len(data_len));
        self.first_key_len.get_or_insert(key.len());
        (index, new_key)
    }
}

/// An aggregated record being filled.
#[derive(Default)]
pub struct Aggregate {
    message: AggregatedRecord,
    sizer: Sizer,
}

impl Aggregate {
    /// The Kinesis record's size (data plus partition key) if `data` under `key` were
    /// added.
    pub fn size_with(&self, key: &str, data_len: usize) -> usize {
        self.sizer.size_with(key, data_len)
    }

    /// Adds a user record.
    pub fn push(&mut self, key: &str, data: Vec<u8>) {
        let (index, new_key) = self.sizer.add(key, data.len());
        if new_key {
            self.message.partition_key_table.push(key.to_string());
        }
        let record = UserRecord {
            partition_key_index: index,
            explicit_hash_key_index: None,
            data,
        };
        self.message.records.push(record);
    }

    /// User records added so far.
    pub fn len(&self) -> usize {
        self.message.records.len()
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.message.records.is_empty()
    }

    /// The Kinesis record: (data, partition key).
    pub fn finish(self) -> (Vec<u8>, String) {
        let proto = self.message.encode_to_vec();
        debug_assert_eq!(
            proto.len(),
            self.sizer.proto_len,
            "size accounting matches the encoding"
        );
        let mut data = Vec::with_capacity(MAGIC.len() + proto.len() + DIGEST_LEN);
        data.extend_from_slice(&MAGIC);
        data.extend_from_slice(&proto);
        data.extend_from_slice(&Md5::digest(&proto));
        let key = self
            .message
            .partition_key_table
            .into_iter()
            .next()
            .unwrap_or_default();
        (data, key)
    }
}

/// Unpacks an aggregated record into (partition key, data) pairs; `None` if `data` is
/// not one (wrong magic or checksum). The gateway's own check; the tests also use the
/// independent `aws-kinesis-agg` package.
pub fn deaggregate(data: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let body = data.strip_prefix(&MAGIC)?;
    let (proto, digest) = body.split_at(body.len().checked_sub(DIGEST_LEN)?);
    if Md5::digest(proto).as_slice() != digest {
        return None;
    }
    let message = AggregatedRecord::decode(proto).ok()?;
    message
        .records
        .into_iter()
        .map(|record| {
            let key = message
                .partition_key_table
                .get(usize::try_from(record.partition_key_index).ok()?)?;
            Some((key.clone(), record.data))
        })
        .collect()
}

/// The 128-bit hash Kinesis maps a partition key with (MD5, big-endian).
pub fn hash_key(partition_key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_exact_and_the_record_round_trips() {
        let mut aggregate = Aggregate::default();
        let records: Vec<(String, Vec<u8>)> = (0..300)
            .map(|n| (format!("device-{}", n % 7), vec![b'x'; 50 + n % 200]))
            .collect();
        for (key, data) in &records {
            let predicted = aggregate.size_with(key, data.len());
            aggregate.push(key, data.clone());
            let first_key_len = records[0].0.len();
            let actual =
                MAGIC.len() + aggregate.message.encode_to_vec().len() + DIGEST_LEN + first_key_len;
            assert_eq!(predicted, actual);
        }
        let (data, key) = aggregate.finish();
        assert_eq!(key, "device-0");
        assert_eq!(&data[..4], &MAGIC);
        assert_eq!(deaggregate(&data).unwrap(), records);
    }

    #[test]
    fn corrupt_records_are_not_taken_for_aggregates() {
        let mut aggregate = Aggregate::default();
        aggregate.push("k", b"v".to_vec());
        let (mut data, _) = aggregate.finish();
        let last = data.len() - 1;
        data[last] ^= 1;
        assert!(deaggregate(&data).is_none());
        assert!(deaggregate(b"plain data").is_none());
    }

    #[test]
    fn hash_keys_are_md5_big_endian() {
        // MD5("") = d41d8cd98f00b204e9800998ecf8427e
        assert_eq!(hash_key(""), 0xd41d8cd98f00b204e9800998ecf8427e);
    }
}
