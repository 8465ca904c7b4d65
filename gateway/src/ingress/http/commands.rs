//! Commands over HTTP, for devices that poll: `GET /commands?wait=N` waits up to N
//! seconds (default 30, at most 60) for the device's commands and returns those that
//! came, `{"commands": [{"type": "command", "id", "topic", "qos", "payload"…}]}`;
//! `POST /commands/{id}/reply` with `{"status"?, "payload"?}` publishes the reply.
//!
//! Both use the device's own session at IoT Core (`[upstream]`), held open between its
//! requests ([`crate::upstream::held`]) for `session_expiry_secs` after the last one and
//! kept by IoT Core for as long again after that: a command returned is acknowledged at
//! IoT Core, the others wait there (QoS 1). The reply goes to the command's MQTT 5
//! response topic when it had one and this instance delivered it, otherwise to the
//! reply topic, and `200` says IoT Core has it.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use crate::auth::Identity;
use crate::ingress::commands;
use crate::ingress::device::Device;
use crate::ingress::state::AppState;
use crate::ingress::verdict::Refusal;
use crate::upstream::Spec;
use crate::upstream::held::Held;

/// `GET /commands?wait=SECONDS` parameters (and a token, with `[auth.jwt]`).
#[derive(Debug, Deserialize)]
pub(super) struct PollParams {
    wait: Option<String>,
    #[serde(flatten)]
    others: std::collections::BTreeMap<String, String>,
}

/// Longest long-poll.
const MAX_POLL_SECS: u64 = 60;

/// QoS 1 commands IoT Core has in flight to a polling device's session (waiting for its
/// next poll); one poll returns at most these and the QoS 0 ones beside them.
const POLL_RECEIVE_MAXIMUM: u16 = 32;

/// The held sessions and `identity`'s session spec, or why the device gets no commands.
fn held_for<'s>(state: &'s AppState, identity: &Identity) -> Result<(&'s Held, Spec), Refusal> {
    let held = state.held.as_deref().ok_or_else(|| {
        Refusal::BadRequest(
            "commands to devices need an IoT Core endpoint ([upstream]), and none is configured"
                .to_string(),
        )
    })?;
    let spec = commands::spec(state, identity, POLL_RECEIVE_MAXIMUM).ok_or_else(|| {
        Refusal::BadRequest(format!(
            "no policy grant lets `{}` receive on the command topics",
            identity.device_id
        ))
    })?;
    Ok((held, spec))
}

/// `GET /commands?wait=N`: the commands that came, waiting up to N seconds for the
/// first; `503 iot_core_unavailable` when none came and IoT Core is not reachable.
pub(super) async fn poll(
    State(state): State<AppState>,
    Device {
        identity, rules, ..
    }: Device,
    params: Result<Query<PollParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Refusal> {
    let Query(params) = params.map_err(|rejection| Refusal::BadRequest(rejection.body_text()))?;
    super::refuse_unknown(&params.others, &rules, "wait")?;
    let wait = match params.wait.as_deref() {
        None => 30,
        Some(secs) => secs.parse::<u64>().map_err(|_| {
            Refusal::BadRequest(format!(
                "wait must be a whole number of seconds, not `{secs}`"
            ))
        })?,
    };
    let (held, spec) = held_for(&state, &identity)?;
    let wait = std::time::Duration::from_secs(wait.min(MAX_POLL_SECS));
    let mut held = held.session(spec).await;
    let (session, recent) = held.parts();
    let first = tokio::time::timeout(wait, session.next()).await;
    let mut commands = Vec::new();
    let mut next = first.ok().flatten();
    while let Some(publish) = next {
        if let Some(command) = commands::command(&state, &identity, session, publish) {
            commands.push(command.to_json());
            commands::delivered(session, recent, &command);
        }
        if commands.len() >= usize::from(POLL_RECEIVE_MAXIMUM) {
            break;
        }
        next = session.try_next();
    }
    if commands.is_empty() && !session.is_connected() {
        return Err(commands::unavailable(crate::upstream::Failure::Unavailable));
    }
    Ok(Json(json!({ "commands": commands })).into_response())
}

/// `POST /commands/{id}/reply` with `{"status": …, "payload": …}` (both optional):
/// `200` once IoT Core has the reply.
pub(super) async fn reply(
    State(state): State<AppState>,
    Device { identity, .. }: Device,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    let (held, spec) = held_for(&state, &identity)?;
    let body = super::read_body(&headers, body, 64 * 1024, "reply", "64 KiB").await?;
    let reply: serde_json::Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| Refusal::BadRequest(format!("the reply is not JSON: {e}")))?
    };
    let status = reply["status"].as_str().unwrap_or("done").to_string();
    let mut held = held.session(spec).await;
    let (session, recent) = held.parts();
    // A session opened for this reply connects first.
    if let Some(upstream) = &state.upstream {
        session.connected_within(upstream.answer_timeout()).await;
    }
    let payload = reply.get("payload").cloned();
    commands::reply(
        &state,
        &identity,
        Some(session),
        recent,
        &id,
        &status,
        payload,
    )
    .await?;
    Ok(Json(json!({"message": "OK"})).into_response())
}
