//! Device identity: who sent a request.
//!
//! - [`mtls`]: client certificates checked during the TLS handshake (trusted CAs from the
//!   config, expiry, revocation by serial number or fingerprint); the device id comes from
//!   the certificate's subject CN or a SAN, its groups from the subject's OUs.
//! - [`registry`]: certificates registered at AWS IoT, from a snapshot of the account's
//!   registry; the device id is the certificate's thing.
//! - [`token`]: short-lived HS256 JWTs (`Authorization: Bearer …`) carrying the device id
//!   (`sub`) and optional `groups`, signed with keys from the config and chosen by key id,
//!   so that several keys are valid at once while they rotate.
//! - [`jwt`]: JWTs from the operator's identity provider (RS256, ES256, EdDSA), verified
//!   with the keys of its JWKS; the device id, groups and claims from configured claims.
//! - [`verified`]: tokens verified lately, so that a token is checked once, not per
//!   request.
//!
//! Every protocol gathers what a device presents into one [`Credential`] (HTTP in an
//! extractor, MQTT from its CONNECT) and [`Authenticator::authenticate`] decides who it
//! is; nothing here knows a protocol. Without `[auth]` (the embedded default, meant for
//! loopback) the device names itself (the `x-device-id` header, the MQTT client id).
//! With it, a device without a valid certificate or token is refused with a reason code
//! ([`AuthError::code`]) and nothing about the secret.

pub mod jwt;
pub mod mtls;
pub mod registry;
pub mod token;
pub mod verified;

use crate::config::AuthConfig;

/// The device id of a device that names none (no `x-device-id` header).
pub const ANONYMOUS_DEVICE: &str = "anonymous";
/// Longest device id accepted (IoT Core's client id limit).
pub const MAX_DEVICE_ID_LEN: usize = 128;

/// How a device proved its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// A client certificate.
    Certificate,
    /// A bearer token.
    Token,
    /// The device named itself (no `[auth]`): the `x-device-id` header, the MQTT client
    /// id.
    Claimed,
}

/// An authenticated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The device id.
    pub device_id: String,
    /// Groups, for policy grants.
    pub groups: Vec<String>,
    /// How it was established.
    pub method: Method,
    /// When the credential stops being valid (seconds since the Unix epoch): a token's
    /// `exp`, a certificate's end of validity. A session ends then.
    pub expires_at_secs: Option<u64>,
    /// The client certificate, so that a session can be ended when a reload revokes it.
    pub certificate: Option<CertificateKey>,
    /// A token's claims with a string or number value, by name, for `${claims.NAME}`
    /// in policy grants (none for certificates and the gateway's own tokens).
    pub claims: Vec<(String, String)>,
}

impl Identity {
    /// The value of the claim `name`, when the credential carried it.
    pub fn claim(&self, name: &str) -> Option<&str> {
        self.claims
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// What names a client certificate in the revocation lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateKey {
    /// The serial number, leading zero bytes removed.
    pub serial: Vec<u8>,
    /// The SHA-256 fingerprint of the DER encoding (IoT Core's certificate id).
    pub fingerprint: Vec<u8>,
    /// Admitted as a certificate registered at AWS IoT (`[auth.registry]`): its sessions
    /// end when the registry no longer says it is ACTIVE.
    pub registered: bool,
}

/// Why a device was not let in: each is a `401` with its code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Neither a client certificate nor a bearer token.
    #[error("send a client certificate or `Authorization: Bearer <token>`")]
    MissingCredentials,
    /// Not a JWT, or not one of ours (bad header, claims, algorithm).
    #[error("the token is malformed")]
    TokenMalformed,
    /// Signed with a key id the gateway does not have.
    #[error("the token's key is not known")]
    TokenUnknownKey,
    /// The signature does not match (tampered, or the wrong secret).
    #[error("the token's signature is not valid")]
    TokenBadSignature,
    /// Past its `exp`.
    #[error("the token has expired")]
    TokenExpired,
    /// Before its `nbf`.
    #[error("the token is not valid yet")]
    TokenNotYetValid,
    /// Another issuer.
    #[error("the token was issued by someone else")]
    TokenWrongIssuer,
    /// For another audience (`[auth.jwt] audience`).
    #[error("the token is meant for another audience")]
    TokenWrongAudience,
    /// Without a claim the gateway needs (`exp`, `iss`, `aud`, the device id's).
    #[error("the token has no `{0}` claim")]
    TokenMissingClaim(String),
    /// Signed with an algorithm the gateway does not accept.
    #[error("the token's algorithm {0} is not accepted")]
    TokenAlgorithm(String),
    /// The identity provider's keys could not be read yet (`[auth.jwt]`).
    #[error("the identity provider's keys are not available yet; try again")]
    TokenKeysUnavailable,
    /// The credential names a device id the gateway cannot use.
    #[error("the device id is not usable: {0}")]
    BadDeviceId(String),
    /// The client certificate carries no device id where the config says to look.
    #[error("the client certificate carries no device id in its {0}")]
    CertificateWithoutId(&'static str),
    /// The client certificate was revoked (by a configuration reload, for a session
    /// opened before; new connections fail in the TLS handshake).
    #[error("the client certificate was revoked")]
    CertificateRevoked,
    /// A certificate registered at AWS IoT, attached to no thing or to several: its
    /// thing is the device, so exactly one is needed.
    #[error(
        "the registered client certificate is attached to {0} things; exactly one names the device"
    )]
    CertificateNotOneThing(usize),
    /// The client certificate's validity ended during a session.
    #[error("the client certificate has expired")]
    CertificateExpired,
}

