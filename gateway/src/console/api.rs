//! The console's JSON endpoints, mounted on the admin listener behind its token:
//!
//! - `GET /admin/console/overview`: the moment: readiness and its reasons, message
//!   totals and the last second's rates, each sink's spool depth, bytes, limit, failing
//!   state and delivery latency p50/p99, dead letters, messages per route and
//!   destination, refusals per code, each plugin's call time p50/p99.
//! - `GET /admin/console/history?since=MS`: the time series after `since` (all 15
//!   minutes without it), column by column (see [`History::to_json`]).
//! - `GET /admin/console/config`: the running configuration, secrets redacted, and the
//!   file it came from.
//!
//! The rest of what the page shows and does (plugins, dead letters, devices, reload)
//! goes through the admin API's own routes.
//!
//! [`History::to_json`]: super::history::History::to_json

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::Console;
use super::exposition::{self, Sample};
use super::history::{self, STATUSES};

/// The routes; the caller puts them behind the admin token.
pub fn router(console: Console) -> axum::Router {
    axum::Router::new()
        .route("/admin/console/overview", get(overview))
        .route("/admin/console/history", get(series))
        .route("/admin/console/config", get(config))
        .with_state(console)
}

async fn overview(State(console): State<Console>) -> Response {
    let samples = exposition::parse(&crate::metrics::METRICS.render());
    let spool = console.pipeline.spool().stats();
    let failing = console.pipeline.spool().failing_sinks();
    let registry = console.reloader.registry();
    let reasons = crate::readiness::not_ready_reasons(
        &console.pipeline,
        &console.reloader.auth(),
        registry.as_deref(),
    );
    let (last, names) = {
        let history = console.history.lock().unwrap_or_else(|p| p.into_inner());
        (history.last().cloned(), history::series_names())
    };
    let latest = |name: &str| -> Value {
        let index = names.iter().position(|n| n == name);
        match (last.as_ref(), index) {
            (Some(point), Some(index)) => point.values[index].map_or(Value::Null, Value::from),
            _ => Value::Null,
        }
    };

    let mut totals = Map::new();
    for status in STATUSES {
        totals.insert(
            status.replace('-', "_"),
            exposition::sum(&samples, "sluice_messages_total", |s| {
                s.label("status") == Some(status)
            })
            .into(),
        );
    }
    totals.insert(
        "refused".into(),
        exposition::sum(&samples, "sluice_refused_total", |_| true).into(),
    );
    let rate_names = names
        .iter()
        .filter(|n| !n.starts_with("p50_") && !n.starts_with("p99_"))
        .filter(|n| !n.starts_with("records_") && !n.starts_with("bytes_"));
    let rates: Map<String, Value> = rate_names.map(|n| (n.clone(), latest(n))).collect();

    let sinks: Vec<Value> = spool
        .queues
        .iter()
        .map(|queue| {
            let sink = queue.sink.name();
            let key = sink.replace('-', "_");
            json!({
                "sink": sink,
                "records": queue.records,
                "bytes": queue.bytes,
                "limit_bytes": spool.max_bytes_per_sink,
                "failing": failing.contains(&queue.sink),
                "latency_p50_ms": latest(&format!("p50_{key}")),
                "latency_p99_ms": latest(&format!("p99_{key}")),
            })
        })
        .collect();

    Json(json!({
        "now_ms": super::now_ms(),
        "ready": reasons.is_empty(),
        "reasons": reasons,
        "totals": totals,
        "rates": rates,
        "sinks": sinks,
        "dead_letters": {
            "count": spool.dead_letters,
            "bytes": spool.dead_letter_bytes,
            "limit_bytes": spool.max_dead_letter_bytes,
        },
        "routes": routes(&samples),
        "refusals": by_label(&samples, "sluice_refused_total", "status"),
        "plugins": plugin_call_times(&samples),
    }))
    .into_response()
}

/// Messages per deciding route and destination, most first.
fn routes(samples: &[Sample]) -> Vec<Value> {
    let mut routes: Vec<(&str, &str, f64)> = samples
        .iter()
        .filter(|s| s.name == "sluice_routed_messages_total")
        .filter_map(|s| Some((s.label("route")?, s.label("destination")?, s.value)))
        .collect();
    routes.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(b.0)));
    routes
        .into_iter()
        .map(|(route, destination, messages)| {
            json!({"route": route, "destination": destination, "messages": messages})
        })
        .collect()
}

/// `[{"code", "count"}]` of a counter family with one label, most first.
fn by_label(samples: &[Sample], name: &str, label: &str) -> Vec<Value> {
    let mut counts: Vec<(&str, f64)> = samples
        .iter()
        .filter(|s| s.name == name)
        .filter_map(|s| Some((s.label(label)?, s.value)))
        .collect();
    counts.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    counts
        .into_iter()
        .map(|(code, count)| json!({"code": code, "count": count}))
        .collect()
}

