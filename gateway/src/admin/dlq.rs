//! The dead letters: `GET /admin/dlq` (by page), `GET` and `DELETE /admin/dlq/{key}`,
//! `POST /admin/dlq/redrive` (see [`crate::pipeline::Pipeline::redrive`]).

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::admin::AdminState;
use crate::admin::error::AdminApiError;
use crate::spool::codec::DeadLetter;

/// Most dead letters per listing page.
const MAX_PAGE: usize = 1_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListParams {
    from: Option<u64>,
    limit: Option<usize>,
}

/// A dead letter as the API shows it; with `payload`, the payload too.
pub fn letter_json(key: u64, letter: &DeadLetter, payload: bool) -> Value {
    let message = &letter.record.message;
    let mut value = json!({
        "key": key,
        "id": message.id,
        "device": message.device_id,
        "topic": message.topic,
        "origin": letter.origin,
        "reason": letter.reason,
        "at_ms": letter.at_ms,
        "destination": letter.record.decision.destination,
        "payload_bytes": message.payload.len(),
    });
    if payload {
        value["received_at_ms"] = message.received_at_ms.into();
        value["qos"] = message.qos.into();
        if !message.content_type.is_empty() {
            value["content_type"] = message.content_type.clone().into();
        }
        if !message.attributes.is_empty() {
            value["attributes"] = message
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(v.clone())))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        let (field, payload) = crate::sink::local::payload_json(&message.payload);
        value[field] = payload;
    }
    value
}

pub(super) async fn list(
    State(state): State<AdminState>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(params)) = params else {
        return AdminApiError::BadRequest("query parameters: from=KEY, limit=N".into())
            .into_response();
    };
    let limit = params.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    match state
        .pipeline
        .spool()
        .dead_letters(params.from.unwrap_or(0), limit + 1)
    {
        Ok(mut letters) => {
            let next = (letters.len() > limit).then(|| letters[limit].0);
            letters.truncate(limit);
            let items: Vec<Value> = letters
                .iter()
                .map(|(key, letter)| letter_json(*key, letter, false))
                .collect();
            Json(json!({"dead_letters": items, "next": next})).into_response()
        }
        Err(e) => AdminApiError::from(e).into_response(),
    }
}

pub(super) async fn show(State(state): State<AdminState>, Path(key): Path<u64>) -> Response {
    match state.pipeline.spool().dead_letter(key) {
        Ok(Some(letter)) => Json(letter_json(key, &letter, true)).into_response(),
        Ok(None) => AdminApiError::NotFound(format!("no dead letter {key}")).into_response(),
        Err(e) => AdminApiError::from(e).into_response(),
    }
}

pub(super) async fn discard(State(state): State<AdminState>, Path(key): Path<u64>) -> Response {
    let spool = state.pipeline.spool();
    match spool.dead_letter(key) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return AdminApiError::NotFound(format!("no dead letter {key}")).into_response();
        }
        Err(e) => {
            return AdminApiError::from(e).into_response();
        }
    }
    let mut change = crate::spool::Change::default();
    change.remove_dead_letter(key);
    match spool.commit(change).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => AdminApiError::from(e).into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RedriveBody {
    #[serde(default)]
    keys: Vec<u64>,
    #[serde(default)]
    all: bool,
}

pub(super) async fn redrive(
    State(state): State<AdminState>,
    body: Result<Json<RedriveBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(body)) if body.all == body.keys.is_empty() => body,
        _ => {
            return AdminApiError::BadRequest(
                r#"send {"keys": [KEY, ...]} or {"all": true}"#.into(),
            )
            .into_response();
        }
    };
    let spool = state.pipeline.spool();
    let keys = if body.all {
        // Everything stored now; letters that fail again come back with new keys and
        // are not retried in this call.
        let mut keys = Vec::new();
        let mut from = 0;
        loop {
            match spool.dead_letters(from, MAX_PAGE) {
                Ok(page) if page.is_empty() => break,
                Ok(page) => {
                    from = page.last().map_or(from, |(key, _)| key + 1);
                    keys.extend(page.into_iter().map(|(key, _)| key));
                }
                Err(e) => {
                    return AdminApiError::from(e).into_response();
                }
            }
        }
        keys
    } else {
        body.keys
    };
    let mut redriven = Vec::new();
    let mut kept = Vec::new();
    let mut missing = Vec::new();
    for chunk in keys.chunks(MAX_PAGE) {
        match state.pipeline.redrive(chunk).await {
            Ok(report) => {
                redriven.extend(report.redriven);
                kept.extend(report.kept);
                missing.extend(report.missing);
            }
            Err(e) => {
                return AdminApiError::Spool(format!(
                    "{e}; {} dead letters were redriven before this",
                    redriven.len()
                ))
                .into_response();
            }
        }
    }
    Json(json!({"redriven": redriven, "kept": kept, "missing": missing})).into_response()
}
