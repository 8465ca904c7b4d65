//! The admin API's errors: JSON `{"code", "message"}` with their status, like the
//! device API's.

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Every error the admin API answers with: JSON `{"code", "message"}` and the status.
#[derive(Debug)]
pub enum AdminApiError {
    /// `400 bad_request`: a malformed query or body.
    BadRequest(String),
    /// `401 unauthorized`: no admin token, or the wrong one.
    Unauthorized,
    /// `404 not_found`: no such dead letter, plugin or version.
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
    /// `502 registry_unavailable`: the IoT control plane did not give the registry.
    Registry(String),
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
            AdminApiError::Registry(_) => (StatusCode::BAD_GATEWAY, "registry_unavailable"),
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
            | AdminApiError::Internal(message)
            | AdminApiError::Registry(message) => message,
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
