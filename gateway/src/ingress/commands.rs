//! Commands for the devices that cannot subscribe themselves (the `sluice.v1` WebSocket
//! dialect, HTTP long-polls), through each device's own session at IoT Core
//! ([`crate::upstream`]): the session subscribes to `[upstream] command_topics` as far
//! as the policy's `subscribe` grants allow; each message on them goes to the device as
//! a command, checked against the policy again as it goes (one the policy no longer
//! allows is acknowledged at IoT Core and counted, never sent); the device's reply is
//! published on the same session, held to the policy and its rates like any publish,
//! and the device hears it went once IoT Core has it.

use rumqttc::v5::mqttbytes::v5::{PubAckReason, Publish};

use crate::auth::Identity;
use crate::ingress::admit::admit_reply;
use crate::ingress::state::AppState;
use crate::ingress::verdict::Refusal;
use crate::upstream::commands::{Command, Recent};
use crate::upstream::{Failure, Spec, UpstreamSession};

/// The session for `identity`'s commands, taking `receive_maximum` unacknowledged:
/// `None` without `[upstream]`, or when the policy allows none of the command topics.
pub fn spec(state: &AppState, identity: &Identity, receive_maximum: u16) -> Option<Spec> {
    let settings = state.upstream.as_ref()?.settings();
    let rules = state.rules();
    let subscriptions: Vec<String> = settings
        .command_topics
        .iter()
        .map(|filter| crate::template::for_device(filter, &identity.device_id))
        .filter(|filter| rules.policy.may_subscribe_filter(identity, filter))
        .collect();
    if subscriptions.is_empty() {
        return None;
    }
    Some(Spec {
        device: identity.device_id.clone(),
        client_id: identity.device_id.clone(),
        clean_start: false,
        session_expiry_secs: settings.session_expiry_secs,
        will: None,
        receive_maximum,
        subscriptions,
    })
}

/// A message from `session` as a command for the device; `None` when the policy no
/// longer lets the device receive it (acknowledged at IoT Core, so that it does not
/// come again, and counted).
pub fn command(
    state: &AppState,
    identity: &Identity,
    session: &UpstreamSession,
    publish: Publish,
) -> Option<Command> {
    let command = Command::new(publish);
    let topic = command.topic();
    if state.rules().policy.may_subscribe(identity, &topic) {
        return Some(command);
    }
    crate::metrics::METRICS.upstream("denied");
    tracing::warn!(device = %identity.device_id, %topic, "command not sent: no policy grant lets the device receive it");
    session.ack(&command.publish);
    None
}

/// `command` reached the device: acknowledged at IoT Core, and remembered for its
/// reply.
pub fn delivered(session: &UpstreamSession, recent: &mut Recent, command: &Command) {
    crate::metrics::METRICS.upstream("relayed");
    session.ack(&command.publish);
    recent.sent(command);
}

/// Publishes the device's reply `status` (and `payload`) to command `id` on its
/// session: to the command's response topic, or the configured reply topic. `Ok` once
/// IoT Core acknowledged it.
pub async fn reply(
    state: &AppState,
    identity: &Identity,
    session: Option<&UpstreamSession>,
    recent: &Recent,
    id: &str,
    status: &str,
    payload: Option<serde_json::Value>,
) -> Result<(), Refusal> {
    let (Some(upstream), Some(session)) = (&state.upstream, session) else {
        return Err(Refusal::BadRequest(
            "this device receives no commands: no IoT Core endpoint ([upstream]), or no grant for its command topics".to_string(),
        ));
    };
    let reply_topic =
        crate::template::for_device(&upstream.settings().reply_topic, &identity.device_id);
    let reply = recent.reply(id, status, payload, &reply_topic);
    admit_reply(&state.rules(), identity, &reply.topic, reply.payload.len())?;
    let answer = session
        .publish(&reply.topic, 1, false, reply.payload, reply.properties)
        .await
        .map_err(unavailable)?;
    match answer {
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(()),
        PubAckReason::NotAuthorized => Err(Refusal::Forbidden {
            topic: reply.topic,
            device: identity.device_id.clone(),
        }),
        other => Err(Refusal::Unavailable {
            code: "iot_core_unavailable",
            message: format!("IoT Core answered {other:?}"),
            retry_after: 1,
        }),
    }
}

/// What a device hears when its session at IoT Core cannot take a request now.
pub fn unavailable(failure: Failure) -> Refusal {
    Refusal::Unavailable {
        code: "iot_core_unavailable",
        message: failure.to_string(),
        retry_after: 1,
    }
}
