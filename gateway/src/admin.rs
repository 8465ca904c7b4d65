//! The admin API, on its own listener (`[admin] listen`), for operators only. Every
//! request carries `Authorization: Bearer <admin.token>`; without it: `401 unauthorized`.
//!
//! - `GET /admin/spool`: records and bytes waiting per sink, dead letters, commits.
//! - `GET /admin/devices`: the open sessions, WebSocket and MQTT (device, protocol, how
//!   it authenticated, messages, in flight, the most ever in flight, the window).
//! - `GET /metrics`: Prometheus metrics (messages by status, refusals by code, records
//!   leaving the spool by sink and outcome, sink failures, receipt-to-confirmation
//!   latency per sink, spool depth and bytes, fsyncs, dead letters, WebSocket sessions).
//! - `GET /admin/downlink`: the instance id, whether the broker confirmed the command and
//!   presence subscriptions, devices with commands waiting, commands queued in all.
//! - `GET /admin/dlq?from=KEY&limit=N`: dead letters, oldest first (`next` pages on).
//! - `GET /admin/dlq/{key}`: one dead letter with its payload.
//! - `DELETE /admin/dlq/{key}`: discard one.
//! - `POST /admin/dlq/redrive` with `{"keys": [..]}` or `{"all": true}`: run them again
//!   (see [`Pipeline::redrive`]).
//! - `GET /admin/plugins`: the chain: each plugin's kind, hash, file, whether it is the
//!   configured file or an upload, since when it serves, its uploaded versions, and its
//!   counters (calls, messages by outcome, average call time, its own counters).
//! - `POST /admin/plugins/{name}/versions[?activate=false]`, body the component:
//!   validates it (compiles, imports, kind, `init` with the plugin's configuration),
//!   stores it under the data directory and, unless `activate=false`, makes it serve.
//!   `201` with its hash; `422 plugin_invalid` (nothing changed) when it is refused;
//!   `409 config_changed` (nothing changed) when a configuration reload changed the
//!   plugin meanwhile.
//! - `POST /admin/plugins/{name}/activate` with `{"hash": H}` (a stored version) or
//!   `{"configured": true}` (the configured file again). Activations outlive restarts.
//! - `DELETE /admin/plugins/{name}/versions/{hash}`: deletes a stored version (`409
//!   version_active` for the one serving).
//! - `POST /admin/reload`: reads the configuration file again (like `SIGHUP`), see
//!   [`crate::reconfigure`]; `422 invalid_config` (nothing changed) when it is refused.
//! - `GET /admin/console/…`: what the operator's console reads ([`crate::console::api`]).
//! - `GET /`, `GET /console/{file}`: the console's page and assets, the only routes
//!   served without the token: they hold no data ([`crate::console::page`]).
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

use crate::ingress::sessions::Sessions;
use crate::pipeline::Pipeline;
use crate::shutdown::Shutdown;
use crate::spool::codec::DeadLetter;

/// Most dead letters per listing page.
const MAX_PAGE: usize = 1_000;

/// The parts of the gateway the admin API reads and acts on.
#[derive(Clone)]
pub struct Parts {
    /// The message path (spool, plugins, dead letters).
    pub pipeline: Arc<Pipeline>,
    /// Open WebSocket sessions.
    pub sessions: Arc<Sessions>,
    /// Commands to devices, when configured.
    pub downlink: Option<Arc<crate::downlink::Downlink>>,
    /// Configuration reloads.
    pub reloader: Arc<crate::reconfigure::Reloader>,
}

/// Largest plugin component an upload may carry.
const MAX_COMPONENT_BYTES: usize = 64 << 20;

#[derive(Clone)]
struct AdminState {
    pipeline: Arc<Pipeline>,
    sessions: Arc<Sessions>,
    downlink: Option<Arc<crate::downlink::Downlink>>,
    reloader: Arc<crate::reconfigure::Reloader>,
    token: Arc<str>,
}

