//! Device-facing HTTP routes.
//!
//! - `POST /topics/{topic}?qos=N`: AWS IoT Core's HTTPS publish API, so existing device
//!   code can point at Sluice unchanged. `200` with `{"message":"OK","traceId":ID,…}`.
//! - `POST /batch`: many messages in one request, one report per message.
//! - `GET /healthz`: `200 ok` while the listener runs.
//!
//! Errors are JSON `{"code": …, "message": …}` with a stable code; see
//! [`ApiError`] for the full list.

use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;

use crate::auth::{AuthError, Authenticator, Identity, PeerIdentity};
use crate::config::{Config, WebSocketConfig};
use crate::message::{Message, new_id, now_ms};
use crate::pipeline::{MessageReport, Pipeline, Status, StoreError};
use crate::plugin::FailureKind;
use crate::policy::{DevicePolicy, Refusal};
use crate::route::topic::validate_publish_topic;
use crate::shutdown::Shutdown;
use crate::spool::SpoolError;

/// What the routes share.
#[derive(Clone)]
pub struct AppState {
    /// The message path.
    pub pipeline: Arc<Pipeline>,
    /// Authentication, policy and limits; a configuration reload swaps them.
    pub live: Arc<crate::ingress::Live>,
    /// Fires when the gateway stops (WebSocket sessions close with 1001).
    pub shutdown: Shutdown,
    /// Open WebSocket sessions.
    pub sessions: Arc<crate::ingress::ws::Sessions>,
    /// Commands to devices, when configured.
    pub downlink: Option<Arc<crate::downlink::Downlink>>,
}

impl AppState {
    /// The device rules now: a request uses the ones it started with.
    pub fn rules(&self) -> Arc<DeviceRules> {
        self.live.rules.load_full()
    }
}

/// What decides whether a device's request is taken: who it is, what it may do, and the
/// limits. A configuration reload builds new ones and swaps them in whole.
pub struct DeviceRules {
    /// Who sent a request.
    pub auth: Arc<Authenticator>,
    /// What a device may do.
    pub policy: Arc<DevicePolicy>,
    /// WebSocket session settings (a session keeps those it opened with).
    pub websocket: WebSocketConfig,
    /// Most messages in one batch request.
    pub max_batch_messages: usize,
    /// Largest batch request body.
    pub max_batch_bytes: usize,
}

impl DeviceRules {
    /// The rules of `config`; the authenticator and the policy (with its rate-limit
    /// state) are taken from `previous` when their sections did not change.
    pub fn new(config: &Config, previous: Option<(&Config, &DeviceRules)>) -> DeviceRules {
        let unchanged = |same: fn(&Config, &Config) -> bool| {
            previous
                .filter(|(old, _)| same(old, config))
                .map(|(_, rules)| rules)
        };
        let auth = match unchanged(|a, b| a.auth == b.auth) {
            Some(rules) => rules.auth.clone(),
            None => Arc::new(Authenticator::new(config.auth.as_ref())),
        };
        let policy =
            match unchanged(|a, b| a.policy == b.policy && a.auth.is_some() == b.auth.is_some()) {
                Some(rules) => rules.policy.clone(),
                None => Arc::new(DevicePolicy::new(
                    config.policy.as_ref(),
                    config.auth.is_some(),
                )),
            };
        DeviceRules {
            auth,
            policy,
            websocket: config.websocket.clone(),
            max_batch_messages: config.limits.max_batch_messages,
            max_batch_bytes: config.limits.max_batch_bytes,
        }
    }
}

/// The device-facing router.
pub fn app(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/topics/{*topic}", post(publish))
        .route("/batch", post(batch))
        .route("/ws", get(crate::ingress::ws::upgrade))
        .route("/commands", get(poll_commands))
        .route("/commands/{id}/reply", post(reply_command))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        // Limits are enforced by the handlers, which know which limit applies and say so.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn(with_request_id))
        .with_state(state)
}

/// The request header naming a request; echoed in the response, generated if absent.
pub const REQUEST_ID: &str = "x-request-id";

