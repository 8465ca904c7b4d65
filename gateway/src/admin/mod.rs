//! The admin API, on its own listener (`[admin] listen`), for operators only. Every
//! request carries `Authorization: Bearer <admin.token>`; without it: `401 unauthorized`.
//!
//! - `GET /admin/spool`: records and bytes waiting per sink, dead letters, commits.
//! - `GET /admin/devices`: the open sessions, WebSocket and MQTT (device, protocol, how
//!   it authenticated, messages, in flight, the most ever in flight, the window).
//! - `GET /metrics`: Prometheus metrics (messages by status, refusals by code, records
//!   leaving the spool by sink and outcome, sink failures, receipt-to-confirmation
//!   latency per sink, spool depth and bytes, fsyncs, dead letters, WebSocket sessions).
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
//! - `POST /admin/drain`: the gateway leaves and stops, as on SIGTERM (`202`).
//! - `POST /admin/registry/refresh`: the snapshot of the certificates registered at AWS
//!   IoT read again, every certificate's things too (`[auth.registry]`; `404` without
//!   it, `502 registry_unavailable` when the control plane failed).
//! - `GET /admin/console/…`: what the operator's console reads ([`crate::console::api`]).
//! - `GET /`, `GET /console/{file}`: the console's page and assets, the only routes
//!   served without the token: they hold no data ([`crate::console::page`]).
//!
//! Errors are JSON `{"code": …, "message": …}` like the device API's ([`error`]).
//!
//! - [`status`]: the state now (metrics, devices, spool);
//! - [`dlq`]: the dead letters;
//! - [`plugins`]: the plugin chain and its uploaded versions.

mod dlq;
mod error;
mod plugins;
mod status;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::ingress::sessions::Sessions;
use crate::pipeline::Pipeline;
use crate::shutdown::{Shutdown, ShutdownTrigger};
use dlq::{discard, list, redrive, show};
use error::AdminApiError;
use plugins::{activate, delete_version, plugins, upload};
use status::{devices, metrics, spool_stats};

/// The parts of the gateway the admin API reads and acts on.
#[derive(Clone)]
pub struct Parts {
    /// The message path (spool, plugins, dead letters).
    pub pipeline: Arc<Pipeline>,
    /// Open WebSocket sessions.
    pub sessions: Arc<Sessions>,
    /// Configuration reloads.
    pub reloader: Arc<crate::reconfigure::Reloader>,
    /// Starts leaving (`POST /admin/drain`), as SIGTERM does.
    pub leave: Arc<ShutdownTrigger>,
}

/// Largest plugin component an upload may carry.
const MAX_COMPONENT_BYTES: usize = 64 << 20;

#[derive(Clone)]
struct AdminState {
    pipeline: Arc<Pipeline>,
    sessions: Arc<Sessions>,
    reloader: Arc<crate::reconfigure::Reloader>,
    leave: Arc<ShutdownTrigger>,
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
    let console = crate::console::Console::new(parts.pipeline.clone(), parts.reloader.clone());
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
        reloader: parts.reloader,
        leave: parts.leave,
        token: token.into(),
    };
    axum::Router::new()
        .route("/admin/spool", get(spool_stats))
        .route("/admin/devices", get(devices))
        .route("/metrics", get(metrics))
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
        .route("/admin/drain", post(drain))
        .route("/admin/registry/refresh", post(refresh_registry))
        .with_state(state.clone())
        .merge(crate::console::api::router(console))
        .layer(axum::middleware::from_fn_with_state(state, authorize))
        .merge(crate::console::page::router())
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

/// `POST /admin/drain`: the gateway leaves and stops as on SIGTERM: `/readyz` red and
/// HTTP refused for `server.leave_delay_ms`, then no new connections, sessions told to
/// go, the spool delivered within `server.shutdown_grace_ms`, and the process exits.
async fn drain(State(state): State<AdminState>) -> Response {
    state.leave.fire();
    let (_, config) = state.reloader.running().await;
    let server = config.server;
    (
        axum::http::StatusCode::ACCEPTED,
        Json(serde_json::json!({
            "leaving": true,
            "leave_delay_ms": server.leave_delay_ms,
            "shutdown_grace_ms": server.shutdown_grace_ms,
        })),
    )
        .into_response()
}

/// `POST /admin/registry/refresh`: `{"certificates", "active", "changed"}`.
async fn refresh_registry(State(state): State<AdminState>) -> Response {
    let Some(registry) = state.reloader.registry() else {
        return AdminApiError::NotFound("no [auth.registry] is configured".to_string())
            .into_response();
    };
    // In its own task: a client that hangs up must not cut a refresh in half.
    match tokio::spawn(async move { registry.refresh(true).await }).await {
        Ok(Ok(refreshed)) => Json(refreshed).into_response(),
        Ok(Err(error)) => AdminApiError::Registry(error).into_response(),
        Err(_) => AdminApiError::Internal("the refresh task failed".into()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    use super::*;
    use axum::http::StatusCode;
    use serde_json::Value;

    const TOKEN: &str = "test-admin-token-0123";

    /// The admin app over `fixture`'s gateway.
    fn app(fixture: &crate::testing::Fixture) -> axum::Router {
        let parts = Parts {
            pipeline: fixture.state.pipeline.clone(),
            sessions: fixture.state.sessions.clone(),
            reloader: fixture.reloader.clone(),
            leave: fixture.leave.clone(),
        };
        let console = crate::console::Console::new(parts.pipeline.clone(), parts.reloader.clone());
        router(parts, TOKEN.to_string(), console)
    }

    /// Sends `request` (with the admin token unless `token` is false) to a fresh admin
    /// app; the status, the code and the headers.
    async fn send(request: Request<Body>) -> (StatusCode, Value, axum::http::HeaderMap) {
        let fixture = crate::testing::gateway("");
        let response = app(&fixture).oneshot(request).await.unwrap();
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
        let response = app(&fixture)
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
