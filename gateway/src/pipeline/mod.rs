//! One batch's way: plugins, routing, delivery, and the report the device gets.
//!
//! Per input message, the outcome is one of:
//!
//! - `accepted`: every part was routed and is safe: written to the spool and on disk
//!   (or, on a `best-effort` route, handed to its sink); dropped parts and dead-lettered
//!   parts are listed in the report;
//! - `dropped`: a plugin or a rule discarded it on purpose;
//! - `dead-lettered`: it failed in a plugin and `plugins.on_failure = "dead-letter"` put
//!   it in the dead-letter store;
//! - `rejected`: it failed in a plugin and `plugins.on_failure = "reject"`; none of its
//!   parts was delivered, so the device may fix it and send it again.
//!
//! If the spool cannot take the batch, nothing of it is acknowledged. Durable records for
//! the local sink are written straight to its file (`spool::direct`) after the spool's
//! commit, and the batch is acknowledged once both are on disk. Dead letters (a plugin
//! failed with `plugins.on_failure = "dead-letter"`, or a rule sends there) are written
//! to the spool's dead-letter store in the same change, before it is answered.
//!
//! - [`report`]: the report per message, and why a batch was not taken;
//! - [`redrive`]: dead letters run again.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{Config, Durability, ExpiredPath, FailurePath};
use crate::message::{Message, now_ms};
use crate::plugin::{FailureKind, InputResult, Plugins};
use crate::record::Record;
use crate::record::SinkId;
use crate::route::meter::ThroughputMeter;
use crate::route::{Decision, Destination, Facts, Policy};
use crate::sink::Sinks;
use crate::spool::best_effort::{BestEffort, Busy};
use crate::spool::codec::{DeadLetter, Origin};
use crate::spool::{Change, Spool};

mod redrive;
mod report;

use report::status_of;
pub use report::{FailureReport, MessageReport, RouteReport, Status, StoreError};

/// The assembled message path.
pub struct Pipeline {
    /// The plugin chain.
    plugins: Plugins,
    /// The routing settings; a configuration reload swaps them.
    rules: ArcSwap<RoutingRules>,
    /// Per-device throughput, one of the policy's facts.
    meter: ThroughputMeter,
    /// The sinks, to tell which one takes a destination.
    sinks: Arc<Sinks>,
    /// Where records wait for their sinks.
    spool: Arc<Spool>,
    /// The way to the sinks that bypasses the spool, for best-effort routes.
    best_effort: BestEffort,
    /// `spool.expired`, for records written straight to the local sink.
    expired: ExpiredPath,
}

/// The settings that decide where messages go and when devices hear back; a batch
/// runs with the ones it started with.
pub struct RoutingRules {
    /// The built-in routing policy.
    policy: Policy,
    /// What happens to messages that fail in a plugin.
    on_failure: FailurePath,
    /// When devices are acknowledged, unless a rule says otherwise.
    durability: Durability,
    /// Rules (`rule:NAME`) with their own durability.
    rule_durability: HashMap<String, Durability>,
}

impl RoutingRules {
    /// The rules of `config` (`[routing]`, `plugins.on_failure`, `spool.durability`).
    pub fn new(config: &Config) -> RoutingRules {
        RoutingRules {
            policy: Policy::new(&config.routing),
            on_failure: config.plugins.on_failure,
            durability: config.spool.durability,
            rule_durability: config
                .routing
                .rules
                .iter()
                .filter_map(|rule| Some((format!("rule:{}", rule.name), rule.durability?)))
                .collect(),
        }
    }
}

/// Records of one batch, sorted by how they are kept.
#[derive(Default)]
struct Routed {
    /// Spooled records and dead letters: one commit.
    durable: Change,
    /// Durable records for the local sink, written straight to its file beside the
    /// commit (`spool::direct`).
    direct: Vec<Record>,
    /// Handed to their sinks without the spool.
    best_effort: Vec<(SinkId, Record)>,
}

/// Each device's byte rate once the batch is counted, for the high-throughput rule.
enum Rates {
    /// Not measured (a redrive): every rate reads 0.
    Unknown,
    /// The batch is one device's, as a request's or a session's nearly always is: no
    /// map to build, hash and drop per message.
    One(String, u64),
    /// By device.
    Many(HashMap<String, u64>),
}

impl Rates {
    /// `device`'s rate; 0 for a device not measured.
    fn of(&self, device: &str) -> u64 {
        match self {
            Rates::One(measured, rate) if measured == device => *rate,
            Rates::Many(rates) => rates.get(device).copied().unwrap_or(0),
            _ => 0,
        }
    }
}

