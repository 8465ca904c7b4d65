//! The AWS quotas the gateway holds messages and records to, as AWS documents them,
//! written once here, below everything that applies them (admission, routing, the sinks,
//! configuration defaults). The `PutRecords` call limits are with the Kinesis batching.

/// AWS IoT Core's maximum message payload (128 KB).
pub const IOT_CORE_MAX_PAYLOAD_BYTES: usize = 128 * 1024;

/// The per-connection throughput IoT Core recommends staying under (512 KB/s).
pub const IOT_CORE_CONNECTION_BYTES_PER_SEC: u64 = 512 * 1024;

/// Kinesis' default maximum record size (1 MiB, data plus partition key).
pub const KINESIS_DEFAULT_MAX_RECORD_BYTES: usize = 1024 * 1024;

/// The largest record a stream can be raised to with `UpdateMaxRecordSize` (10 MiB).
pub const KINESIS_LARGEST_MAX_RECORD_BYTES: usize = 10 * 1024 * 1024;

/// Kinesis: a partition key is 1 to 256 Unicode characters (`PutRecords`).
pub const KINESIS_MAX_PARTITION_KEY_CHARS: usize = 256;

/// IoT Core: topic filters in one SUBSCRIBE.
pub const IOT_CORE_MAX_FILTERS_PER_SUBSCRIBE: usize = 8;

/// IoT Core: subscriptions per connection.
pub const IOT_CORE_MAX_SUBSCRIPTIONS: usize = 50;
