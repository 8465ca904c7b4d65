//! The admin API, on its own listener (`[admin] listen`), for operators only. Every
//! request carries `Authorization: Bearer <admin.token>`; without it: `401 unauthorized`.
//!
//! - `GET /admin/spool`: records and bytes waiting per sink, dead letters, commits.
//! - `GET /admin/devices`: the open WebSocket sessions (device, how it authenticated,
//!   messages, in flight, the most ever in flight, the window).
//! - `GET /metrics`: Prometheus metrics (messages by status, refusals by code, records
//!   leaving the spool by sink and outcome, sink failures, receipt-to-confirmation
//!   latency per sink, spool depth and bytes, fsyncs, dead letters, WebSocket sessions).
//! - `GET /admin/downlink`: the instance id, whether the broker confirmed the command and
//!   presence subscriptions, devices with commands waiting.
//! - `GET /admin/dlq?from=KEY&limit=N`: dead letters, oldest first (`next` pages on).
//! - `GET /admin/dlq/{key}`: one dead letter with its payload.
//! - `DELETE /admin/dlq/{key}`: discard one.
//! - `POST /admin/dlq/redrive` with `{"keys": [..]}` or `{"all": true}`: run them again
//!   (see [`Pipeline::redrive`]).
//!
//! Errors are JSON `{"code": …, "message": …}` like the device API's.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::ingress::ws::Sessions;
use crate::pipeline::Pipeline;
use crate::shutdown::Shutdown;
use crate::spool::codec::DeadLetter;

/// Most dead letters per listing page.
const MAX_PAGE: usize = 1_000;

#[derive(Clone)]
struct AdminState {
    pipeline: Arc<Pipeline>,
    sessions: Arc<Sessions>,
    downlink: Option<Arc<crate::downlink::Downlink>>,
    token: Arc<str>,
}

/// Binds the admin listener and serves it until `shutdown` fires. Prints
/// `sluice: admin on http://<address>` once bound.
pub async fn serve(
    listen: SocketAddr,
    token: String,
    pipeline: Arc<Pipeline>,
    sessions: Arc<Sessions>,
    downlink: Option<Arc<crate::downlink::Downlink>>,
    mut shutdown: Shutdown,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use anyhow::Context as _;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (admin)"))?;
    let address = listener.local_addr()?;
    println!("sluice: admin on http://{address}");
    tracing::info!(%address, "admin API listening");
    let app = router(pipeline, sessions, downlink, token);
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "admin listener failed");
        }
    }))
}

fn router(
    pipeline: Arc<Pipeline>,
    sessions: Arc<Sessions>,
    downlink: Option<Arc<crate::downlink::Downlink>>,
    token: String,
) -> axum::Router {
    let state = AdminState {
        pipeline,
        sessions,
        downlink,
        token: token.into(),
    };
    axum::Router::new()
        .route("/admin/spool", get(spool_stats))
        .route("/admin/devices", get(devices))
        .route("/metrics", get(metrics))
        .route("/admin/downlink", get(downlink_status))
        .route("/admin/dlq", get(list))
        .route("/admin/dlq/redrive", post(redrive))
        .route("/admin/dlq/{key}", get(show).delete(discard))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .with_state(state)
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"code": code, "message": message.into()})),
    )
        .into_response()
}

async fn authorize(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match presented {
        Some(token) if same(token.as_bytes(), state.token.as_bytes()) => next.run(request).await,
        _ => error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send `Authorization: Bearer <admin.token>`",
        ),
    }
}

/// Compares without stopping at the first difference, so timing does not reveal how
/// much of a guessed token is right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `GET /metrics`: Prometheus (OpenMetrics) text; state gauges are read now.
async fn metrics(State(state): State<AdminState>) -> Response {
    let m = &crate::metrics::METRICS;
    let stats = state.pipeline.spool().stats();
    for queue in &stats.queues {
        let sink = crate::metrics::SinkLabel {
            sink: queue.sink.name().to_string(),
        };
        m.spool_records
            .get_or_create(&sink)
            .set(queue.records as i64);
        m.spool_bytes.get_or_create(&sink).set(queue.bytes as i64);
    }
    m.spool_fsyncs.set(stats.durable_commits as i64);
    m.dead_letters.set(stats.dead_letters as i64);
    m.sessions.set(state.sessions.list().len() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

async fn downlink_status(State(state): State<AdminState>) -> Response {
    match &state.downlink {
        Some(downlink) => Json(downlink.status()).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no [downlink] configured",
        ),
    }
}

async fn devices(State(state): State<AdminState>) -> Response {
    let open = state.sessions.list();
    let sessions: Vec<&crate::ingress::ws::SessionInfo> = open.iter().map(|s| &**s).collect();
    Json(json!({ "sessions": sessions })).into_response()
}

async fn spool_stats(State(state): State<AdminState>) -> Response {
    Json(state.pipeline.spool().stats()).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
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

async fn list(
    State(state): State<AdminState>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(params)) = params else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "query parameters: from=KEY, limit=N",
        );
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
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "spool_unavailable",
            e.to_string(),
        ),
    }
}

async fn show(State(state): State<AdminState>, Path(key): Path<u64>) -> Response {
    match state.pipeline.spool().dead_letter(key) {
        Ok(Some(letter)) => Json(letter_json(key, &letter, true)).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no dead letter {key}"),
        ),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "spool_unavailable",
            e.to_string(),
        ),
    }
}

async fn discard(State(state): State<AdminState>, Path(key): Path<u64>) -> Response {
    let spool = state.pipeline.spool();
    match spool.dead_letter(key) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no dead letter {key}"),
            );
        }
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "spool_unavailable",
                e.to_string(),
            );
        }
    }
    let mut change = crate::spool::Change::default();
    change.remove_dead_letter(key);
    match spool.commit(change).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "spool_unavailable",
            e.to_string(),
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedriveBody {
    #[serde(default)]
    keys: Vec<u64>,
    #[serde(default)]
    all: bool,
}

async fn redrive(
    State(state): State<AdminState>,
    body: Result<Json<RedriveBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(body)) if body.all == body.keys.is_empty() => body,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                r#"send {"keys": [KEY, ...]} or {"all": true}"#,
            );
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
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "spool_unavailable",
                        e.to_string(),
                    );
                }
            }
        }
        keys
    } else {
        body.keys
    };
    let mut redriven = Vec::new();
    let mut missing = Vec::new();
    for chunk in keys.chunks(MAX_PAGE) {
        match state.pipeline.redrive(chunk).await {
            Ok(report) => {
                redriven.extend(report.redriven);
                missing.extend(report.missing);
            }
            Err(e) => {
                let mut response = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "spool_unavailable",
                    format!(
                        "{e}; {} dead letters were redriven before this",
                        redriven.len()
                    ),
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, axum::http::HeaderValue::from(5u32));
                return response;
            }
        }
    }
    Json(json!({"redriven": redriven, "missing": missing})).into_response()
}
