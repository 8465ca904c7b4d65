//! A refusal as an HTTP answer: the status, `{"code", "message"}` (plus `rule` for policy
//! refusals and `plugin`, `id` for plugin failures), `Retry-After` or `WWW-Authenticate`
//! where they apply, and IoT Core's error type for `POST /topics/{topic}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::ingress::verdict::Refusal;
use crate::plugin::FailureKind;

/// How a refusal reads over HTTP.
#[derive(Debug, PartialEq)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// What IoT Core's HTTPS API would call it (`x-amzn-ErrorType`), so that the AWS SDKs
    /// (boto3's `iot-data`, say) report the error they would get from IoT Core.
    pub error_type: &'static str,
    /// Fields of the body besides `code` and `message`.
    pub extra: serde_json::Value,
}

/// The one mapping from a refusal to HTTP.
pub fn answer(refusal: &Refusal) -> Answer {
    let (status, error_type, extra) = match refusal {
        Refusal::BadRequest(_) | Refusal::BadTopic(_) => (
            StatusCode::BAD_REQUEST,
            "InvalidRequestException",
            json!({}),
        ),
        Refusal::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "UnauthorizedException", json!({})),
        Refusal::Forbidden { .. } => (
            StatusCode::FORBIDDEN,
            "ForbiddenException",
            json!({"rule": "policy:default-deny"}),
        ),
        Refusal::Reserved { .. } => (
            StatusCode::FORBIDDEN,
            "ForbiddenException",
            json!({"rule": "policy:reserved-topic"}),
        ),
        Refusal::RateLimited { grant, .. } => (
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlingException",
            json!({"rule": format!("policy:{grant}")}),
        ),
        Refusal::TooLarge(_) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLargeException",
            json!({}),
        ),
        Refusal::Plugin {
            id, kind, plugin, ..
        } => {
            let (status, error_type) = match kind {
                FailureKind::Refused => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "InvalidRequestException")
                }
                FailureKind::Unavailable => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailableException",
                ),
                FailureKind::Trap
                | FailureKind::Timeout
                | FailureKind::MemoryLimit
                | FailureKind::BadOutput => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalFailureException",
                ),
            };
            (status, error_type, json!({"plugin": plugin, "id": id}))
        }
        Refusal::Unavailable { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailableException",
            json!({}),
        ),
    };
    Answer {
        status,
        error_type,
        extra,
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        crate::metrics::METRICS.refusal(self.code());
        let Answer { status, extra, .. } = answer(&self);
        if let Refusal::Unavailable { code, .. } = &self {
            tracing::debug!(code, error = %self.message(), "request refused");
        }
        let mut body = extra;
        body["code"] = self.code().into();
        body["message"] = self.message().into();
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sluice\""),
            );
        }
        if let Some(secs) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// A refusal of IoT Core's publish API: the response also says IoT Core's error type in
/// `x-amzn-ErrorType`; the body stays Sluice's own.
pub fn iot_core_refusal(refusal: Refusal) -> Response {
    let error_type = answer(&refusal).error_type;
    let mut response = refusal.into_response();
    response
        .headers_mut()
        .insert("x-amzn-errortype", HeaderValue::from_static(error_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingress::verdict::tests::every_refusal;

    /// Every refusal kind: its status and IoT Core error type.
    #[test]
    fn each_refusal_has_its_status_and_error_type() {
        let expected = [
            ("bad_request", 400, "InvalidRequestException"),
            ("bad_request", 400, "InvalidRequestException"),
            ("missing_credentials", 401, "UnauthorizedException"),
            ("topic_denied", 403, "ForbiddenException"),
            ("topic_reserved", 403, "ForbiddenException"),
            ("rate_limited", 429, "ThrottlingException"),
            ("payload_too_large", 413, "RequestEntityTooLargeException"),
            ("plugin_refused", 422, "InvalidRequestException"),
            ("plugin_trap", 500, "InternalFailureException"),
            ("plugin_timeout", 500, "InternalFailureException"),
            ("plugin_memory_limit", 500, "InternalFailureException"),
            ("plugin_bad_output", 500, "InternalFailureException"),
            ("plugin_unavailable", 503, "ServiceUnavailableException"),
            ("spool_full", 503, "ServiceUnavailableException"),
            ("dead_letters_full", 503, "ServiceUnavailableException"),
            ("best_effort_busy", 503, "ServiceUnavailableException"),
            ("spool_unavailable", 503, "ServiceUnavailableException"),
        ];
        let refusals = every_refusal();
        assert_eq!(refusals.len(), expected.len());
        for (refusal, (code, status, error_type)) in refusals.iter().zip(expected) {
            let got = answer(refusal);
            assert_eq!(refusal.code(), code);
            assert_eq!(
                (got.status.as_u16(), got.error_type),
                (status, error_type),
                "{code}"
            );
        }
    }

    /// The README's table of HTTP refusals says what [`answer`] does: every code it
    /// lists under a status gets that status, and every code has a row.
    #[test]
    fn the_readme_table_matches() {
        let table = crate::testing::readme_table("| status | code | when |");
        let mut listed = std::collections::HashMap::new();
        for row in &table {
            let status: u16 = row[0].parse().unwrap();
            for code in row[1].split(',') {
                let code = code.trim().trim_matches('`');
                if !code.is_empty() {
                    listed.insert(code.to_string(), status);
                }
            }
        }
        for refusal in every_refusal() {
            let code = refusal.code();
            assert_eq!(
                listed.get(code).copied(),
                Some(answer(&refusal).status.as_u16()),
                "README's HTTP table, code `{code}`"
            );
        }
    }
}
