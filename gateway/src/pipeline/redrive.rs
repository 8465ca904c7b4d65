//! Dead letters run again ([`Pipeline::redrive`]).

use std::collections::HashMap;

use serde::Serialize;

use crate::message::Message;
use crate::pipeline::{FailureReport, Pipeline, Rates, Status, StoreError};
use crate::spool::Change;
use crate::spool::codec::Origin;

/// What a redrive did.
#[derive(Debug, Clone, Serialize)]
pub struct RedriveReport {
    /// Dead letters taken out of the store, with where their messages went now.
    pub redriven: Vec<RedrivenLetter>,
    /// Dead letters left in the store because their message was refused again (a plugin
    /// failed on it and `plugins.on_failure` is `reject`): the letter is all that is left
    /// of the message, so it stays, and can be redriven once the cause is fixed.
    pub kept: Vec<KeptLetter>,
    /// Keys that named no dead letter.
    pub missing: Vec<u64>,
}

/// A dead letter a redrive left in the store.
#[derive(Debug, Clone, Serialize)]
pub struct KeptLetter {
    /// The dead letter's key.
    pub key: u64,
    /// The message id.
    pub id: String,
    /// What happened this time (`rejected`).
    pub status: Status,
    /// Why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<FailureReport>,
}

/// One redriven dead letter.
#[derive(Debug, Clone, Serialize)]
pub struct RedrivenLetter {
    /// The dead letter's key.
    pub key: u64,
    /// The message id.
    pub id: String,
    /// What happened this time.
    pub status: Status,
}

impl Pipeline {
    /// Runs dead letters `keys` again: a message a plugin failed on goes through the
    /// chain from that plugin on; one a rule dead-lettered, through the whole chain; one
    /// a sink refused, straight back to that sink's queue. Each leaves the dead-letter
    /// store once its new outcome is stored (a message that fails again comes back as a
    /// new dead letter).
    pub async fn redrive(&self, keys: &[u64]) -> Result<RedriveReport, StoreError> {
        let mut report = RedriveReport {
            redriven: Vec::new(),
            kept: Vec::new(),
            missing: Vec::new(),
        };
        // A key named twice is one letter, redriven once.
        let mut seen = std::collections::HashSet::new();
        let keys: Vec<u64> = keys
            .iter()
            .copied()
            .filter(|key| seen.insert(*key))
            .collect();
        // Grouped by where the chain starts: one plugin run per group.
        let mut again: HashMap<Option<String>, Vec<(u64, Message)>> = HashMap::new();
        let mut requeue = Change::default();
        for key in keys {
            let Some(letter) = self.spool.dead_letter(key)? else {
                report.missing.push(key);
                continue;
            };
            let expired = letter.origin == Origin::Expired;
            match letter.origin {
                Origin::Sink { .. } | Origin::Expired => {
                    let mut record = letter.record;
                    // An operator re-drives an expired message on purpose: it goes out
                    // now, no longer subject to the expiry it already ran past.
                    if expired {
                        record
                            .message
                            .attributes
                            .retain(|(key, _)| key != crate::message::attribute::MESSAGE_EXPIRY);
                    }
                    match self.sinks.sink_for(&record.decision.destination) {
                        Some(sink) => {
                            report.redriven.push(RedrivenLetter {
                                key,
                                id: record.message.id.clone(),
                                status: Status::Accepted,
                            });
                            requeue.queue(sink, record);
                            requeue.remove_dead_letter(key);
                        }
                        None => report.missing.push(key),
                    }
                }
                Origin::Plugin { plugin, .. } => again
                    .entry(Some(plugin))
                    .or_default()
                    .push((key, letter.record.message)),
                Origin::Rule { .. } => again
                    .entry(None)
                    .or_default()
                    .push((key, letter.record.message)),
            }
        }
        self.spool.commit(requeue).await?;
        for (start, letters) in again {
            let (keys, batch): (Vec<u64>, Vec<Message>) = letters.into_iter().unzip();
            let reports = self
                .run(batch, start, false, &Rates::Unknown, Some(&keys), None)
                .await?;
            for (key, message) in keys.into_iter().zip(reports) {
                if message.status == Status::Rejected {
                    report.kept.push(KeptLetter {
                        key,
                        id: message.id,
                        status: message.status,
                        error: message.error,
                    });
                } else {
                    report.redriven.push(RedrivenLetter {
                        key,
                        id: message.id,
                        status: message.status,
                    });
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use crate::message::Message;
    use crate::record::Record;
    use crate::route::{Decision, Destination};
    use crate::spool::Change;
    use crate::spool::codec::{DeadLetter, Origin};

    /// A key named twice in one redrive is one letter: its message is queued once.
    #[tokio::test]
    async fn a_key_named_twice_is_redriven_once() {
        let fixture = crate::testing::gateway("");
        let pipeline = &fixture.state.pipeline;
        let spool = pipeline.spool();
        let mut change = Change::default();
        change.dead_letter(&DeadLetter {
            origin: Origin::Sink {
                sink: "local".to_string(),
            },
            reason: "refused".to_string(),
            record: Record {
                message: Message {
                    id: "m-1".to_string(),
                    device_id: "d".to_string(),
                    topic: "t".to_string(),
                    content_type: String::new(),
                    qos: 1,
                    attributes: Vec::new(),
                    received_at_ms: 1,
                    payload: b"x".to_vec(),
                },
                decision: Decision {
                    destination: Destination::Local,
                    rule: "builtin:default".to_string(),
                    reason: "test".to_string(),
                },
            },
            at_ms: 1,
        });
        spool.commit(change).await.unwrap();
        let key = spool.dead_letters(0, 10).unwrap()[0].0;
        let before = spool.stats().last_seq;
        let report = pipeline.redrive(&[key, key]).await.unwrap();
        assert_eq!(report.redriven.len(), 1);
        assert!(report.missing.is_empty());
        assert_eq!(spool.stats().last_seq, before + 1, "one record queued");
        assert!(spool.dead_letters(0, 10).unwrap().is_empty());
    }
}
