//! Device-facing HTTP routes.
//!
//! - `POST /topics/{topic}?qos=N`: AWS IoT Core's HTTPS publish API, so existing device
//!   code can point at Sluice unchanged. `200` with `{"message":"OK","traceId":ID,…}`.
//! - `POST /batch`: many messages in one request, one report per message.
//! - `GET /healthz`: `200 ok` while the listener runs.
//!
//! Errors are JSON `{"code": …, "message": …}` with a stable code; [`answer`] maps
//! every [`Refusal`] to its status.
//!
//! - [`answer`]: a refusal as an HTTP answer;
//! - [`commands`]: `GET /commands` (a long-poll) and `POST /commands/{id}/reply`;
//! - [`shadow`]: IoT Core's Device Shadow routes (`/things/{thing}/shadow`, the list of
//!   a thing's named shadows), passed to IoT Core.

pub mod answer;
pub mod commands;
pub mod shadow;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::ingress::admit::{Submission, admit, decode_payload};
use crate::ingress::device::Device;
use crate::ingress::state::AppState;
use crate::ingress::verdict::{Refusal, Verdict, verdict};
use crate::message::{attribute, new_id};

/// The device-facing router.
pub fn app(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/topics/{*topic}", post(publish))
        .route("/batch", post(batch))
        .route("/ws", get(crate::ingress::ws::upgrade))
        .route("/mqtt", get(crate::ingress::mqtt::upgrade))
        .route("/commands", get(commands::poll))
        .route("/commands/{id}/reply", post(commands::reply))
        .route(
            "/things/{thing}/shadow",
            get(shadow::get).post(shadow::update).delete(shadow::delete),
        )
        .route(
            "/api/things/shadow/ListNamedShadowsForThing/{thing}",
            get(shadow::list),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        // Limits are enforced by the handlers, which know which limit applies and say so.
        .layer(DefaultBodyLimit::disable())
        // One layer for both jobs of the front door: each layer costs a request a clone
        // of the service behind it and a boxed future (about 1% of a publish's CPU).
        .layer(axum::middleware::from_fn_with_state(state.clone(), front))
        .with_state(state)
}

/// The request header naming a request; echoed in the response, generated if absent.
pub const REQUEST_ID: &str = "x-request-id";

/// Runs a request in a `request` span carrying its id (the client's `x-request-id` if it
/// sent a usable one, else a new one) and the message id once known, so every log record
/// of its way (plugin logs included) can be found by either; the response says the id.
/// While the gateway leaves, the request is refused instead ([`refuse_while_leaving`]).
async fn front(
    State(state): State<AppState>,
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
    // The refusal is made in the span: making it logs (at debug) with the request's id.
    let refused = span.in_scope(|| refuse_while_leaving(&state, &request));
    let mut response = match refused {
        Some(refusal) => refusal,
        None => tracing::Instrument::instrument(next.run(request), span).await,
    };
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// Query parameters of IoT Core's HTTPS publish API. Besides `qos` they are MQTT 5
/// publish properties; Sluice keeps them as message attributes (`mqtt.*`). Any other is
/// refused, but a token under `[auth.jwt] token_key_name`.
#[derive(Debug, Default)]
struct PublishParams {
    others: std::collections::BTreeMap<String, String>,
    qos: Option<String>,
    retain: Option<String>,
    content_type: Option<String>,
    response_topic: Option<String>,
    correlation_data: Option<String>,
    message_expiry: Option<String>,
    payload_format_indicator: Option<String>,
    user_properties: Option<String>,
}

impl PublishParams {
    /// Reads a request's query string; a parameter given twice is refused. By hand, not
    /// with serde: keeping the others (`#[serde(flatten)]`) buffers every pair through
    /// serde's generic map, 1.3% of a publish's CPU.
    fn parse(query: Option<&str>) -> Result<Self, Refusal> {
        let mut params = Self::default();
        for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let field = match &*name {
                "qos" => &mut params.qos,
                "retain" => &mut params.retain,
                "contentType" => &mut params.content_type,
                "responseTopic" => &mut params.response_topic,
                "correlationData" => &mut params.correlation_data,
                "messageExpiry" => &mut params.message_expiry,
                "payloadFormatIndicator" => &mut params.payload_format_indicator,
                "userProperties" => &mut params.user_properties,
                _ => {
                    params.others.insert(name.into_owned(), value.into_owned());
                    continue;
                }
            };
            if field.replace(value.into_owned()).is_some() {
                return Err(Refusal::BadRequest(format!(
                    "query parameter `{name}` given twice"
                )));
            }
        }
        Ok(params)
    }
}

/// `POST /topics/{topic}`: a refusal also says IoT Core's error type
/// ([`answer::iot_core_refusal`]).
async fn publish(
    state: State<AppState>,
    device: Result<Device, Refusal>,
    topic: Path<String>,
    request: axum::extract::Request,
) -> Response {
    let published = match device {
        Ok(device) => publish_one(state, device, topic, request).await,
        Err(refusal) => Err(refusal),
    };
    published.unwrap_or_else(answer::iot_core_refusal)
}

async fn publish_one(
    State(state): State<AppState>,
    Device {
        identity, rules, ..
    }: Device,
    Path(topic): Path<String>,
    request: axum::extract::Request,
) -> Result<Response, Refusal> {
    // The headers taken from the request, not extracted: that would copy them.
    let (axum::http::request::Parts { headers, uri, .. }, body) = request.into_parts();
    let params = PublishParams::parse(uri.query())?;
    refuse_unknown(
        &params.others,
        &rules,
        "qos, retain, contentType, responseTopic, correlationData, messageExpiry, payloadFormatIndicator or userProperties",
    )?;
    let qos = parse_qos(params.qos.as_deref())?;
    if let Some(expiry) = &params.message_expiry
        && expiry.parse::<u32>().is_err()
    {
        return Err(Refusal::BadRequest(format!(
            "messageExpiry must be a whole number of seconds, not `{expiry}`"
        )));
    }
    let limit = state.pipeline.max_payload_bytes();
    let payload = read_body(&headers, body, limit, "payload", "the record limit").await?;
    let content_type = params
        .content_type
        .clone()
        .or_else(|| header_str(&headers, header::CONTENT_TYPE))
        .unwrap_or_default();
    let mut attributes = Vec::new();
    // The AWS SDKs send three of them as headers; the query parameter wins.
    let header = |name: &'static str| header_str(&headers, header::HeaderName::from_static(name));
    let optional = [
        (attribute::RETAIN, params.retain),
        (attribute::RESPONSE_TOPIC, params.response_topic),
        (
            attribute::CORRELATION_DATA,
            params
                .correlation_data
                .or_else(|| header("x-amz-mqtt5-correlation-data")),
        ),
        (attribute::MESSAGE_EXPIRY, params.message_expiry),
        (
            attribute::PAYLOAD_FORMAT_INDICATOR,
            params
                .payload_format_indicator
                .or_else(|| header("x-amz-mqtt5-payload-format-indicator")),
        ),
        (
            attribute::USER_PROPERTIES,
            params
                .user_properties
                .or_else(|| header("x-amz-mqtt5-user-properties")),
        ),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            attributes.push((key.to_string(), value));
        }
    }
    let publish = Submission {
        topic,
        payload: payload.to_vec(),
        content_type,
        qos,
        attributes,
    };
    let messages = admit(&rules, &identity, limit, vec![publish], false)?;
    if let Some(message) = messages.first() {
        tracing::Span::current().record("message_id", message.id.as_str());
    }
    let report = match verdict(state.pipeline.process(messages, false).await) {
        Verdict::Accepted(report) => report,
        Verdict::Refused(refusal) => return Err(refusal),
    };
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
    status: crate::pipeline::Status,
    routes: &'a [crate::pipeline::RouteReport],
    error: &'a Option<crate::pipeline::FailureReport>,
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
    Device {
        identity, rules, ..
    }: Device,
    request: axum::extract::Request,
) -> Result<Response, Refusal> {
    let (axum::http::request::Parts { headers, .. }, body) = request.into_parts();
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
        .map_err(|error| Refusal::BadRequest(format!("batch body is not valid: {error}")))?;
    if parsed.messages.len() > rules.max_batch_messages {
        return Err(Refusal::TooLarge(format!(
            "batch of {} messages exceeds the limit of {}",
            parsed.messages.len(),
            rules.max_batch_messages
        )));
    }
    let mut publishes = Vec::with_capacity(parsed.messages.len());
    for (index, item) in parsed.messages.into_iter().enumerate() {
        let (payload, default_type) = decode_payload(item.payload, item.payload_base64)
            .map_err(|why| Refusal::BadRequest(format!("messages[{index}]: {why}")))?;
        publishes.push(Submission {
            topic: item.topic,
            payload,
            content_type: item
                .content_type
                .unwrap_or_else(|| default_type.to_string()),
            qos: item.qos.unwrap_or(0),
            attributes: item.attributes.into_iter().collect(),
        });
    }
    let limit = state.pipeline.max_payload_bytes();
    let messages = admit(&rules, &identity, limit, publishes, true)?;
    let reports = state.pipeline.process(messages, false).await?;
    Ok((StatusCode::OK, Json(json!({ "results": reports }))).into_response())
}