/// Runs a request in a `request` span carrying its id (the client's `x-request-id` if it
/// sent a usable one, else a new one) and the message id once known, so every log record
/// of its way (plugin logs included) can be found by either; the response says the id.
async fn with_request_id(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|value| {
            !value.is_empty() && value.len() <= 128 && value.bytes().all(|b| b.is_ascii_graphic())
        })
        .map_or_else(new_id, str::to_string);
    // Few fields: the text and JSON log layers format a span's fields when it opens,
    // on every request.
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        message_id = tracing::field::Empty,
    );
    let mut response = tracing::Instrument::instrument(next.run(request), span).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// Every error a device can get.
#[derive(Debug)]
pub enum ApiError {
    /// `400 bad_request`: a malformed topic, QoS, device id or batch body.
    BadRequest(String),
    /// `401` with the reason's code ([`AuthError::code`]).
    Unauthorized(AuthError),
    /// `403 topic_denied`: no policy grant lets the device publish there.
    Forbidden {
        /// The topic.
        topic: String,
        /// The device.
        device: String,
    },
    /// `429 rate_limited` with `Retry-After`: over a grant's rate.
    RateLimited {
        /// The grant.
        grant: String,
        /// Which limit.
        limit: &'static str,
        /// Seconds to wait (at least 1).
        retry_after: u64,
    },
    /// `413 payload_too_large`: a payload over the record limit, or a batch over its limits.
    TooLarge(String),
    /// `422 plugin_refused`, `500 plugin_*`, `503 plugin_unavailable`: a plugin refused
    /// the message or failed on it, and `plugins.on_failure` is `reject`.
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
    /// `503` with `Retry-After`; nothing of the request was acknowledged or kept:
    /// - `spool_full`: the spool for a sink the request needs is at its limit
    ///   (`spool.max_bytes_per_sink`), because that sink is slow or down;
    /// - `best_effort_busy`: too many best-effort messages wait for their sinks;
    /// - `spool_unavailable`: the spool cannot write (disk error) or is shutting down.
    Unavailable {
        /// The code.
        code: &'static str,
        /// In words.
        message: String,
        /// Seconds the device should wait.
        retry_after: u32,
    },
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        let (code, retry_after) = match &error {
            StoreError::Spool(SpoolError::Full { .. }) => ("spool_full", 5),
            StoreError::BestEffortFull { .. } => ("best_effort_busy", 1),
            StoreError::Spool(_) => ("spool_unavailable", 1),
        };
        ApiError::Unavailable {
            code,
            message: error.to_string(),
            retry_after,
        }
    }
}

