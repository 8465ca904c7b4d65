//! How spooled records and dead letters are stored: postcard (a compact serde format)
//! over types of our own, so the stored layout changes only when these types do.

use serde::{Deserialize, Serialize};

use crate::message::Message;
use crate::record::Record;
use crate::route::{Decision, Destination};

/// A routed record as stored (decoded; [`RecordRef`] encodes).
#[derive(Deserialize)]
struct StoredRecord {
    id: String,
    device_id: String,
    topic: String,
    content_type: String,
    qos: u8,
    attributes: Vec<(String, String)>,
    received_at_ms: u64,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
    destination: StoredDestination,
    rule: String,
    reason: String,
}

/// [`StoredRecord`] borrowing from a [`Record`], for encoding without copies. Field
/// for field the same layout: postcard writes both the same way.
#[derive(Serialize)]
struct RecordRef<'a> {
    id: &'a str,
    device_id: &'a str,
    topic: &'a str,
    content_type: &'a str,
    qos: u8,
    attributes: &'a [(String, String)],
    received_at_ms: u64,
    #[serde(with = "serde_bytes")]
    payload: &'a [u8],
    destination: DestinationRef<'a>,
    rule: &'a str,
    reason: &'a str,
}

/// [`StoredDestination`], borrowed.
#[derive(Serialize)]
enum DestinationRef<'a> {
    IotCore {
        topic: &'a str,
        qos: u8,
    },
    Kinesis {
        stream: &'a str,
        partition_key: &'a str,
        explicit_hash_key: Option<&'a str>,
    },
    Local,
    Drop,
    DeadLetter,
}

impl<'a> RecordRef<'a> {
    fn new(record: &'a Record) -> RecordRef<'a> {
        let m = &record.message;
        let destination = match &record.decision.destination {
            Destination::IotCore { topic, qos } => DestinationRef::IotCore { topic, qos: *qos },
            Destination::Kinesis {
                stream,
                partition_key,
                explicit_hash_key,
            } => DestinationRef::Kinesis {
                stream,
                partition_key,
                explicit_hash_key: explicit_hash_key.as_deref(),
            },
            Destination::Local => DestinationRef::Local,
            Destination::Drop => DestinationRef::Drop,
            Destination::DeadLetter => DestinationRef::DeadLetter,
        };
        RecordRef {
            id: &m.id,
            device_id: &m.device_id,
            topic: &m.topic,
            content_type: &m.content_type,
            qos: m.qos,
            attributes: &m.attributes,
            received_at_ms: m.received_at_ms,
            payload: &m.payload,
            destination,
            rule: &record.decision.rule,
            reason: &record.decision.reason,
        }
    }
}

/// [`Destination`] as stored (postcard cannot read serde's tagged enums).
#[derive(Deserialize)]
enum StoredDestination {
    IotCore {
        topic: String,
        qos: u8,
    },
    Kinesis {
        stream: String,
        partition_key: String,
        explicit_hash_key: Option<String>,
    },
    Local,
    Drop,
    DeadLetter,
}

impl StoredRecord {
    fn into_record(self) -> Record {
        let destination = match self.destination {
            StoredDestination::IotCore { topic, qos } => Destination::IotCore { topic, qos },
            StoredDestination::Kinesis {
                stream,
                partition_key,
                explicit_hash_key,
            } => Destination::Kinesis {
                stream,
                partition_key,
                explicit_hash_key,
            },
            StoredDestination::Local => Destination::Local,
            StoredDestination::Drop => Destination::Drop,
            StoredDestination::DeadLetter => Destination::DeadLetter,
        };
        Record {
            message: Message {
                id: self.id,
                device_id: self.device_id,
                topic: self.topic,
                content_type: self.content_type,
                qos: self.qos,
                attributes: self.attributes,
                received_at_ms: self.received_at_ms,
                payload: self.payload,
            },
            decision: Decision {
                destination,
                rule: self.rule,
                reason: self.reason,
            },
        }
    }
}

/// Encodes a record for the spool.
pub fn encode_record(record: &Record) -> Vec<u8> {
    postcard::to_stdvec(&RecordRef::new(record))
        .expect("a record always encodes: it has no maps with non-string keys")
}

/// Decodes a spooled record.
pub fn decode_record(bytes: &[u8]) -> Result<Record, postcard::Error> {
    postcard::from_bytes::<StoredRecord>(bytes).map(StoredRecord::into_record)
}

/// Where a dead letter failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "kebab-case")]
pub enum Origin {
    /// A plugin failed on the message (the stored message is its input to that plugin).
    Plugin {
        /// The plugin's name.
        plugin: String,
        /// The failure code (`plugin_trap`, `plugin_refused`, …).
        code: String,
    },
    /// The sink refused the record for good (the stored record keeps its destination).
    Sink {
        /// `kinesis` or `iot-core`.
        sink: String,
    },
    /// A topic rule sends matching messages to the dead-letter store.
    Rule {
        /// The rule (`rule:NAME`).
        rule: String,
    },
    /// Its `mqtt.message_expiry` passed while it waited in the spool (the stored record
    /// keeps its destination).
    Expired,
}

/// A dead letter as stored: the record, where it failed, why, and when.
#[derive(Deserialize)]
struct StoredDeadLetter {
    record: StoredRecord,
    origin: StoredOrigin,
    reason: String,
    at_ms: u64,
}

/// [`StoredDeadLetter`], borrowed.
#[derive(Serialize)]
struct DeadLetterRef<'a> {
    record: RecordRef<'a>,
    origin: StoredOrigin,
    reason: &'a str,
    at_ms: u64,
}

/// [`Origin`] as stored.
#[derive(Serialize, Deserialize)]
enum StoredOrigin {
    Plugin { plugin: String, code: String },
    Sink { sink: String },
    Rule { rule: String },
    Expired,
}

/// A message that cannot be delivered, with the reason.
pub struct DeadLetter {
    /// The record (for plugin failures, the destination is the dead-letter store).
    pub record: Record,
    /// Where it failed.
    pub origin: Origin,
    /// Why, in words.
    pub reason: String,
    /// When it was dead-lettered (milliseconds since the Unix epoch).
    pub at_ms: u64,
}

/// Encodes a dead letter.
pub fn encode_dead_letter(dead: &DeadLetter) -> Vec<u8> {
    let origin = match &dead.origin {
        Origin::Plugin { plugin, code } => StoredOrigin::Plugin {
            plugin: plugin.clone(),
            code: code.clone(),
        },
        Origin::Sink { sink } => StoredOrigin::Sink { sink: sink.clone() },
        Origin::Rule { rule } => StoredOrigin::Rule { rule: rule.clone() },
        Origin::Expired => StoredOrigin::Expired,
    };
    postcard::to_stdvec(&DeadLetterRef {
        record: RecordRef::new(&dead.record),
        origin,
        reason: &dead.reason,
        at_ms: dead.at_ms,
    })
    .expect("a dead letter always encodes")
}

/// Decodes a dead letter.
pub fn decode_dead_letter(bytes: &[u8]) -> Result<DeadLetter, postcard::Error> {
    let stored: StoredDeadLetter = postcard::from_bytes(bytes)?;
    let origin = match stored.origin {
        StoredOrigin::Plugin { plugin, code } => Origin::Plugin { plugin, code },
        StoredOrigin::Sink { sink } => Origin::Sink { sink },
        StoredOrigin::Rule { rule } => Origin::Rule { rule },
        StoredOrigin::Expired => Origin::Expired,
    };
    Ok(DeadLetter {
        record: stored.record.into_record(),
        origin,
        reason: stored.reason,
        at_ms: stored.at_ms,
    })
}