/// While the gateway leaves ([`AppState::leaving`]), every request but `/healthz` and
/// `/readyz` is refused with `503 leaving`, `Retry-After: 1` and, on HTTP/1.x,
/// `Connection: close`: nothing of it was taken, and the client comes back through the
/// load balancer to another instance. `None` while the gateway stays, or for those two.
fn refuse_while_leaving(state: &AppState, request: &axum::extract::Request) -> Option<Response> {
    if !state.leaving.fired() || matches!(request.uri().path(), "/healthz" | "/readyz") {
        return None;
    }
    let http1 = request.version() < axum::http::Version::HTTP_2;
    let mut response = Refusal::Unavailable {
        code: "leaving",
        message: "this gateway instance is shutting down; connect again (through the load balancer, another instance answers)".to_string(),
        retry_after: 1,
    }
    .into_response();
    if http1 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Some(response)
}

/// `GET /readyz`: `200` once the gateway can take and deliver messages (plugins are
/// loaded before the listener opens; no sink is failing), else `503` with the
/// reasons; `503` from the moment the gateway starts leaving (`"leaving": true`), so
/// that a load balancer stops sending before the listeners close.
async fn readyz(State(state): State<AppState>) -> Response {
    let leaving = state.leaving.fired();
    let mut reasons = crate::readiness::not_ready_reasons(
        &state.pipeline,
        &state.rules().auth,
        state.live.registry.as_deref(),
    );
    if leaving {
        reasons.insert(
            0,
            "leaving: the gateway is shutting down (SIGTERM or sluice admin drain)".to_string(),
        );
    }
    if reasons.is_empty() {
        Json(json!({"ready": true})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "leaving": leaving, "reasons": reasons})),
        )
            .into_response()
    }
}

