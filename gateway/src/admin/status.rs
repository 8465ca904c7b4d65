//! What the gateway's state is now: `GET /metrics` (the gauges read from the spool and
//! the sessions first), `GET /admin/devices`, `GET /admin/spool`.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use serde_json::json;

use crate::admin::AdminState;

/// `GET /metrics`: Prometheus (OpenMetrics) text; state gauges are read now.
pub(super) async fn metrics(State(state): State<AdminState>) -> Response {
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
    if let Some(age) = state.reloader.registry().and_then(|r| r.age_secs()) {
        m.registry_age.set(age as i64);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

pub(super) async fn devices(State(state): State<AdminState>) -> Response {
    let open = state.sessions.list();
    let sessions: Vec<&crate::ingress::sessions::SessionInfo> = open.iter().map(|s| &**s).collect();
    Json(json!({ "sessions": sessions })).into_response()
}

pub(super) async fn spool_stats(State(state): State<AdminState>) -> Response {
    Json(state.pipeline.spool().stats()).into_response()
}