impl ApiError {
    /// The stable code of the error.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::Unauthorized(error) => error.code(),
            ApiError::Forbidden { .. } => "topic_denied",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Plugin { kind, .. } => kind.code(),
            ApiError::Unavailable { code, .. } => code,
        }
    }

    /// The code, message and retry delay (seconds) of the error, for WebSocket error
    /// frames.
    pub fn parts(self) -> (&'static str, String, Option<u64>) {
        match self {
            ApiError::BadRequest(message) => ("bad_request", message, None),
            ApiError::TooLarge(message) => ("payload_too_large", message, None),
            ApiError::Unauthorized(error) => (error.code(), error.to_string(), None),
            ApiError::Forbidden { topic, device } => (
                "topic_denied",
                format!("no policy grant lets `{device}` publish to `{topic}`"),
                None,
            ),
            ApiError::RateLimited {
                grant,
                limit,
                retry_after,
            } => (
                "rate_limited",
                format!("over the {limit} of policy grant `{grant}`"),
                Some(retry_after),
            ),
            ApiError::Plugin { kind, message, .. } => (kind.code(), message, None),
            ApiError::Unavailable {
                code,
                message,
                retry_after,
            } => (code, message, Some(u64::from(retry_after))),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        crate::metrics::METRICS.refusal(self.code());
        let (status, body) = match self {
            ApiError::BadRequest(message) => (
                StatusCode::BAD_REQUEST,
                json!({"code": "bad_request", "message": message}),
            ),
            ApiError::TooLarge(message) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"code": "payload_too_large", "message": message}),
            ),
            ApiError::Unauthorized(error) => {
                let body = json!({"code": error.code(), "message": error.to_string()});
                let mut response = (StatusCode::UNAUTHORIZED, Json(body)).into_response();
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"sluice\""),
                );
                return response;
            }
            ApiError::Forbidden { topic, device } => (
                StatusCode::FORBIDDEN,
                json!({
                    "code": "topic_denied",
                    "rule": "policy:default-deny",
                    "message": format!("no policy grant lets `{device}` publish to `{topic}`"),
                }),
            ),
            ApiError::RateLimited {
                grant,
                limit,
                retry_after,
            } => {
                let body = json!({
                    "code": "rate_limited",
                    "rule": format!("policy:{grant}"),
                    "message": format!("over the grant's {limit}; retry after {retry_after} s"),
                });
                let mut response = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
                return response;
            }
            ApiError::Plugin {
                id,
                kind,
                plugin,
                message,
            } => {
                let status = match kind {
                    FailureKind::Refused => StatusCode::UNPROCESSABLE_ENTITY,
                    FailureKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                let body =
                    json!({"code": kind.code(), "message": message, "plugin": plugin, "id": id});
                (status, body)
            }
            ApiError::Unavailable {
                code,
                message,
                retry_after,
            } => {
                tracing::debug!(code, error = %message, "request refused");
                let body = json!({"code": code, "message": format!("{message}; nothing was kept, retry later")});
                let mut response = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
                return response;
            }
        };
        (status, Json(body)).into_response()
    }
}

/// Query parameters of IoT Core's HTTPS publish API. Besides `qos` they are MQTT 5
/// publish properties; Sluice keeps them as message attributes (`mqtt.*`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PublishParams {
    qos: Option<String>,
    retain: Option<String>,
    content_type: Option<String>,
    response_topic: Option<String>,
    correlation_data: Option<String>,
    message_expiry: Option<String>,
    payload_format_indicator: Option<String>,
    user_properties: Option<String>,
}

async fn publish(
    State(state): State<AppState>,
    peer: Option<Extension<PeerIdentity>>,
    Path(topic): Path<String>,
    params: Result<Query<PublishParams>, axum::extract::rejection::QueryRejection>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    // The headers taken from the request, not extracted: that would copy them.
    let (axum::http::request::Parts { headers, .. }, body) = request.into_parts();
    // One snapshot for the whole request: a reload meanwhile applies to the next one.
    let rules = state.rules();
    let identity = authenticate(&rules, peer.as_deref(), &headers)?;
    let Query(params) = params.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    validate_publish_topic(&topic)
        .map_err(|why| ApiError::BadRequest(format!("topic `{topic}`: {why}")))?;
    let qos = parse_qos(params.qos.as_deref())?;
    if let Some(expiry) = &params.message_expiry
        && expiry.parse::<u32>().is_err()
    {
        return Err(ApiError::BadRequest(format!(
            "messageExpiry must be a whole number of seconds, not `{expiry}`"
        )));
    }
    let limit = state.pipeline.max_payload_bytes();
    let payload = read_body(&headers, body, limit, "payload", "the record limit").await?;
    check_policy(
        &rules,
        &identity,
        [topic.as_str()],
        1,
        payload.len(),
        payload.len(),
    )?;
    let device = identity.device_id;
    let content_type = params
        .content_type
        .clone()
        .or_else(|| header_str(&headers, header::CONTENT_TYPE))
        .unwrap_or_default();
    let mut attributes = Vec::new();
    let optional = [
        ("mqtt.retain", &params.retain),
        ("mqtt.response_topic", &params.response_topic),
        ("mqtt.correlation_data", &params.correlation_data),
        ("mqtt.message_expiry", &params.message_expiry),
        (
            "mqtt.payload_format_indicator",
            &params.payload_format_indicator,
        ),
        ("mqtt.user_properties", &params.user_properties),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            attributes.push((key.to_string(), value.clone()));
        }
    }
    let message = Message {
        id: new_id(),
        device_id: device,
        topic,
        content_type,
        qos,
        attributes,
        received_at_ms: now_ms(),
        payload: payload.to_vec(),
    };
    tracing::Span::current().record("message_id", message.id.as_str());
    let mut reports = state.pipeline.process(vec![message], false).await?;
    let report = reports.pop().ok_or_else(|| ApiError::Unavailable {
        code: "spool_unavailable",
        message: "no report for the message".to_string(),
        retry_after: 1,
    })?;
    if report.status == Status::Rejected {
        return Err(rejected(report));
    }
    Ok((
        StatusCode::OK,
        Json(Published {
            message: "OK",
            trace_id: &report.id,
            id: &report.id,
            status: report.status,
            routes: &report.routes,
            error: &report.error,
        }),
    )
        .into_response())
}

