//! AWS IoT Core quotas the gateway holds messages to; written once, here.

/// AWS IoT Core's maximum message payload (128 KB).
pub const IOT_CORE_MAX_PAYLOAD_BYTES: usize = 128 * 1024;

/// The per-connection throughput IoT Core recommends staying under (512 KB/s).
pub const IOT_CORE_CONNECTION_BYTES_PER_SEC: u64 = 512 * 1024;
