//! IoT Core-bound telemetry through the devices' own sessions at IoT Core: a record of a
//! device that has its session there connected now is published on that session, so
//! that IoT Core sees the device publish it (its client id in rules' `clientid()`, its
//! own per-connection limits) with the message's MQTT 5 properties. The others, and any
//! that session cannot take now, go through the sink's own connection.

use std::sync::Arc;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PubAckReason;

use crate::record::Record;
use crate::sink::iot_core::prepare;
use crate::sink::{Rejected, Sink, SinkFuture};
use crate::upstream::Upstream;

/// The IoT Core sink, through the devices' sessions first.
pub struct ThroughDevices {
    /// The devices' sessions.
    upstream: Arc<Upstream>,
    /// The sink's own connection, for the rest.
    shared: Arc<dyn Sink>,
    /// Basic Ingest rule name, if configured.
    basic_ingest_rule: Option<String>,
}

impl ThroughDevices {
    /// Through `upstream`'s device sessions first, `shared` for the rest.
    pub fn new(
        upstream: Arc<Upstream>,
        shared: Arc<dyn Sink>,
        basic_ingest_rule: Option<String>,
    ) -> ThroughDevices {
        ThroughDevices {
            upstream,
            shared,
            basic_ingest_rule,
        }
    }
}

impl Sink for ThroughDevices {
    fn deliver(&self, records: Vec<Record>) -> SinkFuture<'_> {
        Box::pin(async move {
            let mut rejected = Vec::new();
            let mut direct = Vec::new();
            let mut rest = Vec::new();
            for record in records {
                let Some(link) = self.upstream.link_for(&record.message.device_id) else {
                    rest.push(record);
                    continue;
                };
                match prepare(&record, self.basic_ingest_rule.as_deref()) {
                    Ok(publish) => direct.push((record, link, publish)),
                    Err(reason) => rejected.push(Rejected { record, reason }),
                }
            }
            let sends = direct
                .into_iter()
                .map(|(record, link, publish)| async move {
                    let answer = link
                        .publish(
                            &publish.topic,
                            publish.qos,
                            publish.retain,
                            Bytes::from(publish.payload),
                            publish.properties,
                        )
                        .await;
                    (record, answer)
                });
            for (record, answer) in futures_util::future::join_all(sends).await {
                match answer {
                    Ok(PubAckReason::Success | PubAckReason::NoMatchingSubscribers) => {
                        crate::metrics::METRICS.upstream("telemetry");
                    }
                    // Not taken there (the session went, IoT Core did not answer in
                    // time or refused): the sink's own connection tries.
                    Ok(_) | Err(_) => {
                        crate::metrics::METRICS.upstream("telemetry_elsewhere");
                        rest.push(record);
                    }
                }
            }
            if !rest.is_empty() {
                rejected.extend(self.shared.deliver(rest).await?);
            }
            Ok(rejected)
        })
    }
}