fn parse_qos(qos: Option<&str>) -> Result<u8, Refusal> {
    match qos {
        None | Some("0") => Ok(0),
        Some("1") => Ok(1),
        Some(other) => Err(Refusal::BadRequest(format!(
            "qos must be 0 or 1 (IoT Core's limits), not `{other}`"
        ))),
    }
}

/// Refuses a query parameter of `others` that is not the token (`[auth.jwt]
/// token_key_name`): `expected` names the ones the route takes.
fn refuse_unknown(
    others: &std::collections::BTreeMap<String, String>,
    rules: &crate::ingress::admit::DeviceRules,
    expected: &str,
) -> Result<(), Refusal> {
    let token = rules.auth.token_key_name();
    match others.keys().find(|key| Some(key.as_str()) != token) {
        Some(unknown) => Err(Refusal::BadRequest(format!(
            "unknown query parameter `{unknown}`: expected {expected}"
        ))),
        None => Ok(()),
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
) -> Result<Bytes, Refusal> {
    let too_large = |size: Option<u64>| {
        let size = size.map(|n| format!(" of {n} bytes")).unwrap_or_default();
        Refusal::TooLarge(format!(
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
            Refusal::BadRequest(format!("cannot read the request body: {error}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    use super::*;

    /// Sends one request to the device app; the status, the body as JSON and the headers.
    async fn send(
        config: &str,
        request: Request<Body>,
    ) -> (StatusCode, serde_json::Value, axum::http::HeaderMap) {
        let fixture = crate::testing::gateway(config);
        let response = app(fixture.state.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, body, headers)
    }

    fn post(path: &str, body: &'static str) -> Request<Body> {
        Request::post(path)
            .header("x-device-id", "d1")
            .body(Body::from(body))
            .unwrap()
    }

    const POLICY: &str = r#"
        [routing]
        default_destination = "local"
        [[policy.grants]]
        name = "own"
        devices = ["*"]
        publish = ["devices/${device.id}/#"]
        max_messages_per_sec = 1
        max_payload_bytes = 100
    "#;

    /// Every refusal of the publish route: its status, code, IoT Core error type, and the
    /// headers it promises. (`503 spool_full` needs a cloud sink, which this in-process
    /// gateway has not: its messages go straight to the local sink; `answer`'s own test
    /// maps the code, and `tests/e2e/durability.rs` meets it with a real Kinesis down.)
    #[tokio::test]
    async fn refusals_map_to_their_status_code_and_iot_core_error_type() {
        let cases: [(&str, Request<Body>, StatusCode, &str, &str); 5] = [
            (
                "",
                post("/topics/a/+", "x"),
                StatusCode::BAD_REQUEST,
                "bad_request",
                "InvalidRequestException",
            ),
            (
                "",
                post("/topics/a?qos=2", "x"),
                StatusCode::BAD_REQUEST,
                "bad_request",
                "InvalidRequestException",
            ),
            (
                POLICY,
                post("/topics/elsewhere", "x"),
                StatusCode::FORBIDDEN,
                "topic_denied",
                "ForbiddenException",
            ),
            (
                POLICY,
                post(
                    "/topics/devices/d1/t",
                    Box::leak("x".repeat(101).into_boxed_str()),
                ),
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "RequestEntityTooLargeException",
            ),
            (
                "[auth.tokens]\nkeys = [{ id = \"k\", secret = \"0123456789abcdef0123456789abcdef\" }]",
                post("/topics/t", "x"),
                StatusCode::UNAUTHORIZED,
                "missing_credentials",
                "UnauthorizedException",
            ),
        ];
        for (config, request, status, code, error_type) in cases {
            let (got, body, headers) = send(config, request).await;
            assert_eq!(got, status, "{code}: {body}");
            assert_eq!(body["code"], code, "{body}");
            assert!(
                body["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{body}"
            );
            assert_eq!(headers["x-amzn-errortype"], error_type, "{code}");
            if status == StatusCode::SERVICE_UNAVAILABLE {
                assert!(headers.contains_key("retry-after"), "{code}");
            }
            if status == StatusCode::UNAUTHORIZED {
                assert!(headers.contains_key("www-authenticate"), "{code}");
            }
        }
    }

    /// While the gateway leaves, a request is refused with `503 leaving`, its id in the
    /// answer, and the refusal's log record inside the request's span (it carries the id).
    #[tokio::test]
    async fn a_request_while_leaving_is_refused_in_its_span() {
        let log = crate::testing::LogBuffer::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let fixture = crate::testing::gateway(POLICY);
        fixture.leave.fire();
        let request = Request::post("/topics/devices/d1/t")
            .header("x-device-id", "d1")
            .header(REQUEST_ID, "req-leaving-1")
            .body(Body::from("{}"))
            .unwrap();
        let response = app(fixture.state.clone()).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[REQUEST_ID], "req-leaving-1");
        let log = log.text();
        let refused = log
            .lines()
            .find(|line| line.contains("request refused"))
            .unwrap_or_else(|| panic!("no refusal record: {log}"));
        assert!(refused.contains("req-leaving-1"), "{refused}");
    }

    /// The publish route's query string: each known parameter once, percent-decoded; an
    /// unknown one or one given twice refused, saying which.
    #[tokio::test]
    async fn publish_parameters_are_read_once_each_and_unknown_ones_refused() {
        let params = PublishParams::parse(Some(
            "qos=1&retain=true&contentType=text%2Fplain&responseTopic=r%2F1&correlationData=c+d\
             &messageExpiry=9&payloadFormatIndicator=1&userProperties=%7B%7D&token=t",
        ))
        .unwrap();
        assert_eq!(params.qos.as_deref(), Some("1"));
        assert_eq!(params.retain.as_deref(), Some("true"));
        assert_eq!(params.content_type.as_deref(), Some("text/plain"));
        assert_eq!(params.response_topic.as_deref(), Some("r/1"));
        assert_eq!(params.correlation_data.as_deref(), Some("c d"));
        assert_eq!(params.message_expiry.as_deref(), Some("9"));
        assert_eq!(params.payload_format_indicator.as_deref(), Some("1"));
        assert_eq!(params.user_properties.as_deref(), Some("{}"));
        assert_eq!(params.others.len(), 1);
        assert_eq!(params.others["token"], "t");
        assert!(PublishParams::parse(None).unwrap().qos.is_none());
        for (query, said) in [
            ("qos=1&qos=0", "query parameter `qos` given twice"),
            (
                "qos=1&colour=red",
                "unknown query parameter `colour`: expected qos, retain,",
            ),
        ] {
            let path = format!("/topics/devices/d1/t?{query}");
            let (status, body, _) = send(POLICY, post(&path, "{}")).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
            assert_eq!(body["code"], "bad_request", "{body}");
            assert!(
                body["message"].as_str().unwrap().starts_with(said),
                "{query}: {body}"
            );
        }
    }

    #[tokio::test]
    async fn a_rate_limited_device_is_told_when_to_retry_and_accepted_messages_say_ok() {
        let fixture = crate::testing::gateway(POLICY);
        let app = app(fixture.state.clone());
        let ok = app
            .clone()
            .oneshot(post("/topics/devices/d1/t", "{}"))
            .await
            .unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(ok.into_body(), 1 << 20).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["message"], "OK");
        assert_eq!(body["status"], "accepted");
        let limited = app
            .oneshot(post("/topics/devices/d1/t", "{}"))
            .await
            .unwrap();
        assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(limited.headers()["x-amzn-errortype"], "ThrottlingException");
        assert_eq!(limited.headers()["retry-after"], "1");
    }

    /// Batches refuse whole with the index of the message at fault; no IoT Core error
    /// type there (not IoT Core's API).
    #[tokio::test]
    async fn a_malformed_batch_is_refused_whole() {
        let body = r#"{"messages": [{"topic": "a", "payload": 1}, {"topic": "", "payload": 2}]}"#;
        let (status, body, headers) = send("", post("/batch", body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["message"].as_str().unwrap().starts_with("messages[1]"),
            "{body}"
        );
        assert!(!headers.contains_key("x-amzn-errortype"));
        let (status, _, _) = send("", post("/batch", "not json")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
}