/// Binds the admin listener and serves it until `shutdown` fires. Prints
/// `sluice: admin on http://<address>` once bound.
pub async fn serve(
    listen: SocketAddr,
    token: String,
    parts: Parts,
    mut shutdown: Shutdown,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use anyhow::Context as _;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (admin)"))?;
    let address = listener.local_addr()?;
    println!("sluice: admin on http://{address}");
    tracing::info!(%address, "admin API listening");
    let console = crate::console::Console::new(
        parts.pipeline.clone(),
        parts.downlink.clone(),
        parts.reloader.clone(),
    );
    let sampler = crate::console::start(console.clone(), shutdown.clone());
    let app = router(parts, token, console);
    Ok(tokio::spawn(async move {
        let _sampler = AbortOnDrop(sampler);
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "admin listener failed");
        }
    }))
}

/// Stops the console's sampler with the listener, however the listener ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn router(parts: Parts, token: String, console: crate::console::Console) -> axum::Router {
    let state = AdminState {
        pipeline: parts.pipeline,
        sessions: parts.sessions,
        downlink: parts.downlink,
        reloader: parts.reloader,
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
        .route("/admin/plugins", get(plugins))
        .route(
            "/admin/plugins/{name}/versions",
            post(upload).layer(axum::extract::DefaultBodyLimit::max(MAX_COMPONENT_BYTES)),
        )
        .route("/admin/plugins/{name}/activate", post(activate))
        .route(
            "/admin/plugins/{name}/versions/{hash}",
            axum::routing::delete(delete_version),
        )
        .route("/admin/reload", post(reload))
        .with_state(state.clone())
        .merge(crate::console::api::router(console))
        .layer(axum::middleware::from_fn_with_state(state, authorize))
        .merge(crate::console::page::router())
}

/// Every error the admin API answers with: JSON `{"code", "message"}` and the status.
#[derive(Debug)]
pub enum AdminApiError {
    /// `400 bad_request`: a malformed query or body.
    BadRequest(String),
    /// `401 unauthorized`: no admin token, or the wrong one.
    Unauthorized,
    /// `404 not_found`: no such dead letter, plugin or version; no `[downlink]`.
    NotFound(String),
    /// `503 spool_unavailable` (with `Retry-After: 5`): the spool cannot read or write.
    Spool(String),
    /// A plugin operation refused: `404`, `409 version_active` / `config_changed`,
    /// `422 plugin_invalid`, `503 storage_unavailable`.
    Plugin(crate::plugin::AdminError),
    /// A configuration reload refused: `409 no_config_file`, `422 invalid_config`.
    Reload(crate::reconfigure::ReloadError),
    /// `500 internal`: a task the request ran failed.
    Internal(String),
}

impl From<crate::spool::SpoolError> for AdminApiError {
    fn from(error: crate::spool::SpoolError) -> Self {
        AdminApiError::Spool(error.to_string())
    }
}

impl From<crate::plugin::AdminError> for AdminApiError {
    fn from(error: crate::plugin::AdminError) -> Self {
        AdminApiError::Plugin(error)
    }
}

impl From<crate::reconfigure::ReloadError> for AdminApiError {
    fn from(error: crate::reconfigure::ReloadError) -> Self {
        AdminApiError::Reload(error)
    }
}

impl AdminApiError {
    /// The status and stable code.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        use crate::plugin::AdminError as Plugin;
        use crate::reconfigure::ReloadError as Reload;
        match self {
            AdminApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            AdminApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            AdminApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            AdminApiError::Spool(_) => (StatusCode::SERVICE_UNAVAILABLE, "spool_unavailable"),
            AdminApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            AdminApiError::Plugin(error) => match error {
                Plugin::UnknownPlugin(_) | Plugin::UnknownVersion { .. } => {
                    (StatusCode::NOT_FOUND, "not_found")
                }
                Plugin::Active { .. } => (StatusCode::CONFLICT, "version_active"),
                Plugin::Changed(_) => (StatusCode::CONFLICT, "config_changed"),
                Plugin::UnusableName(_) | Plugin::Invalid(_) => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "plugin_invalid")
                }
                Plugin::NoStore | Plugin::Storage(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable")
                }
            },
            AdminApiError::Reload(Reload::NoFile) => (StatusCode::CONFLICT, "no_config_file"),
            AdminApiError::Reload(Reload::Invalid(_)) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_config")
            }
        }
    }
}