/// The answer to `POST /topics/{topic}`: IoT Core's `message` and `traceId`, then the
/// report.
#[derive(serde::Serialize)]
struct Published<'a> {
    message: &'static str,
    #[serde(rename = "traceId")]
    trace_id: &'a str,
    id: &'a str,
    status: Status,
    routes: &'a [crate::pipeline::RouteReport],
    error: &'a Option<crate::pipeline::FailureReport>,
}

/// The error for a message the chain rejected.
pub(crate) fn rejected(report: MessageReport) -> ApiError {
    let error = report
        .error
        .unwrap_or_else(|| crate::pipeline::FailureReport {
            code: FailureKind::Unavailable.code(),
            plugin: String::new(),
            message: "rejected".to_string(),
        });
    ApiError::Plugin {
        id: report.id,
        kind: report.failure_kind.unwrap_or(FailureKind::Unavailable),
        plugin: error.plugin,
        message: error.message,
    }
}

/// One message of a `POST /batch` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchItem {
    /// The topic, as in `POST /topics/{topic}`.
    topic: String,
    /// A JSON payload, stored compactly.
    payload: Option<serde_json::Value>,
    /// Binary payload in base64.
    payload_base64: Option<String>,
    /// Content type; `application/json` for `payload`.
    content_type: Option<String>,
    /// 0 or 1; default 0.
    qos: Option<u8>,
    /// Extra attributes.
    #[serde(default)]
    attributes: std::collections::BTreeMap<String, String>,
}

/// A `POST /batch` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    messages: Vec<BatchItem>,
}

async fn batch(
    State(state): State<AppState>,
    peer: Option<Extension<PeerIdentity>>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let (axum::http::request::Parts { headers, .. }, body) = request.into_parts();
    let rules = state.rules();
    let identity = authenticate(&rules, peer.as_deref(), &headers)?;
    let device = identity.device_id.clone();
    let max_bytes = rules.max_batch_bytes;
    let body = read_body(
        &headers,
        body,
        max_bytes,
        "batch body",
        "limits.max_batch_bytes",
    )
    .await?;
    let parsed: BatchBody = serde_json::from_slice(&body)
        .map_err(|error| ApiError::BadRequest(format!("batch body is not valid: {error}")))?;
    if parsed.messages.len() > rules.max_batch_messages {
        return Err(ApiError::TooLarge(format!(
            "batch of {} messages exceeds the limit of {}",
            parsed.messages.len(),
            rules.max_batch_messages
        )));
    }
    let limit = state.pipeline.max_payload_bytes();
    let received_at_ms = now_ms();
    let mut messages = Vec::with_capacity(parsed.messages.len());
    for (index, item) in parsed.messages.into_iter().enumerate() {
        let at = |why: String| format!("messages[{index}]: {why}");
        validate_publish_topic(&item.topic)
            .map_err(|why| ApiError::BadRequest(at(format!("topic: {why}"))))?;
        let qos = item.qos.unwrap_or(0);
        if qos > 1 {
            return Err(ApiError::BadRequest(at(format!(
                "qos must be 0 or 1, not {qos}"
            ))));
        }
        let (payload, default_type) = decode_payload(item.payload, item.payload_base64)
            .map_err(|why| ApiError::BadRequest(at(why)))?;
        if payload.len() > limit {
            return Err(ApiError::TooLarge(at(format!(
                "payload of {} exceeds the record limit of {limit} bytes",
                payload.len()
            ))));
        }
        messages.push(Message {
            id: new_id(),
            device_id: device.clone(),
            topic: item.topic,
            content_type: item
                .content_type
                .unwrap_or_else(|| default_type.to_string()),
            qos,
            attributes: item.attributes.into_iter().collect(),
            received_at_ms,
            payload,
        });
    }
    let total: usize = messages.iter().map(|m| m.payload.len()).sum();
    let largest = messages.iter().map(|m| m.payload.len()).max().unwrap_or(0);
    check_policy(
        &rules,
        &identity,
        messages.iter().map(|m| m.topic.as_str()),
        messages.len(),
        total,
        largest,
    )?;
    let reports = state.pipeline.process(messages, false).await?;
    Ok((StatusCode::OK, Json(json!({ "results": reports }))).into_response())
}