/// Each plugin's call time p50 and p99 since start, in microseconds.
fn plugin_call_times(samples: &[Sample]) -> Map<String, Value> {
    let mut names: Vec<&str> = samples
        .iter()
        .filter(|s| s.name == "sluice_plugin_call_seconds_bucket")
        .filter_map(|s| s.label("plugin"))
        .collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .map(|plugin| {
            let buckets = exposition::buckets(samples, "sluice_plugin_call_seconds", |s| {
                s.label("plugin") == Some(plugin)
            });
            let us = |q| exposition::quantile(&buckets, q).map(|s| s * 1e6);
            (
                plugin.to_string(),
                json!({"call_p50_us": us(0.5), "call_p99_us": us(0.99)}),
            )
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeriesParams {
    since: Option<u64>,
}

async fn series(
    State(console): State<Console>,
    params: Result<Query<SeriesParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(params)) = params else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"code": "bad_request", "message": "query parameters: since=MS"})),
        )
            .into_response();
    };
    let history = console.history.lock().unwrap_or_else(|p| p.into_inner());
    Json(history.to_json(params.since.unwrap_or(0))).into_response()
}

async fn config(State(console): State<Console>) -> Response {
    let (file, running) = console.reloader.running().await;
    Json(json!({
        "file": file,
        // The configuration types' own rendering: every setting, with secrets (the admin
        // token, token signing keys) shown as <redacted>.
        "running": format!("{running:#?}"),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    use super::*;

    fn console(config: &str) -> (crate::testing::Fixture, Console) {
        let fixture = crate::testing::gateway(config);
        let console = Console::new(fixture.state.pipeline.clone(), fixture.reloader.clone());
        (fixture, console)
    }

    async fn get(console: &Console, path: &str) -> (StatusCode, Value) {
        let response = router(console.clone())
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 22)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn the_overview_counts_what_the_pipeline_did() {
        let (fixture, console) = console("");
        let (_, before) = get(&console, "/admin/console/overview").await;
        let message = crate::message::Message {
            id: crate::message::new_id(),
            device_id: "console-test".to_string(),
            topic: "sites/1/temp".to_string(),
            content_type: String::new(),
            qos: 1,
            attributes: Vec::new(),
            received_at_ms: crate::message::now_ms(),
            payload: br#"{"t": 1}"#.to_vec(),
        };
        let reports = fixture
            .state
            .pipeline
            .process(vec![message], false)
            .await
            .unwrap();
        assert_eq!(reports[0].status.name(), "accepted", "{:?}", reports[0]);
        let (status, after) = get(&console, "/admin/console/overview").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(after["ready"], true, "{after}");
        let accepted = |v: &Value| v["totals"]["accepted"].as_f64().unwrap();
        // Metrics are per process and tests run side by side: at least one more.
        assert!(
            accepted(&after) >= accepted(&before) + 1.0,
            "{before} {after}"
        );
        let route = after["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["route"] == "builtin:default")
            .expect("the default route is listed");
        assert!(route["messages"].as_f64().unwrap() >= 1.0);
        let sinks = after["sinks"].as_array().unwrap();
        assert!(sinks.iter().any(|s| s["sink"] == "local"), "{after}");
        assert!(sinks.iter().all(|s| s["limit_bytes"].as_u64().unwrap() > 0));
        assert_eq!(after["dead_letters"]["count"], 0);
    }

    #[tokio::test]
    async fn the_history_grows_a_point_a_sample_and_pages_by_time() {
        let (_fixture, console) = console("");
        let (_, empty) = get(&console, "/admin/console/history").await;
        assert_eq!(empty["t"], json!([]));
        console.sample();
        std::thread::sleep(std::time::Duration::from_millis(5));
        console.sample();
        std::thread::sleep(std::time::Duration::from_millis(5));
        console.sample();
        let (status, all) = get(&console, "/admin/console/history").await;
        assert_eq!(status, StatusCode::OK);
        let times = all["t"].as_array().unwrap();
        assert_eq!(times.len(), 2, "{all}");
        for name in history::series_names() {
            assert_eq!(all["series"][&name].as_array().unwrap().len(), 2, "{name}");
        }
        let first = times[0].as_u64().unwrap();
        let (_, later) = get(&console, &format!("/admin/console/history?since={first}")).await;
        assert_eq!(later["t"].as_array().unwrap().len(), 1);
        let (status, bad) = get(&console, "/admin/console/history?since=soon").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(bad["code"], "bad_request");
    }

    #[tokio::test]
    async fn the_configuration_is_shown_without_its_secrets() {
        let (_fixture, console) = console(
            r#"
            [admin]
            listen = "127.0.0.1:0"
            token = "very-secret-admin-token"
            "#,
        );
        let (status, body) = get(&console, "/admin/console/config").await;
        assert_eq!(status, StatusCode::OK);
        let running = body["running"].as_str().unwrap();
        assert!(running.contains("127.0.0.1:0"), "{running}");
        assert!(running.contains("<redacted>"), "{running}");
        assert!(!running.contains("very-secret-admin-token"), "{running}");
    }
}
