//! What a device is told about each message, whatever its protocol: a [`Verdict`],
//! accepted (with its report) or refused (with a [`Refusal`] kind).
//!
//! The pipeline's answer is turned into verdicts here, once ([`verdicts`]); each protocol
//! then has one exhaustive `match` from a verdict to its wire form: an HTTP status and
//! body (`http::answer`), a WebSocket frame (`ws::frames`), an MQTT reason code
//! (`mqtt::answer`). No protocol looks at a refusal's message to choose its answer.

use crate::auth::AuthError;
use crate::pipeline::{FailureReport, MessageReport, Status, StoreError};
use crate::plugin::FailureKind;
use crate::spool::SpoolError;

/// What one message of a device gets.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Safe (spooled, handed over on a best-effort route), dropped or dead-lettered on
    /// purpose: the device is told so, with the report (its id, status and routes).
    Accepted(MessageReport),
    /// Not taken; nothing of it was kept.
    Refused(Refusal),
}

/// Every refusal a device can get, whatever its protocol. Each has a stable
/// [`code`](Refusal::code) (the HTTP body's `code`, the WebSocket error frame's, the
/// `refused_total` metric's label) and a message in words.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// `bad_request`: a malformed QoS, device id, attributes, batch body or frame.
    BadRequest(String),
    /// `bad_request` too, but for a topic that is not a valid topic name (empty,
    /// wildcards, over IoT Core's length or depth), which MQTT says apart.
    BadTopic(String),
    /// The credential's reason code ([`AuthError::code`]).
    Unauthorized(AuthError),
    /// `topic_denied`: no policy grant lets the device publish there.
    Forbidden {
        /// The topic.
        topic: String,
        /// The device.
        device: String,
    },
    /// `topic_reserved`: the topic belongs to the gateway (commands) or to
    /// IoT Core (its replies and notifications).
    Reserved {
        /// The topic.
        topic: String,
    },
    /// `rate_limited`: over a grant's rate; the device should wait `retry_after`.
    RateLimited {
        /// The grant.
        grant: String,
        /// Which limit.
        limit: &'static str,
        /// Seconds to wait (at least 1).
        retry_after: u64,
    },
    /// `payload_too_large`: a payload over the record limit or a grant's
    /// `max_payload_bytes`, or a batch over its limits.
    TooLarge(String),
    /// `plugin_*` (the [`FailureKind`]'s code): a plugin refused the message or failed
    /// on it, and `plugins.on_failure` is `reject`.
    Plugin {
        /// The message id.
        id: String,
        /// How it failed.
        kind: FailureKind,
        /// The plugin.
        plugin: String,
        /// Why.
        message: String,
    },
    /// Nothing of the request was acknowledged or kept, and the device should try again
    /// after `retry_after`:
    /// - `spool_full`: the spool for a sink the request needs is at its limit
    ///   (`spool.max_bytes_per_sink`), because that sink is slow or down;
    /// - `dead_letters_full`: the request's messages would be dead-lettered, and the
    ///   dead-letter store is at `spool.max_dead_letter_bytes`;
    /// - `best_effort_busy`: too many best-effort messages wait for their sinks;
    /// - `spool_unavailable`: the spool cannot write (disk error) or is shutting down;
    /// - `leaving`: the gateway is shutting down (`server.leave_delay_ms`).
    Unavailable {
        /// The code.
        code: &'static str,
        /// In words.
        message: String,
        /// Seconds the device should wait.
        retry_after: u32,
    },
}

impl From<StoreError> for Refusal {
    fn from(error: StoreError) -> Self {
        if let StoreError::BestEffortTooMany { .. } = error {
            return Refusal::TooLarge(error.to_string());
        }
        let (code, retry_after) = match &error {
            StoreError::Spool(SpoolError::Full { .. }) => ("spool_full", 5),
            StoreError::Spool(SpoolError::DeadLettersFull { .. }) => ("dead_letters_full", 30),
            StoreError::BestEffortFull { .. } | StoreError::BestEffortTooMany { .. } => {
                ("best_effort_busy", 1)
            }
            StoreError::Spool(_) => ("spool_unavailable", 1),
        };
        Refusal::Unavailable {
            code,
            message: error.to_string(),
            retry_after,
        }
    }
}

