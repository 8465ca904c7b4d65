//! One batch's way: plugins, routing, delivery, and the report the device gets.
//!
//! Per input message, the outcome is one of:
//!
//! - `accepted`: every part was routed and the sink confirmed it (dropped parts and
//!   dead-lettered parts are listed in the report);
//! - `dropped`: a plugin or a rule discarded it on purpose;
//! - `dead-lettered`: it failed in a plugin and `plugins.on_failure = "dead-letter"` put
//!   it in the dead-letter store;
//! - `rejected`: it failed in a plugin and `plugins.on_failure = "reject"`; none of its
//!   parts was delivered, so the device may fix it and send it again.
//!
//! If the sink cannot take the batch, nothing of it is acknowledged.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;

use crate::config::{Config, FailurePath};
use crate::message::Message;
use crate::plugin::{FailureKind, InputResult, Plugins};
use crate::route::meter::ThroughputMeter;
use crate::route::{Decision, Destination, Facts, Policy};
use crate::sink::{Record, Sink, SinkError};

/// The assembled message path.
pub struct Pipeline {
    /// The plugin chain.
    plugins: Plugins,
    /// The built-in routing policy.
    policy: Policy,
    /// Per-device throughput, one of the policy's facts.
    meter: ThroughputMeter,
    /// Where routed records go.
    sink: Arc<dyn Sink>,
    /// What happens to messages that fail in a plugin.
    on_failure: FailurePath,
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

/// Where one part of a message went.
#[derive(Debug, Clone, Serialize)]
pub struct RouteReport {
    /// The part's id (the message id, or `<id>-<n>` after a split).
    pub id: String,
    /// The routing decision.
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

impl Pipeline {
    /// Assembles the path from its parts.
    pub fn new(config: &Config, plugins: Plugins, sink: Arc<dyn Sink>) -> Pipeline {
        Pipeline {
            plugins,
            policy: Policy::new(&config.routing),
            meter: ThroughputMeter::default(),
            sink,
            on_failure: config.plugins.on_failure,
        }
    }

    /// The largest payload accepted (the Kinesis record limit).
    pub fn max_payload_bytes(&self) -> usize {
        self.policy.max_payload_bytes()
    }

    /// Runs a batch through plugins, routing and the sink. `bidirectional` says the
    /// sender takes part in command & control.
    pub async fn process(
        &self,
        batch: Vec<Message>,
        bidirectional: bool,
    ) -> Result<Vec<MessageReport>, SinkError> {
        let ids: Vec<String> = batch.iter().map(|m| m.id.clone()).collect();
        let rates = self.measure(&batch);
        let results = self.plugins.run(batch).await;
        let mut records = Vec::new();
        let mut reports = Vec::with_capacity(results.len());
        for (id, result) in ids.into_iter().zip(results) {
            reports.push(self.settle(id, result, &rates, bidirectional, &mut records));
        }
        let deliverable: Vec<Record> = records
            .into_iter()
            .filter(|record| record.decision.destination != Destination::Drop)
            .collect();
        if !deliverable.is_empty() {
            let redirects = self.sink.deliver(deliverable).await?;
            apply_redirects(&mut reports, redirects);
        }
        Ok(reports)
    }

    /// Counts the batch's bytes per device and returns each device's rate.
    fn measure(&self, batch: &[Message]) -> HashMap<String, u64> {
        let mut bytes: HashMap<&str, u64> = HashMap::new();
        for message in batch {
            *bytes.entry(message.device_id.as_str()).or_default() += message.payload.len() as u64;
        }
        bytes
            .into_iter()
            .map(|(device, n)| (device.to_string(), self.meter.record(device, n)))
            .collect()
    }

    /// Decides the fate of one input message, adding its records for the sink.
    fn settle(
        &self,
        id: String,
        result: InputResult,
        rates: &HashMap<String, u64>,
        bidirectional: bool,
        records: &mut Vec<Record>,
    ) -> MessageReport {
        let mut report = MessageReport {
            id,
            status: Status::Accepted,
            routes: Vec::new(),
            error: None,
            failure_kind: None,
        };
        if let Some(first) = result.failures.first() {
            report.error = Some(FailureReport {
                code: first.kind.code(),
                plugin: first.plugin.clone(),
                message: first.reason.clone(),
            });
            report.failure_kind = Some(first.kind);
            if self.on_failure == FailurePath::Reject {
                report.status = Status::Rejected;
                return report;
            }
        } else if result.outputs.is_empty() && result.dropped == 0 {
            // The chain accounted for nothing: the host lost the batch (it is stopping).
            report.status = Status::Rejected;
            report.failure_kind = Some(FailureKind::Unavailable);
            report.error = Some(FailureReport {
                code: FailureKind::Unavailable.code(),
                plugin: String::new(),
                message: "the plugin host is unavailable".to_string(),
            });
            return report;
        }
        for failure in result.failures {
            let decision = Decision {
                destination: Destination::DeadLetter,
                rule: format!("failure:{}", failure.kind.code()),
                reason: failure.reason,
            };
            report.routes.push(RouteReport {
                id: failure.message.id.clone(),
                decision: decision.clone(),
            });
            records.push(Record {
                message: failure.message,
                decision,
            });
        }
        for output in result.outputs {
            let facts = Facts {
                bidirectional,
                device_bytes_per_sec: rates.get(&output.message.device_id).copied().unwrap_or(0),
            };
            let builtin = self.policy.decide(&output.message, facts);
            let decision = match output.router {
                Some(choice) => self.policy.overrule(
                    builtin,
                    &choice.plugin,
                    choice.destination,
                    &choice.reason,
                    &output.message,
                ),
                None => builtin,
            };
            report.routes.push(RouteReport {
                id: output.message.id.clone(),
                decision: decision.clone(),
            });
            records.push(Record {
                message: output.message,
                decision,
            });
        }
        report.status = status_of(&report.routes);
        report
    }
}

/// The status of a message from where its parts went.
fn status_of(routes: &[RouteReport]) -> Status {
    let kinds = || routes.iter().map(|route| &route.decision.destination);
    if kinds().all(|d| *d == Destination::Drop) {
        Status::Dropped
    } else if kinds().all(|d| matches!(d, Destination::DeadLetter | Destination::Drop)) {
        Status::DeadLettered
    } else {
        Status::Accepted
    }
}

/// Updates reports for records a sink refused and the dead-letter store took instead.
fn apply_redirects(reports: &mut [MessageReport], redirects: Vec<crate::sink::Redirect>) {
    if redirects.is_empty() {
        return;
    }
    for report in reports.iter_mut() {
        let mut changed = false;
        for route in &mut report.routes {
            if let Some(redirect) = redirects.iter().find(|r| r.id == route.id) {
                route.decision = redirect.decision.clone();
                changed = true;
            }
        }
        if changed {
            report.status = status_of(&report.routes);
        }
    }
}
