//! The plugin chain: `GET /admin/plugins`, uploaded versions (`POST` and `DELETE
//! /admin/plugins/{name}/versions…`) and which one serves (`POST
//! /admin/plugins/{name}/activate`).

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::admin::AdminState;
use crate::admin::error::AdminApiError;

/// `GET /admin/plugins`.
pub(super) async fn plugins(State(state): State<AdminState>) -> Response {
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
pub(super) struct UploadParams {
    activate: Option<bool>,
}

/// `POST /admin/plugins/{name}/versions`.
pub(super) async fn upload(
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
pub(super) async fn plugin_task<T: Send + 'static>(
    operation: impl FnOnce() -> Result<T, crate::plugin::AdminError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(operation).await {
        Ok(result) => result.map_err(|error| AdminApiError::from(error).into_response()),
        Err(e) => Err(AdminApiError::Internal(e.to_string()).into_response()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ActivateBody {
    hash: Option<String>,
    #[serde(default)]
    configured: bool,
}

/// `POST /admin/plugins/{name}/activate`.
pub(super) async fn activate(
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
pub(super) async fn delete_version(
    State(state): State<AdminState>,
    Path((name, hash)): Path<(String, String)>,
) -> Response {
    let plugins = state.pipeline.plugins().clone();
    match plugin_task(move || plugins.delete_version(&name, &hash)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(response) => response,
    }
}