impl AuthError {
    /// The stable code in the `401` body.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::MissingCredentials => "missing_credentials",
            AuthError::TokenMalformed => "token_malformed",
            AuthError::TokenUnknownKey => "token_unknown_key",
            AuthError::TokenBadSignature => "token_invalid_signature",
            AuthError::TokenExpired => "token_expired",
            AuthError::TokenNotYetValid => "token_not_yet_valid",
            AuthError::TokenWrongIssuer => "token_wrong_issuer",
            AuthError::TokenWrongAudience => "token_wrong_audience",
            AuthError::TokenMissingClaim(_) => "token_missing_claim",
            AuthError::TokenAlgorithm(_) => "token_algorithm_not_accepted",
            AuthError::TokenKeysUnavailable => "token_keys_unavailable",
            AuthError::BadDeviceId(_) => "bad_device_id",
            AuthError::CertificateWithoutId(_) => "certificate_without_device_id",
            AuthError::CertificateRevoked => "certificate_revoked",
            AuthError::CertificateNotOneThing(_) => "certificate_not_one_thing",
            AuthError::CertificateExpired => "certificate_expired",
        }
    }
}

/// What a connection's TLS handshake established: `None` without a client certificate.
#[derive(Debug, Clone, Default)]
pub struct PeerIdentity(pub Option<Result<Identity, AuthError>>);

/// What a device presents to prove who it is, whatever its protocol: gathered by the
/// protocol, judged by [`Authenticator::authenticate`].
#[derive(Debug, Clone, Default)]
pub struct Credential {
    /// The connection's client certificate, verified in the TLS handshake.
    pub certificate: PeerIdentity,
    /// A bearer token (`Authorization: Bearer`, the MQTT password, or where
    /// [`Authenticator::token_key_name`] says).
    pub token: Option<String>,
    /// The device id the device claims for itself (`x-device-id`, the MQTT client id):
    /// who it is when `[auth]` is off, ignored when it is on. `None`: it names none.
    pub claimed_id: Option<String>,
}

/// Authenticates requests the way the config says.
pub struct Authenticator {
    /// The gateway's own tokens (`[auth.tokens]`).
    tokens: Option<token::TokenKeys>,
    /// The identity provider's tokens (`[auth.jwt]`).
    provider: Option<jwt::ProviderTokens>,
    /// The name a token travels under besides `Authorization: Bearer` and the MQTT
    /// password (`[auth.jwt] token_key_name`).
    token_key_name: Option<String>,
    required: bool,
    /// Where a client certificate names the device (`[auth.mtls] device_id`).
    mtls_device_id: Option<crate::config::DeviceIdSource>,
    /// The revoked certificates, for sessions opened before a reload revoked theirs.
    revoked: Option<mtls::RevocationList>,
}

impl Authenticator {
    /// From the `[auth]` section (absent: the `x-device-id` header).
    pub fn new(auth: Option<&AuthConfig>) -> Authenticator {
        Authenticator {
            tokens: auth
                .and_then(|a| a.tokens.as_ref())
                .map(token::TokenKeys::new),
            provider: auth
                .and_then(|a| a.jwt.as_ref())
                .map(jwt::ProviderTokens::new),
            token_key_name: auth
                .and_then(|a| a.jwt.as_ref())
                .map(|jwt| jwt.token_key_name.clone()),
            required: auth.is_some(),
            mtls_device_id: auth.and_then(|a| a.mtls.as_ref()).map(|m| m.device_id),
            revoked: auth
                .and_then(|a| a.mtls.as_ref())
                .map(mtls::RevocationList::new),
        }
    }

    /// Whether a session of `identity` may go on at `now_secs` (seconds since the Unix
    /// epoch): its credential has not expired, and its certificate is not revoked.
    pub fn still_valid(&self, identity: &Identity, now_secs: u64) -> Result<(), AuthError> {
        if let Some(expires) = identity.expires_at_secs
            && now_secs > expires
        {
            return Err(match identity.method {
                Method::Certificate => AuthError::CertificateExpired,
                _ => AuthError::TokenExpired,
            });
        }
        if let (Some(key), Some(revoked)) = (&identity.certificate, &self.revoked)
            && revoked.contains(key)
        {
            return Err(AuthError::CertificateRevoked);
        }
        Ok(())
    }