/// How a batch's records are kept.
struct Keep<'a> {
    /// The routing settings the batch runs with.
    rules: &'a RoutingRules,
    /// Every route is durable (a redrive: the dead letter was durable).
    durable_only: bool,
    /// What a plugin failure does, when not `plugins.on_failure`.
    on_failure: Option<FailurePath>,
}

impl Pipeline {
    /// Assembles the path from its parts.
    pub fn new(
        config: &Config,
        plugins: Plugins,
        sinks: Arc<Sinks>,
        spool: Arc<Spool>,
    ) -> Pipeline {
        let limit = config.spool.best_effort_max_in_flight;
        Pipeline {
            plugins,
            rules: ArcSwap::from_pointee(RoutingRules::new(config)),
            meter: ThroughputMeter::default(),
            best_effort: BestEffort::start(sinks.clone(), spool.clone(), limit),
            sinks,
            spool,
            expired: config.spool.expired,
        }
    }

    /// The spool.
    pub fn spool(&self) -> &Arc<Spool> {
        &self.spool
    }

    /// The largest payload accepted (the Kinesis record limit).
    pub fn max_payload_bytes(&self) -> usize {
        self.rules.load().policy.max_payload_bytes()
    }

    /// Swaps in new routing settings (a configuration reload); batches already running
    /// finish with the old ones.
    pub fn set_rules(&self, rules: RoutingRules) {
        self.rules.store(Arc::new(rules));
    }

    /// The plugin host.
    pub fn plugins(&self) -> &Plugins {
        &self.plugins
    }

    /// Runs a batch through plugins and routing and stores the result. `bidirectional`
    /// says the sender takes part in command & control.
    pub async fn process(
        &self,
        batch: Vec<Message>,
        bidirectional: bool,
    ) -> Result<Vec<MessageReport>, StoreError> {
        let rates = self.measure(&batch);
        self.run(batch, None, bidirectional, &rates, None, None)
            .await
    }

    /// As [`Pipeline::process`], for a sender that cannot be told a refusal per message
    /// (MQTT 3.1.1 has no negative PUBACK): a message a plugin refuses or fails on is
    /// dead-lettered with the reason, whatever `plugins.on_failure` says, so that the
    /// sender gets its acknowledgement and does not send it again for ever.
    pub async fn process_dead_lettering_failures(
        &self,
        batch: Vec<Message>,
    ) -> Result<Vec<MessageReport>, StoreError> {
        let rates = self.measure(&batch);
        self.run(
            batch,
            None,
            false,
            &rates,
            None,
            Some(FailurePath::DeadLetter),
        )
        .await
    }

    /// Plugins, routing, then the spool and the best-effort hand-over.
    ///
    /// `letters`, for a redrive, names the dead letter each message of `batch` comes
    /// from: every route is then durable (the letter was), and a letter leaves the store
    /// in the same change that stores its message's new outcome, unless the message was
    /// rejected (then nothing else holds it).
    async fn run(
        &self,
        batch: Vec<Message>,
        start: Option<String>,
        bidirectional: bool,
        rates: &Rates,
        letters: Option<&[u64]>,
        on_failure: Option<FailurePath>,
    ) -> Result<Vec<MessageReport>, StoreError> {
        let ids: Vec<String> = batch.iter().map(|m| m.id.clone()).collect();
        let results = self.plugins.run_from(batch, start).await;
        let mut routed = Routed::default();
        let rules = self.rules.load_full();
        let keep = Keep {
            rules: &rules,
            durable_only: letters.is_some(),
            on_failure,
        };
        let mut reports = Vec::with_capacity(results.len());
        for (id, result) in ids.into_iter().zip(results) {
            reports.push(self.settle(&keep, id, result, rates, bidirectional, &mut routed));
        }
        match letters {
            Some(keys) => {
                for (key, report) in keys.iter().zip(&reports) {
                    if report.status != Status::Rejected {
                        routed.durable.remove_dead_letter(*key);
                    }
                }
            }
            // A device's request: what it would add to the dead-letter store is bounded.
            None => routed.durable.bound_dead_letters(),
        }
        for report in &reports {
            crate::metrics::METRICS.message(report.status.name());
        }
        // Best-effort room is taken first: a batch is stored whole or not at all.
        let reserved =
            self.best_effort
                .reserve(routed.best_effort.len())
                .map_err(|busy| match busy {
                    Busy::Full { limit } => StoreError::BestEffortFull { limit },
                    Busy::TooMany { count, limit } => {
                        StoreError::BestEffortTooMany { count, limit }
                    }
                })?;
        // The spool first, as it may refuse the batch for being full before anything is
        // written; but for a redrive the local sink's lines first, so that a letter leaves
        // the store only once its message is on disk again (a crash or a refusal in
        // between keeps both, never neither).
        if letters.is_some() {
            crate::spool::direct::write(&self.spool, &self.sinks, self.expired, routed.direct)
                .await?;
            self.spool.commit(routed.durable).await?;
        } else {
            self.spool.commit(routed.durable).await?;
            crate::spool::direct::write(&self.spool, &self.sinks, self.expired, routed.direct)
                .await?;
        }
        self.best_effort.hand_over(routed.best_effort, reserved);
        Ok(reports)
    }

