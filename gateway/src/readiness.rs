//! Whether the gateway is ready for traffic, and why not, as `GET /readyz` and the
//! console both say it: a sink that is failing (its records wait in the spool), a
//! downlink whose subscriptions the broker has not confirmed.

use crate::downlink::Downlink;
use crate::pipeline::Pipeline;

/// The reasons the gateway is not ready; none when it is.
pub fn not_ready_reasons(pipeline: &Pipeline, downlink: Option<&Downlink>) -> Vec<String> {
    let mut reasons: Vec<String> = pipeline
        .spool()
        .failing_sinks()
        .into_iter()
        .map(|sink| {
            format!(
                "the {} sink is failing; records wait in the spool",
                sink.name()
            )
        })
        .collect();
    if let Some(downlink) = downlink
        && downlink.status()["subscribed"] != true
    {
        reasons.push("the downlink has no confirmed subscriptions yet".to_string());
    }
    reasons
}
