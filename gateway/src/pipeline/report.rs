//! What a device is told about each message of a batch (the report), and why a batch
//! was not taken at all ([`StoreError`]).

use serde::Serialize;

use crate::plugin::FailureKind;
use crate::route::{Decision, Destination};
use crate::spool::SpoolError;

/// Why a batch was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The spool refused the batch (full, failing disk, shutting down).
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// Too many best-effort messages are waiting for their sinks.
    #[error("{limit} best-effort messages are already waiting for their sinks")]
    BestEffortFull {
        /// `spool.best_effort_max_in_flight`.
        limit: usize,
    },
    /// The batch alone holds more best-effort messages than may ever wait at once.
    #[error(
        "{count} best-effort messages in one request exceed spool.best_effort_max_in_flight of {limit}"
    )]
    BestEffortTooMany {
        /// Best-effort messages in the batch.
        count: usize,
        /// `spool.best_effort_max_in_flight`.
        limit: usize,
    },
}

/// What happened to one input message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Routed and confirmed by the sink.
    Accepted,
    /// Discarded on purpose.
    Dropped,
    /// Failed in a plugin and kept in the dead-letter store.
    DeadLettered,
    /// Failed in a plugin and refused; nothing of it was delivered.
    Rejected,
}

/// Where one part of a message went: `{"id", "destination", "rule", "reason"}`.
#[derive(Debug, Clone, Serialize)]
pub struct RouteReport {
    /// The part's id (the message id, or `<id>-<n>` after a split).
    pub id: String,
    /// The routing decision, its fields beside the id.
    #[serde(flatten)]
    pub decision: Decision,
}

/// Why a message was rejected or dead-lettered.
#[derive(Debug, Clone, Serialize)]
pub struct FailureReport {
    /// A stable code: `plugin_refused`, `plugin_trap`, `plugin_timeout`,
    /// `plugin_memory_limit`, `plugin_bad_output` or `plugin_unavailable`.
    pub code: &'static str,
    /// The plugin that failed.
    pub plugin: String,
    /// In words.
    pub message: String,
}

/// The report for one input message.
#[derive(Debug, Clone, Serialize)]
pub struct MessageReport {
    /// The message id the gateway assigned.
    pub id: String,
    /// What happened to it.
    pub status: Status,
    /// Where its parts went.
    pub routes: Vec<RouteReport>,
    /// Why it failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<FailureReport>,
    /// How the failure happened, for picking an HTTP status.
    #[serde(skip)]
    pub failure_kind: Option<FailureKind>,
}

impl Status {
    /// The status as reports and metrics spell it.
    pub fn name(self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::Dropped => "dropped",
            Status::DeadLettered => "dead-lettered",
            Status::Rejected => "rejected",
        }
    }
}

/// The status of a message from where its parts went.
pub(super) fn status_of(routes: &[RouteReport]) -> Status {
    let kinds = || routes.iter().map(|route| &route.decision.destination);
    if kinds().all(|d| *d == Destination::Drop) {
        Status::Dropped
    } else if kinds().all(|d| matches!(d, Destination::DeadLetter | Destination::Drop)) {
        Status::DeadLettered
    } else {
        Status::Accepted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_report_is_the_id_beside_every_field_of_the_decision() {
        let decision = Decision {
            destination: Destination::Kinesis {
                stream: "telemetry".to_string(),
                partition_key: "dev-1".to_string(),
                explicit_hash_key: Some("42".to_string()),
            },
            rule: "rule:big".to_string(),
            reason: "payload \"large\"".to_string(),
        };
        let report = RouteReport {
            id: "m-1".to_string(),
            decision: decision.clone(),
        };
        let mut expected = serde_json::json!({ "id": "m-1" });
        let fields = serde_json::to_value(&decision).unwrap();
        for (key, value) in fields.as_object().unwrap() {
            expected[key] = value.clone();
        }
        assert_eq!(serde_json::to_value(&report).unwrap(), expected);
        // And in this order: the id first, then the decision's fields as it writes them.
        let text = serde_json::to_string(&report).unwrap();
        assert!(
            text.starts_with(r#"{"id":"m-1","destination":{"type":"kinesis","#),
            "{text}"
        );
        assert!(
            text.ends_with(r#""rule":"rule:big","reason":"payload \"large\""}"#),
            "{text}"
        );
    }
}
