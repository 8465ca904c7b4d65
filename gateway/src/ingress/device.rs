//! The device behind an HTTP request: the [`Device`] extractor gathers the request's
//! [`Credential`] (the connection's client certificate, `Authorization: Bearer`,
//! `x-device-id`) and has it authenticated, so that a handler that needs a device takes
//! a `Device` argument and never authenticates by itself (axum's own `jwt` example does
//! the same with its claims).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Uri, header};

use crate::auth::{AuthError, Credential, Identity, PeerIdentity};
use crate::ingress::admit::DeviceRules;
use crate::ingress::sessions::RemoteAddr;
use crate::ingress::state::AppState;
use crate::ingress::verdict::Refusal;

/// The header naming the device when device authentication is not configured.
pub const DEVICE_HEADER: &str = "x-device-id";

/// An authenticated device, and the rules its request is held to (one snapshot for the
/// whole request: a reload meanwhile applies to the next one).
pub struct Device {
    /// Who it is.
    pub identity: Identity,
    /// The device rules when the request came.
    pub rules: Arc<DeviceRules>,
    /// The address its connection comes from.
    pub remote: Option<std::net::SocketAddr>,
}

impl FromRequestParts<AppState> for Device {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Device, Refusal> {
        let rules = state.rules();
        let peer = parts.extensions.get::<PeerIdentity>().cloned();
        let credential = credential(peer, &parts.headers, &parts.uri, &rules)?;
        let identity = authenticate(&rules, credential)?;
        Ok(Device {
            identity,
            rules,
            remote: parts
                .extensions
                .get::<RemoteAddr>()
                .map(|RemoteAddr(address)| *address),
        })
    }
}

/// What an HTTP request presents: the connection's certificate (`peer`), a bearer token
/// (`Authorization: Bearer`; with `[auth.jwt]` also the header or the URL's query
/// parameter its `token_key_name` names), and the id it claims in `x-device-id`.
pub fn credential(
    peer: Option<PeerIdentity>,
    headers: &HeaderMap,
    uri: &Uri,
    rules: &DeviceRules,
) -> Result<Credential, Refusal> {
    let named = |name: &str| {
        let header = headers.get(name).and_then(|value| value.to_str().ok());
        header
            .map(str::to_string)
            .or_else(|| query_value(uri.query()?, name))
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::to_string)
        .or_else(|| rules.auth.token_key_name().and_then(named));
    let claimed_id = match headers.get(DEVICE_HEADER) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| {
                    Refusal::BadRequest(format!("{DEVICE_HEADER} must be printable ASCII"))
                })?
                .to_string(),
        ),
    };
    Ok(Credential {
        certificate: peer.unwrap_or_default(),
        token,
        claimed_id,
    })
}

/// The value of the parameter `name` in the query string `query`, decoded.
pub fn query_value(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
        .filter(|value| !value.is_empty())
}

/// Who presented `credential`, or the refusal a device gets over HTTP.
fn authenticate(rules: &DeviceRules, credential: Credential) -> Result<Identity, Refusal> {
    rules
        .auth
        .authenticate(credential)
        .map_err(|error| match error {
            // Without [auth], a bad x-device-id is a malformed request, not a credential.
            AuthError::BadDeviceId(why) if !rules.auth.required() => {
                Refusal::BadRequest(format!("{DEVICE_HEADER}: {why}"))
            }
            other => Refusal::Unauthorized(other),
        })
}