impl IntoResponse for AdminApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match self {
            AdminApiError::BadRequest(message)
            | AdminApiError::NotFound(message)
            | AdminApiError::Spool(message)
            | AdminApiError::Internal(message) => message,
            AdminApiError::Unauthorized => "send `Authorization: Bearer <admin.token>`".to_string(),
            AdminApiError::Plugin(error) => error.to_string(),
            AdminApiError::Reload(error) => error.to_string(),
        };
        let mut response =
            (status, Json(json!({"code": code, "message": message}))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, axum::http::HeaderValue::from(5u32));
        }
        response
    }
}

async fn authorize(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match presented {
        Some(token) if same(token.as_bytes(), state.token.as_bytes()) => next.run(request).await,
        _ => AdminApiError::Unauthorized.into_response(),
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
    m.dead_letter_bytes.set(stats.dead_letter_bytes as i64);
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
        None => AdminApiError::NotFound("no [downlink] configured".into()).into_response(),
    }
}

async fn devices(State(state): State<AdminState>) -> Response {
    let open = state.sessions.list();
    let sessions: Vec<&crate::ingress::sessions::SessionInfo> = open.iter().map(|s| &**s).collect();
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

async fn show(State(state): State<AdminState>, Path(key): Path<u64>) -> Response {
    match state.pipeline.spool().dead_letter(key) {
        Ok(Some(letter)) => Json(letter_json(key, &letter, true)).into_response(),
        Ok(None) => AdminApiError::NotFound(format!("no dead letter {key}")).into_response(),
        Err(e) => AdminApiError::from(e).into_response(),
    }
}

async fn discard(State(state): State<AdminState>, Path(key): Path<u64>) -> Response {
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

/// `GET /admin/plugins`.
async fn plugins(State(state): State<AdminState>) -> Response {
    let plugins = state.pipeline.plugins();
    let set = plugins.current();
    let list: Vec<Value> = set
        .all()
        .map(|plugin| {
            let stats = &plugin.stats;
            let metrics = &stats.metrics;
            let calls = metrics.calls.get();
            let nanos = stats.call_nanos.load(std::sync::atomic::Ordering::Relaxed);
            let mut messages = serde_json::Map::new();
            for (outcome, n) in [
                ("passed", metrics.passed.get()),
                ("split", metrics.split.get()),
                ("dropped", metrics.dropped.get()),
                ("routed", metrics.routed.get()),
                ("out_of_scope", metrics.out_of_scope.get()),
            ] {
                messages.insert(outcome.to_string(), n.into());
            }
            for kind in crate::plugin::FailureKind::ALL {
                let code = kind.code();
                messages.insert(code.to_string(), metrics.failures(code).into());
            }
            json!({
                "name": plugin.name,
                "kind": plugin.kind.to_string(),
                "hash": plugin.hash,
                "path": plugin.path,
                "configured_path": plugin.entry.path,
                "topics": plugin.entry.topics,
                "source": plugin.source,
                "active_since_ms": plugin.loaded_at_ms,
                "versions": plugins.stored_versions(&plugin.name),
                "calls": calls,
                "average_call_us": if calls == 0 { 0.0 } else { nanos as f64 / calls as f64 / 1000.0 },
                "messages": messages,
                "last_error": stats.last_error(),
                "counters": stats.counters().into_iter().map(|(k, v)| (k, Value::from(v))).collect::<serde_json::Map<String, Value>>(),
            })
        })
        .collect();
    Json(json!({ "plugins": list })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadParams {
    activate: Option<bool>,
}

/// `POST /admin/plugins/{name}/versions`.
async fn upload(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    params: Result<Query<UploadParams>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Bytes,
) -> Response {
    let Ok(Query(params)) = params else {
        return AdminApiError::BadRequest("query parameters: activate=true|false".into())
            .into_response();
    };
    if body.is_empty() {
        return AdminApiError::BadRequest("send the component (.wasm) as the body".into())
            .into_response();
    }
    let plugins = state.pipeline.plugins().clone();
    let activate = params.activate.unwrap_or(true);
    match plugin_task(move || plugins.upload(&name, &body, activate)).await {
        Ok(report) => (StatusCode::CREATED, Json(report)).into_response(),
        Err(response) => response,
    }
}

/// Runs a plugin operation (it compiles and initialises components, so off the runtime
/// threads); its error as the API's answer.
async fn plugin_task<T: Send + 'static>(
    operation: impl FnOnce() -> Result<T, crate::plugin::AdminError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(operation).await {
        Ok(result) => result.map_err(|error| AdminApiError::from(error).into_response()),
        Err(e) => Err(AdminApiError::Internal(e.to_string()).into_response()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActivateBody {
    hash: Option<String>,
    #[serde(default)]
    configured: bool,
}

/// `POST /admin/plugins/{name}/activate`.
async fn activate(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    body: Result<Json<ActivateBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let hash = match body {
        Ok(Json(ActivateBody {
            hash: Some(hash),
            configured: false,
        })) => Some(hash),
        Ok(Json(ActivateBody {
            hash: None,
            configured: true,
        })) => None,
        _ => {
            return AdminApiError::BadRequest(
                r#"send {"hash": "<sha256>"} or {"configured": true}"#.into(),
            )
            .into_response();
        }
    };
    let plugins = state.pipeline.plugins().clone();
    match plugin_task(move || plugins.activate(&name, hash.as_deref())).await {
        Ok(report) => Json(report).into_response(),
        Err(response) => response,
    }
}

/// `DELETE /admin/plugins/{name}/versions/{hash}`.
async fn delete_version(
    State(state): State<AdminState>,
    Path((name, hash)): Path<(String, String)>,
) -> Response {
    let plugins = state.pipeline.plugins().clone();
    match plugin_task(move || plugins.delete_version(&name, &hash)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(response) => response,
    }
}

/// `POST /admin/reload`.
async fn reload(State(state): State<AdminState>) -> Response {
    // In its own task: a client that hangs up must not cut a reload in half.
    let reloader = state.reloader.clone();
    let Ok(done) = tokio::spawn(async move { reloader.reload().await }).await else {
        return AdminApiError::Internal("the reload task failed".into()).into_response();
    };
    match done {
        Ok(report) => Json(report).into_response(),
        Err(error) => AdminApiError::from(error).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    use super::*;

    const TOKEN: &str = "test-admin-token-0123";

    /// Sends `request` (with the admin token unless `token` is false) to a fresh admin
    /// app; the status, the code and the headers.
    async fn send(request: Request<Body>) -> (StatusCode, Value, axum::http::HeaderMap) {
        let fixture = crate::testing::gateway("");
        let parts = Parts {
            pipeline: fixture.state.pipeline.clone(),
            sessions: fixture.state.sessions.clone(),
            downlink: None,
            reloader: fixture.reloader.clone(),
        };
        let console =
            crate::console::Console::new(parts.pipeline.clone(), None, parts.reloader.clone());
        let response = router(parts, TOKEN.to_string(), console)
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, body, headers)
    }

    fn authorized(method: &str, path: &str, body: &'static str) -> Request<Body> {
        Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap()
    }

    #[tokio::test]
    async fn errors_map_to_their_status_and_code() {
        let wrong_token = Request::get("/admin/spool")
            .header("authorization", "Bearer nope")
            .body(Body::empty())
            .unwrap();
        let cases = [
            (wrong_token, StatusCode::UNAUTHORIZED, "unauthorized"),
            (
                authorized("GET", "/admin/dlq/999", ""),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                authorized("DELETE", "/admin/dlq/999", ""),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                authorized("GET", "/admin/dlq?limit=x", ""),
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                authorized("POST", "/admin/dlq/redrive", "{}"),
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                authorized("POST", "/admin/reload", ""),
                StatusCode::CONFLICT,
                "no_config_file",
            ),
            (
                authorized("GET", "/admin/downlink", ""),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                authorized(
                    "POST",
                    "/admin/plugins/nope/activate",
                    r#"{"configured": true}"#,
                ),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                authorized(
                    "POST",
                    "/admin/plugins/nope/activate",
                    r#"{"hash": "a", "configured": true}"#,
                ),
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
        ];
        for (request, status, code) in cases {
            let path = request.uri().to_string();
            let (got, body, _) = send(request).await;
            assert_eq!(got, status, "{path}: {body}");
            assert_eq!(body["code"], code, "{path}: {body}");
            assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        let (status, body, _) = send(authorized("GET", "/admin/spool", "")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["dead_letters"], 0);
    }

    #[tokio::test]
    async fn the_console_page_is_public_and_its_data_needs_the_token() {
        for path in [
            "/admin/console/overview",
            "/admin/console/history",
            "/admin/console/config",
            "/admin/plugins",
            "/admin/dlq",
        ] {
            for token in [None, Some("Bearer nope"), Some(TOKEN)] {
                let mut request = Request::get(path);
                if let Some(token) = token {
                    request = request.header("authorization", token);
                }
                let (status, body, _) = send(request.body(Body::empty()).unwrap()).await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} {token:?}");
                assert_eq!(body["code"], "unauthorized");
            }
            let (status, _, _) = send(authorized("GET", path, "")).await;
            assert_eq!(status, StatusCode::OK, "{path} with the token");
        }
        for path in ["/", "/console/console.js", "/console/uPlot.iife.min.js"] {
            let request = Request::get(path).body(Body::empty()).unwrap();
            let (status, _, headers) = send(request).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert!(
                headers["content-security-policy"]
                    .to_str()
                    .unwrap()
                    .contains("default-src 'none'")
            );
        }
    }

    #[test]
    fn storage_failures_are_503_with_retry_after() {
        let response = AdminApiError::from(crate::spool::SpoolError::Closed).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "5");
    }

    /// The spool's gauges are set from its state when `/metrics` is read: a dead letter
    /// shows in `sluice_dead_letters` and its bytes in `sluice_dead_letter_bytes` (the
    /// second was registered and documented, and never set).
    #[tokio::test]
    async fn metrics_report_the_dead_letters_and_their_bytes() {
        let fixture = crate::testing::gateway(
            r#"
            [[routing.rules]]
            name = "bad"
            topic = "bad/#"
            destination = "dead-letter"
            "#,
        );
        let message = crate::message::Message {
            id: crate::message::new_id(),
            device_id: "d1".to_string(),
            topic: "bad/x".to_string(),
            content_type: String::new(),
            qos: 1,
            attributes: Vec::new(),
            received_at_ms: crate::message::now_ms(),
            payload: b"0123456789".to_vec(),
        };
        fixture
            .state
            .pipeline
            .process(vec![message], false)
            .await
            .unwrap();
        let parts = Parts {
            pipeline: fixture.state.pipeline.clone(),
            sessions: fixture.state.sessions.clone(),
            downlink: None,
            reloader: fixture.reloader.clone(),
        };
        let console =
            crate::console::Console::new(parts.pipeline.clone(), None, parts.reloader.clone());
        let response = router(parts, TOKEN.to_string(), console)
            .oneshot(authorized("GET", "/metrics", ""))
            .await
            .unwrap();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let gauge = |name: &str| -> i64 {
            text.lines()
                .find_map(|line| line.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no {name} in {text}"))
                .parse()
                .unwrap()
        };
        assert_eq!(gauge("sluice_dead_letters"), 1);
        assert!(gauge("sluice_dead_letter_bytes") > 10, "{text}");
    }
}