    /// Where a client certificate names the device, when `[auth.mtls]` is configured.
    pub fn mtls_device_id(&self) -> Option<crate::config::DeviceIdSource> {
        self.mtls_device_id
    }

    /// The name a token travels under as an HTTP header, a URL query parameter and a
    /// query parameter of the MQTT user name, when `[auth.jwt]` is configured.
    pub fn token_key_name(&self) -> Option<&str> {
        self.token_key_name.as_deref()
    }

    /// Why devices cannot authenticate now (the identity provider's keys were never
    /// read).
    pub fn not_ready(&self) -> Option<String> {
        self.provider
            .as_ref()
            .and_then(jwt::ProviderTokens::not_ready)
    }

    /// Whether devices must authenticate (`[auth]` is configured).
    pub fn required(&self) -> bool {
        self.required
    }

    /// Who presented `credential`: its certificate, else its token, else (only without
    /// `[auth]`) the id it claims.
    pub fn authenticate(&self, credential: Credential) -> Result<Identity, AuthError> {
        if !self.required {
            return claimed_identity(credential.claimed_id);
        }
        if let PeerIdentity(Some(result)) = credential.certificate {
            return result;
        }
        let Some(token) = credential.token else {
            return Err(AuthError::MissingCredentials);
        };
        let token = token.trim();
        // The provider's kind of token (its algorithms), else the gateway's own.
        if let Some(verdict) = self.provider.as_ref().and_then(|p| p.verify(token)) {
            return verdict;
        }
        match (&self.tokens, &self.provider) {
            (Some(keys), _) => keys.verify(token),
            (None, Some(_)) => Err(jsonwebtoken::decode_header(token)
                .map_or(AuthError::TokenMalformed, |header| {
                    AuthError::TokenAlgorithm(format!("{:?}", header.alg))
                })),
            // A token where only certificates are accepted: as if none was sent.
            (None, None) => Err(AuthError::MissingCredentials),
        }
    }
}

/// The device id rules shared by every method: 1 to 128 characters, none of MQTT's
/// `/`, `+`, `#` (the id goes into topic filters) and no control characters.
pub fn check_device_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_DEVICE_ID_LEN {
        return Err(format!("must be 1 to {MAX_DEVICE_ID_LEN} characters"));
    }
    if id.contains(['/', '+', '#']) || id.chars().any(char::is_control) {
        return Err("must not contain `/`, `+`, `#` or control characters".to_string());
    }
    Ok(())
}

/// The identity of a device that names itself (no `[auth]`).
fn claimed_identity(claimed: Option<String>) -> Result<Identity, AuthError> {
    let id = claimed.unwrap_or_else(|| ANONYMOUS_DEVICE.to_string());
    check_device_id(&id).map_err(|why| AuthError::BadDeviceId(format!("the device id {why}")))?;
    Ok(Identity {
        device_id: id,
        groups: Vec::new(),
        method: Method::Claimed,
        expires_at_secs: None,
        certificate: None,
        claims: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session's credential is checked again while it lasts: past its expiry, or once
    /// a reload lists its certificate as revoked, it is no longer valid.
    #[test]
    fn a_session_ends_with_its_credential() {
        let key = CertificateKey {
            serial: vec![0x10, 0x66],
            fingerprint: vec![7; 32],
            registered: false,
        };
        let identity = Identity {
            device_id: "d".to_string(),
            groups: Vec::new(),
            method: Method::Certificate,
            expires_at_secs: Some(1_000),
            certificate: Some(key),
            claims: Vec::new(),
        };
        let config = |revoked: &str| -> AuthConfig {
            toml::from_str(&format!(
                "[mtls]\nca = [\"ca.pem\"]\nrevoked_serials = [{revoked}]\n"
            ))
            .unwrap()
        };
        let before = Authenticator::new(Some(&config("")));
        assert_eq!(before.still_valid(&identity, 999), Ok(()));
        assert_eq!(
            before.still_valid(&identity, 1_001),
            Err(AuthError::CertificateExpired)
        );
        let after = Authenticator::new(Some(&config("\"10:66\"")));
        assert_eq!(
            after.still_valid(&identity, 999),
            Err(AuthError::CertificateRevoked)
        );
        let token = Identity {
            method: Method::Token,
            certificate: None,
            claims: Vec::new(),
            ..identity
        };
        assert_eq!(
            after.still_valid(&token, 1_001),
            Err(AuthError::TokenExpired)
        );
    }

    #[test]
    fn device_ids_that_would_break_topic_filters_are_refused() {
        assert!(check_device_id("sensor-17").is_ok());
        for bad in ["", "a/b", "a+b", "a#", "a\nb"] {
            assert!(check_device_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_device_id(&"x".repeat(129)).is_err());
    }
}
