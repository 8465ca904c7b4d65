//! IoT Core's HTTPS Device Shadow routes, at IoT Core's paths, so that boto3's
//! `iot-data` client and the other SDKs' shadow calls work against Sluice unchanged:
//!
//! - `GET|POST|DELETE /things/{thing}/shadow?name={shadow}`: get, update, delete the
//!   thing's classic shadow (no `name`) or a named one;
//! - `GET /api/things/shadow/ListNamedShadowsForThing/{thing}?nextToken=&pageSize=`.
//!
//! Each call is held to Sluice's policy as the MQTT request it stands for: get, update
//! and delete as a publish on `$aws/things/{thing}/shadow[/name/{shadow}]/{get|update|delete}`
//! (the grant's rates apply), the list as publishing on every
//! `$aws/things/{thing}/shadow/name/+/get`. Then [`crate::shadow`] makes the call at
//! IoT Core and its answer comes back as IoT Core sent it (status, body,
//! `x-amzn-ErrorType`). Sluice's own refusals carry IoT Core's error type too.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::ingress::admit::admit_reply;
use crate::ingress::device::Device;
use crate::ingress::http::answer::iot_core_refusal;
use crate::ingress::http::read_body;
use crate::ingress::state::AppState;
use crate::ingress::verdict::Refusal;
use crate::shadow::{Answer, Call, ShadowId};

/// `?name=`: a named shadow.
#[derive(Debug, Default, Deserialize)]
pub struct Named {
    name: Option<String>,
}

/// `ListNamedShadowsForThing`'s query.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    next_token: Option<String>,
    page_size: Option<i32>,
}

/// `GET /things/{thing}/shadow`.
pub async fn get(
    State(state): State<AppState>,
    device: Result<Device, Refusal>,
    Path(thing): Path<String>,
    named: Result<Query<Named>, QueryRejection>,
) -> Response {
    answer(shadow_call(&state, device, &thing, named, Verb::Get).await)
}

/// `POST /things/{thing}/shadow`: the body is the update document.
pub async fn update(
    State(state): State<AppState>,
    device: Result<Device, Refusal>,
    Path(thing): Path<String>,
    named: Result<Query<Named>, QueryRejection>,
    request: axum::extract::Request,
) -> Response {
    answer(
        shadow_call(
            &state,
            device,
            &thing,
            named,
            Verb::Update(Box::new(request)),
        )
        .await,
    )
}

/// `DELETE /things/{thing}/shadow`.
pub async fn delete(
    State(state): State<AppState>,
    device: Result<Device, Refusal>,
    Path(thing): Path<String>,
    named: Result<Query<Named>, QueryRejection>,
) -> Response {
    answer(shadow_call(&state, device, &thing, named, Verb::Delete).await)
}

/// What a shadow request asks.
enum Verb {
    Get,
    /// The request's body is the update document.
    Update(Box<axum::extract::Request>),
    Delete,
}

/// The call a request asks for on the shadow it names, once the device is known and the
/// policy let it make the call as an MQTT request.
async fn shadow_call(
    state: &AppState,
    device: Result<Device, Refusal>,
    thing: &str,
    named: Result<Query<Named>, QueryRejection>,
    verb: Verb,
) -> Result<Answer, Refusal> {
    let device = device?;
    let Query(named) = named.map_err(|rejection| Refusal::BadRequest(rejection.body_text()))?;
    let shadow = ShadowId::new(thing, named.name.as_deref()).map_err(Refusal::BadRequest)?;
    let call = match verb {
        Verb::Get => Call::Get,
        Verb::Delete => Call::Delete,
        Verb::Update(request) => {
            let (parts, body) = (*request).into_parts();
            // At most IoT Core's message size: IoT Core holds it to its own, smaller,
            // shadow document limit and says so.
            let limit = crate::quota::IOT_CORE_MAX_PAYLOAD_BYTES;
            let document = read_body(
                &parts.headers,
                body,
                limit,
                "shadow document",
                "IoT Core's 128 KB",
            );
            Call::Update(document.await?.to_vec())
        }
    };
    let size = match &call {
        Call::Update(document) => document.len(),
        Call::Get | Call::Delete => 0,
    };
    let topic = shadow.topic(call.verb());
    admit_reply(&device.rules, &device.identity, &topic, size)?;
    let shadows = configured(state)?;
    shadows.call(&shadow, call).await.map_err(unreachable)
}

/// `GET /api/things/shadow/ListNamedShadowsForThing/{thing}`.
pub async fn list(
    State(state): State<AppState>,
    device: Result<Device, Refusal>,
    Path(thing): Path<String>,
    page: Result<Query<Page>, QueryRejection>,
) -> Response {
    let listed = async {
        let device = device?;
        let Query(page) = page.map_err(|rejection| Refusal::BadRequest(rejection.body_text()))?;
        let shadow = ShadowId::new(&thing, None).map_err(Refusal::BadRequest)?;
        let every_named = format!("$aws/things/{}/shadow/name/+/get", shadow.thing);
        if !device
            .rules
            .policy
            .may_publish_all(&device.identity, &every_named)
        {
            return Err(Refusal::Forbidden {
                topic: every_named,
                device: device.identity.device_id.clone(),
            });
        }
        let shadows = configured(&state)?;
        let listed = shadows.list(&shadow.thing, page.next_token, page.page_size);
        listed.await.map_err(unreachable)
    };
    answer(listed.await)
}

/// The data plane, or why there is none.
fn configured(state: &AppState) -> Result<&crate::shadow::Shadows, Refusal> {
    state.shadows.as_deref().ok_or_else(|| Refusal::Unavailable {
        code: "shadows_not_configured",
        message: "Device Shadow calls are answered by AWS IoT Core, and this gateway has no [sinks.iot_core]".to_string(),
        retry_after: 60,
    })
}

fn unreachable(error: crate::shadow::Unreachable) -> Refusal {
    Refusal::Unavailable {
        code: "iot_core_unavailable",
        message: error.to_string(),
        retry_after: 1,
    }
}

/// IoT Core's answer as it sent it, or Sluice's refusal with IoT Core's error type.
fn answer(outcome: Result<Answer, Refusal>) -> Response {
    let json = HeaderValue::from_static("application/json");
    match outcome {
        Ok(Answer::Ok(body)) => {
            (StatusCode::OK, [(header::CONTENT_TYPE, json)], body).into_response()
        }
        Ok(Answer::Refused {
            status,
            error_type,
            body,
        }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut response = (status, [(header::CONTENT_TYPE, json)], body).into_response();
            if let Ok(value) = HeaderValue::from_str(&error_type) {
                response.headers_mut().insert("x-amzn-errortype", value);
            }
            response
        }
        Err(refusal) => iot_core_refusal(refusal),
    }
}