impl Refusal {
    /// The stable code of the refusal.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::BadRequest(_) | Refusal::BadTopic(_) => "bad_request",
            Refusal::TooLarge(_) => "payload_too_large",
            Refusal::Unauthorized(error) => error.code(),
            Refusal::Forbidden { .. } => "topic_denied",
            Refusal::Reserved { .. } => "topic_reserved",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::Plugin { kind, .. } => kind.code(),
            Refusal::Unavailable { code, .. } => code,
        }
    }

    /// The refusal in words.
    pub fn message(&self) -> String {
        match self {
            Refusal::BadRequest(message)
            | Refusal::BadTopic(message)
            | Refusal::TooLarge(message) => message.clone(),
            Refusal::Unauthorized(error) => error.to_string(),
            Refusal::Forbidden { topic, device } => {
                format!("no policy grant lets `{device}` publish to `{topic}`")
            }
            Refusal::Reserved { topic } => format!(
                "`{topic}` is a topic the gateway or IoT Core owns (device commands; IoT Core's replies and notifications); devices do not publish there"
            ),
            Refusal::RateLimited {
                grant,
                limit,
                retry_after,
            } => format!("over the {limit} of policy grant `{grant}`; retry after {retry_after} s"),
            Refusal::Plugin { message, .. } => message.clone(),
            Refusal::Unavailable { message, .. } => {
                format!("{message}; nothing was kept, retry later")
            }
        }
    }

    /// Seconds the device should wait before sending again, when it should.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Refusal::RateLimited { retry_after, .. } => Some(*retry_after),
            Refusal::Unavailable { retry_after, .. } => Some(u64::from(*retry_after)),
            _ => None,
        }
    }

    /// The pipeline answered without a report for a message (it is stopping): nothing
    /// was kept, try again.
    fn no_report() -> Refusal {
        Refusal::Unavailable {
            code: "spool_unavailable",
            message: "the pipeline gave no report for the message".to_string(),
            retry_after: 1,
        }
    }
}

impl Verdict {
    /// The verdict of one message's report: refused when a plugin rejected it.
    pub fn of(report: MessageReport) -> Verdict {
        if report.status != Status::Rejected {
            return Verdict::Accepted(report);
        }
        let kind = report.failure_kind.unwrap_or(FailureKind::Unavailable);
        let FailureReport {
            plugin, message, ..
        } = report.error.unwrap_or_else(|| FailureReport {
            code: kind.code(),
            plugin: String::new(),
            message: "rejected".to_string(),
        });
        Verdict::Refused(Refusal::Plugin {
            id: report.id,
            kind,
            plugin,
            message,
        })
    }
}

/// The verdicts of `count` messages the pipeline was given, in their order, from what it
/// answered: each message's report, or the refusal of them all.
pub fn verdicts(outcome: Result<Vec<MessageReport>, StoreError>, count: usize) -> Vec<Verdict> {
    match outcome {
        Ok(reports) => {
            let mut verdicts: Vec<Verdict> = reports.into_iter().map(Verdict::of).collect();
            verdicts.resize_with(count, || Verdict::Refused(Refusal::no_report()));
            verdicts
        }
        Err(error) => vec![Verdict::Refused(Refusal::from(error)); count],
    }
}