/// A message body given as `payload` (JSON, stored compactly) or `payload_base64`
/// (bytes), with the content type it implies (`application/json` for JSON, else none).
/// Shared by `POST /batch` and WebSocket text frames.
pub(crate) fn decode_payload(
    json: Option<serde_json::Value>,
    encoded: Option<String>,
) -> Result<(Vec<u8>, &'static str), String> {
    match (json, encoded) {
        (Some(value), None) => Ok((
            serde_json::to_vec(&value).unwrap_or_default(),
            "application/json",
        )),
        (None, Some(text)) => base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map(|bytes| (bytes, ""))
            .map_err(|error| format!("payload_base64: {error}")),
        (None, None) => Ok((Vec::new(), "")),
        (Some(_), Some(_)) => Err("give `payload` or `payload_base64`, not both".to_string()),
    }
}

/// `GET /readyz`: `200` once the gateway can take and deliver messages (plugins are
/// loaded before the listener opens; no sink is failing; the downlink, if configured,
/// has its subscriptions), else `503` with the reasons.
async fn readyz(State(state): State<AppState>) -> Response {
    let mut reasons: Vec<String> = state
        .pipeline
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
    if let Some(downlink) = &state.downlink
        && downlink.status()["subscribed"] != true
    {
        reasons.push("the downlink has no confirmed subscriptions yet".to_string());
    }
    if reasons.is_empty() {
        Json(json!({"ready": true})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reasons": reasons})),
        )
            .into_response()
    }
}

/// `GET /commands?wait=SECONDS` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PollParams {
    wait: Option<u64>,
}

/// Longest long-poll.
const MAX_POLL_SECS: u64 = 60;

/// `GET /commands?wait=N`: the device's waiting commands, waiting up to N seconds
/// (default 30, at most 60) for one. Commands returned are removed from the queue.
async fn poll_commands(
    State(state): State<AppState>,
    peer: Option<Extension<PeerIdentity>>,
    params: Result<Query<PollParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let identity = authenticate(&state.rules(), peer.as_deref(), &headers)?;
    let Query(params) = params.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let downlink = state.downlink.as_ref().ok_or_else(|| {
        ApiError::BadRequest("commands to devices are not configured ([downlink])".to_string())
    })?;
    let wait = std::time::Duration::from_secs(params.wait.unwrap_or(30).min(MAX_POLL_SECS));
    let mut commands = Vec::new();
    for command in downlink.poll(&identity.device_id, wait).await {
        if state
            .rules()
            .policy
            .may_subscribe(&identity, &command.topic)
        {
            commands.push(command.to_json());
        } else {
            downlink
                .reply(&identity.device_id, &command.id, "denied", None)
                .await;
        }
    }
    Ok(Json(json!({ "commands": commands })).into_response())
}

