//! The `PutRecords` call, behind a small trait, with every error sorted into throttled,
//! transient (retry) or permanent (dead-letter).

use std::future::Future;
use std::pin::Pin;

use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;

/// One record of a call.
pub struct PutEntry {
    /// The record's data.
    pub data: Vec<u8>,
    /// Its partition key.
    pub partition_key: String,
    /// Its explicit hash key, if pinned.
    pub explicit_hash_key: Option<String>,
}

/// The answer for one record of a successful call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryResult {
    /// Stored, on this shard.
    Stored {
        /// The shard that took the record.
        shard_id: String,
    },
    /// Failed, worth retrying (throughput exceeded, internal failure, KMS throttling).
    Retry {
        /// Kinesis' error code.
        code: String,
        /// Kinesis' message.
        message: String,
    },
    /// Failed for good (KMS key disabled or not found, access denied).
    Permanent {
        /// Kinesis' error code.
        code: String,
        /// Kinesis' message.
        message: String,
    },
}

/// Why a whole call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// `ProvisionedThroughputExceededException` and the like: slow down and retry.
    Throttled(String),
    /// Network trouble, timeouts, server errors: retry.
    Transient(String),
    /// The stream is missing, access is denied, the request is invalid: never retry.
    Permanent(String),
}

/// A boxed future for the trait's methods.
pub type CallFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<EntryResult>, CallError>> + Send + 'a>>;

/// An open shard's range of 128-bit hash keys (inclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRange {
    /// The shard id.
    pub shard_id: String,
    /// Lowest hash key.
    pub start: u128,
    /// Highest hash key.
    pub end: u128,
}

/// A boxed future for `list_shards`.
pub type ShardsFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<ShardRange>, CallError>> + Send + 'a>>;

/// What the sink needs from Kinesis.
pub trait KinesisApi: Send + Sync {
    /// One `PutRecords` call; the answer has one result per entry, in order.
    fn put_records<'a>(&'a self, stream: &'a str, entries: Vec<PutEntry>) -> CallFuture<'a>;

    /// The stream's open shards (those still taking records).
    fn list_shards<'a>(&'a self, stream: &'a str) -> ShardsFuture<'a>;
}

/// Per-record error codes that are worth a retry.
const RETRYABLE_RECORD_CODES: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "InternalFailure",
    "KMSThrottlingException",
];

/// [`KinesisApi`] through the AWS SDK.
pub struct AwsKinesis {
    /// The SDK client (its own retries disabled: the sink retries per record).
    client: aws_sdk_kinesis::Client,
}

impl AwsKinesis {
    /// Wraps a client built from the shared AWS configuration.
    pub fn new(config: &aws_config::SdkConfig) -> AwsKinesis {
        AwsKinesis {
            client: aws_sdk_kinesis::Client::new(config),
        }
    }
}

impl KinesisApi for AwsKinesis {
    fn put_records<'a>(&'a self, stream: &'a str, entries: Vec<PutEntry>) -> CallFuture<'a> {
        Box::pin(async move {
            let count = entries.len();
            let mut request = self.client.put_records().stream_name(stream);
            for entry in entries {
                let built = PutRecordsRequestEntry::builder()
                    .data(Blob::new(entry.data))
                    .partition_key(entry.partition_key)
                    .set_explicit_hash_key(entry.explicit_hash_key)
                    .build()
                    .map_err(|error| CallError::Permanent(error.to_string()))?;
                request = request.records(built);
            }
            let output = request.send().await.map_err(classify)?;
            let results: Vec<EntryResult> = output
                .records()
                .iter()
                .map(|record| match record.error_code() {
                    None => EntryResult::Stored {
                        shard_id: record.shard_id().unwrap_or_default().to_string(),
                    },
                    Some(code) => {
                        let code = code.to_string();
                        let message = record.error_message().unwrap_or_default().to_string();
                        if RETRYABLE_RECORD_CODES.contains(&code.as_str()) {
                            EntryResult::Retry { code, message }
                        } else {
                            EntryResult::Permanent { code, message }
                        }
                    }
                })
                .collect();
            if results.len() != count {
                return Err(CallError::Transient(format!(
                    "PutRecords answered {} results for {count} records",
                    results.len()
                )));
            }
            Ok(results)
        })
    }

    fn list_shards<'a>(&'a self, stream: &'a str) -> ShardsFuture<'a> {
        Box::pin(self.open_shards(stream))
    }
}

impl AwsKinesis {
    async fn open_shards(&self, stream: &str) -> Result<Vec<ShardRange>, CallError> {
        let mut ranges = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let request = match &next {
                Some(token) => self.client.list_shards().next_token(token),
                None => self.client.list_shards().stream_name(stream),
            };
            let page = request.send().await.map_err(classify)?;
            for shard in page.shards() {
                let open = shard
                    .sequence_number_range()
                    .is_some_and(|r| r.ending_sequence_number().is_none());
                let (Some(range), true) = (shard.hash_key_range(), open) else {
                    continue;
                };
                let parse = |text: &str| {
                    text.parse::<u128>()
                        .map_err(|e| CallError::Transient(e.to_string()))
                };
                ranges.push(ShardRange {
                    shard_id: shard.shard_id().to_string(),
                    start: parse(range.starting_hash_key())?,
                    end: parse(range.ending_hash_key())?,
                });
            }
            next = page.next_token().map(str::to_string);
            if next.is_none() {
                break;
            }
        }
        ranges.sort_by_key(|range| range.start);
        Ok(ranges)
    }
}

/// Sorts an SDK error.
fn classify<E, R>(error: SdkError<E, R>) -> CallError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let text = DisplayErrorContext(&error).to_string();
    match &error {
        SdkError::ServiceError(context) => {
            let code = context.err().code().unwrap_or_default();
            let message = context.err().message().unwrap_or_default();
            let described = format!("{code}: {message}");
            if code.contains("ProvisionedThroughputExceeded")
                || code.contains("Throttling")
                || code == "LimitExceededException"
            {
                CallError::Throttled(described)
            } else if code.contains("InternalFailure")
                || code.contains("ServiceUnavailable")
                || code.is_empty()
            {
                CallError::Transient(if code.is_empty() { text } else { described })
            } else {
                CallError::Permanent(described)
            }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            CallError::Transient(text)
        }
        _ => CallError::Permanent(text),
    }
}
