//! Kinesis Data Streams quotas the gateway holds records to, as AWS documents them;
//! written once, here. (The `PutRecords` call limits are with the batching, in
//! [`super::batch`].)

/// Kinesis' default maximum record size (1 MiB, data plus partition key).
pub const KINESIS_DEFAULT_MAX_RECORD_BYTES: usize = 1024 * 1024;

/// The largest record a stream can be raised to with `UpdateMaxRecordSize` (10 MiB).
pub const KINESIS_LARGEST_MAX_RECORD_BYTES: usize = 10 * 1024 * 1024;

/// Kinesis: a partition key is 1 to 256 Unicode characters (`PutRecords`).
pub const KINESIS_MAX_PARTITION_KEY_CHARS: usize = 256;