/// `POST /commands/{id}/reply` with `{"status": …, "payload": …}` (both optional):
/// published on the device's reply topic.
async fn reply_command(
    State(state): State<AppState>,
    peer: Option<Extension<PeerIdentity>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let identity = authenticate(&state.rules(), peer.as_deref(), &headers)?;
    let downlink = state.downlink.as_ref().ok_or_else(|| {
        ApiError::BadRequest("commands to devices are not configured ([downlink])".to_string())
    })?;
    let body = read_body(&headers, body, 64 * 1024, "reply", "64 KiB").await?;
    let reply: serde_json::Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("the reply is not JSON: {e}")))?
    };
    let status = reply["status"].as_str().unwrap_or("done").to_string();
    downlink
        .reply(
            &identity.device_id,
            &id,
            &status,
            reply.get("payload").cloned(),
        )
        .await;
    Ok(Json(json!({"message": "OK"})).into_response())
}

/// Who sent the request (see [`crate::auth`]).
pub(crate) fn authenticate(
    rules: &DeviceRules,
    peer: Option<&PeerIdentity>,
    headers: &HeaderMap,
) -> Result<Identity, ApiError> {
    rules
        .auth
        .authenticate(peer, headers)
        .map_err(|error| match error {
            // Without [auth], a bad x-device-id is a malformed request, not a credential.
            AuthError::BadDeviceId(why) if !rules.auth.required() => ApiError::BadRequest(why),
            other => ApiError::Unauthorized(other),
        })
}

/// The device policy, before any plugin runs.
pub(crate) fn check_policy<'a>(
    rules: &DeviceRules,
    identity: &Identity,
    topics: impl IntoIterator<Item = &'a str>,
    count: usize,
    bytes: usize,
    largest: usize,
) -> Result<(), ApiError> {
    rules
        .policy
        .check_publish(identity, topics, count, bytes, largest)
        .map_err(|refusal| match refusal {
            Refusal::Denied { topic } => ApiError::Forbidden {
                topic,
                device: identity.device_id.clone(),
            },
            Refusal::TooLarge { grant, limit, size } => ApiError::TooLarge(format!(
                "{size} payload bytes exceed the limit of {limit} of policy grant `{grant}`"
            )),
            Refusal::RateLimited {
                grant,
                limit,
                retry_after,
            } => ApiError::RateLimited {
                grant,
                limit,
                retry_after: retry_after.as_secs_f64().ceil().max(1.0) as u64,
            },
        })
}

fn parse_qos(qos: Option<&str>) -> Result<u8, ApiError> {
    match qos {
        None | Some("0") => Ok(0),
        Some("1") => Ok(1),
        Some(other) => Err(ApiError::BadRequest(format!(
            "qos must be 0 or 1 (IoT Core's limits), not `{other}`"
        ))),
    }
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Bytes beyond a limit that are still read (and dropped) before answering `413`.
const DRAIN_MAX_BYTES: usize = 4 * 1024 * 1024;

/// Reads a body of at most `limit` bytes; over it, `413` naming `what` and the limit.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    what: &str,
    limit_name: &str,
) -> Result<Bytes, ApiError> {
    let too_large = |size: Option<u64>| {
        let size = size.map(|n| format!(" of {n} bytes")).unwrap_or_default();
        ApiError::TooLarge(format!(
            "{what}{size} exceeds {limit_name} of {limit} bytes"
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(size) = declared
        && size > limit as u64
    {
        // Read (and discard) a body that is only somewhat too large, so that the device
        // gets its 413 instead of a connection reset while it is still sending.
        if size <= (limit + DRAIN_MAX_BYTES) as u64 {
            let _ = axum::body::to_bytes(body, limit + DRAIN_MAX_BYTES).await;
        }
        return Err(too_large(Some(size)));
    }
    axum::body::to_bytes(body, limit).await.map_err(|error| {
        let source = std::error::Error::source(&error);
        if source.is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) {
            too_large(None)
        } else {
            ApiError::BadRequest(format!("cannot read the request body: {error}"))
        }
    })
}