/// The verdict of a single message (see [`verdicts`]).
pub fn verdict(outcome: Result<Vec<MessageReport>, StoreError>) -> Verdict {
    verdicts(outcome, 1)
        .pop()
        .unwrap_or_else(|| Verdict::Refused(Refusal::no_report()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One refusal of every kind (every code once, `bad_request` twice: a bad topic is
    /// its own kind), in the order of the answer tables' tests.
    pub(crate) fn every_refusal() -> Vec<Refusal> {
        let plugin = |kind| Refusal::Plugin {
            id: "m".to_string(),
            kind,
            plugin: "p".to_string(),
            message: "why".to_string(),
        };
        let unavailable = |code| Refusal::Unavailable {
            code,
            message: "busy".to_string(),
            retry_after: 1,
        };
        vec![
            Refusal::BadRequest("qos".to_string()),
            Refusal::BadTopic("topic".to_string()),
            Refusal::Unauthorized(AuthError::MissingCredentials),
            Refusal::Forbidden {
                topic: "t".to_string(),
                device: "d".to_string(),
            },
            Refusal::Reserved {
                topic: "t".to_string(),
            },
            Refusal::RateLimited {
                grant: "g".to_string(),
                limit: "max_messages_per_sec",
                retry_after: 1,
            },
            Refusal::TooLarge("big".to_string()),
            plugin(FailureKind::Refused),
            plugin(FailureKind::Trap),
            plugin(FailureKind::Timeout),
            plugin(FailureKind::MemoryLimit),
            plugin(FailureKind::BadOutput),
            plugin(FailureKind::Unavailable),
            unavailable("spool_full"),
            unavailable("dead_letters_full"),
            unavailable("best_effort_busy"),
            unavailable("spool_unavailable"),
        ]
    }

    fn report(status: Status, kind: Option<FailureKind>) -> MessageReport {
        MessageReport {
            id: "m".to_string(),
            status,
            routes: Vec::new(),
            error: kind.map(|kind| FailureReport {
                code: kind.code(),
                plugin: "p".to_string(),
                message: "why".to_string(),
            }),
            failure_kind: kind,
        }
    }

    /// The pipeline's answers, each with the verdict (or refusal code) it gives.
    #[test]
    fn the_pipeline_answer_maps_to_one_verdict_per_message() {
        let full = || {
            StoreError::Spool(SpoolError::Full {
                sink: "local",
                bytes: 2,
                limit: 1,
            })
        };
        type Outcome = Result<Vec<MessageReport>, StoreError>;
        let cases: Vec<(Outcome, usize, Vec<&str>)> = vec![
            (
                Ok(vec![report(Status::Accepted, None)]),
                1,
                vec!["accepted"],
            ),
            (Ok(vec![report(Status::Dropped, None)]), 1, vec!["dropped"]),
            (
                Ok(vec![report(Status::DeadLettered, Some(FailureKind::Trap))]),
                1,
                vec!["dead-lettered"],
            ),
            (
                Ok(vec![report(Status::Rejected, Some(FailureKind::Refused))]),
                1,
                vec!["plugin_refused"],
            ),
            (
                Ok(vec![report(Status::Rejected, Some(FailureKind::Timeout))]),
                1,
                vec!["plugin_timeout"],
            ),
            (
                Ok(vec![report(Status::Rejected, None)]),
                1,
                vec!["plugin_unavailable"],
            ),
            // No report (the pipeline is stopping): the same refusal for every protocol.
            (
                Ok(vec![report(Status::Accepted, None)]),
                2,
                vec!["accepted", "spool_unavailable"],
            ),
            (Err(full()), 2, vec!["spool_full", "spool_full"]),
            (
                Err(StoreError::BestEffortTooMany { count: 9, limit: 2 }),
                1,
                vec!["payload_too_large"],
            ),
            (
                Err(StoreError::BestEffortFull { limit: 2 }),
                1,
                vec!["best_effort_busy"],
            ),
        ];
        for (index, (outcome, count, expected)) in cases.into_iter().enumerate() {
            let got: Vec<String> = verdicts(outcome, count)
                .into_iter()
                .map(|verdict| match verdict {
                    Verdict::Accepted(report) => serde_json::to_value(report.status)
                        .unwrap()
                        .as_str()
                        .unwrap()
                        .to_string(),
                    Verdict::Refused(refusal) => refusal.code().to_string(),
                })
                .collect();
            assert_eq!(got, expected, "case {index}");
        }
    }
}