    /// Counts the batch's bytes per device and returns each device's rate.
    fn measure(&self, batch: &[Message]) -> Rates {
        let Some(first) = batch.first() else {
            return Rates::Unknown;
        };
        let device = first.device_id.as_str();
        if batch.iter().all(|message| message.device_id == device) {
            let bytes = batch.iter().map(|m| m.payload.len() as u64).sum();
            return Rates::One(device.to_string(), self.meter.record(device, bytes));
        }
        let mut bytes: HashMap<&str, u64> = HashMap::new();
        for message in batch {
            *bytes.entry(message.device_id.as_str()).or_default() += message.payload.len() as u64;
        }
        Rates::Many(
            bytes
                .into_iter()
                .map(|(device, n)| (device.to_string(), self.meter.record(device, n)))
                .collect(),
        )
    }

    /// Decides the fate of one input message, adding its records for the sink.
    fn settle(
        &self,
        keep: &Keep<'_>,
        id: String,
        result: InputResult,
        rates: &Rates,
        bidirectional: bool,
        routed: &mut Routed,
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
            if keep.on_failure.unwrap_or(keep.rules.on_failure) == FailurePath::Reject {
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
            crate::metrics::METRICS.route(&decision.rule, decision.destination.kind());
            report.routes.push(RouteReport {
                id: failure.message.id.clone(),
                decision: decision.clone(),
            });
            routed.durable.dead_letter(&DeadLetter {
                origin: Origin::Plugin {
                    plugin: failure.plugin,
                    code: failure.kind.code().to_string(),
                },
                reason: decision.reason.clone(),
                record: Record {
                    message: failure.message,
                    decision,
                },
                at_ms: now_ms(),
            });
        }
        for output in result.outputs {
            let facts = Facts {
                bidirectional,
                device_bytes_per_sec: rates.of(&output.message.device_id),
            };
            let rules = keep.rules;
            let builtin = rules.policy.decide(&output.message, facts);
            let decision = match output.router {
                Some(choice) => rules.policy.overrule(
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
            self.keep(
                keep,
                Record {
                    message: output.message,
                    decision,
                },
                routed,
            );
        }
        report.status = status_of(&report.routes);
        report
    }
}

impl Pipeline {
    /// Puts one routed record where its route says: the spool, a best-effort hand-over,
    /// the dead-letter store, or nowhere (`drop`).
    fn keep(&self, keep: &Keep<'_>, record: Record, routed: &mut Routed) {
        let rules = keep.rules;
        crate::metrics::METRICS.route(&record.decision.rule, record.decision.destination.kind());
        let Some(sink) = self.sinks.sink_for(&record.decision.destination) else {
            if record.decision.destination == Destination::DeadLetter {
                routed.durable.dead_letter(&DeadLetter {
                    origin: Origin::Rule {
                        rule: record.decision.rule.clone(),
                    },
                    reason: record.decision.reason.clone(),
                    record,
                    at_ms: now_ms(),
                });
            }
            return;
        };
        let durability = rules
            .rule_durability
            .get(&record.decision.rule)
            .copied()
            .unwrap_or(rules.durability);
        match durability {
            Durability::BestEffort if !keep.durable_only => {
                routed.best_effort.push((sink, record));
            }
            _ if sink == SinkId::Local => routed.direct.push(record),
            _ => routed.durable.queue(sink, record),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(device: &str, size: usize) -> Message {
        Message {
            id: "m1".into(),
            device_id: device.into(),
            topic: "t".into(),
            content_type: String::new(),
            qos: 1,
            attributes: Vec::new(),
            received_at_ms: 0,
            payload: vec![b'x'; size],
        }
    }

    /// The high-throughput rule reads each device's rate with its batch counted, whether
    /// the batch is one device's or several's.
    #[tokio::test]
    async fn a_batch_is_measured_per_device() {
        let fixture = crate::testing::gateway("");
        let pipeline = &fixture.state.pipeline;
        let one = pipeline.measure(&[message("a", 10), message("a", 5)]);
        assert_eq!((one.of("a"), one.of("b")), (15, 0));
        let many = pipeline.measure(&[message("c", 1), message("d", 7), message("c", 2)]);
        assert_eq!((many.of("c"), many.of("d"), many.of("a")), (3, 7, 0));
        assert_eq!(pipeline.measure(&[]).of("a"), 0);
    }
}
