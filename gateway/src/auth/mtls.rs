//! Client certificates: the verifier the TLS listener uses, and the device identity read
//! from a verified certificate.
//!
//! A certificate registered at AWS IoT (`[auth.registry]`) is accepted when the snapshot
//! says it is ACTIVE and it is within its validity dates, whatever CA issued it (as IoT
//! Core admits it); registered but not ACTIVE fails the handshake with rustls' `Revoked`
//! error (the TLS alert `certificate_revoked`). Any other certificate's chain is checked
//! by rustls' WebPKI verifier against the configured CA bundles (`[auth.mtls]`; a
//! foreign CA or an expired certificate fails the handshake). On top of both, a
//! certificate whose serial number or SHA-256 fingerprint `[auth.mtls]` lists as revoked
//! fails the handshake with `Revoked`. Lists from the config rather than CRLs: operators
//! revoke a device's certificate by adding one line, without running a CRL publisher.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::crypto::WebPkiSupportedAlgorithms;
use tokio_rustls::rustls::pki_types::{CertificateDer, UnixTime};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme,
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::auth::registry::{ACTIVE, Registered, Registry};
use crate::auth::{AuthError, CertificateKey, Identity, Method, check_device_id};
use crate::config::{DeviceIdSource, MtlsConfig, parse_hex};

/// Builds the client-certificate verifier: the CA bundles of `mtls`, the certificates
/// `registry` holds, or both. With `optional`, clients without a certificate get through
/// the handshake (to authenticate with a token instead).
pub fn verifier(
    mtls: Option<&MtlsConfig>,
    registry: Option<Arc<Registry>>,
    optional: bool,
) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    let chains = match mtls {
        Some(config) => {
            let roots = crate::tls::roots(config.ca.iter().map(PathBuf::as_path))?;
            let builder = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                crate::tls::provider(),
            )
            .allow_unauthenticated();
            Some(
                builder
                    .build()
                    .context("cannot build the client certificate verifier")?,
            )
        }
        None => None,
    };
    Ok(Arc::new(ClientCertificates {
        chains,
        revoked: mtls.map(RevocationList::new),
        registry,
        optional,
        algorithms: crate::tls::provider().signature_verification_algorithms,
    }))
}

/// The certificates `[auth.mtls]` lists as revoked, by serial number or fingerprint.
#[derive(Debug)]
pub struct RevocationList {
    serials: HashSet<Vec<u8>>,
    fingerprints: HashSet<Vec<u8>>,
}

impl RevocationList {
    /// The lists of `config` (validated: every entry is hex).
    pub fn new(config: &MtlsConfig) -> RevocationList {
        RevocationList {
            serials: config
                .revoked_serials
                .iter()
                .filter_map(|s| parse_hex(s))
                .map(strip_zeros)
                .collect(),
            fingerprints: config
                .revoked_fingerprints
                .iter()
                .filter_map(|s| parse_hex(s))
                .collect(),
        }
    }

    /// Whether the certificate `key` names is revoked.
    pub fn contains(&self, key: &CertificateKey) -> bool {
        self.fingerprints.contains(&key.fingerprint) || self.serials.contains(&key.serial)
    }
}

/// What names `cert` in the revocation lists.
pub fn key_of(der: &[u8]) -> Option<CertificateKey> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(key_of_parsed(der, &cert))
}

/// What names `cert`, read from `der`, in the revocation lists.
fn key_of_parsed(der: &[u8], cert: &X509Certificate<'_>) -> CertificateKey {
    CertificateKey {
        serial: strip_zeros(cert.raw_serial().to_vec()),
        fingerprint: fingerprint(der),
        registered: false,
    }
}

/// The SHA-256 fingerprint of a DER certificate (IoT Core's certificate id).
pub fn fingerprint(der: &[u8]) -> Vec<u8> {
    Sha256::digest(der).to_vec()
}

fn strip_zeros(bytes: Vec<u8>) -> Vec<u8> {
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    bytes[first..].to_vec()
}

/// The registry's certificates, the WebPKI verifier for the CA bundles, and the
/// configured revocations.
#[derive(Debug)]
struct ClientCertificates {
    /// Chains to the configured CAs (`[auth.mtls]`).
    chains: Option<Arc<dyn ClientCertVerifier>>,
    revoked: Option<RevocationList>,
    registry: Option<Arc<Registry>>,
    optional: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for ClientCertificates {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.optional
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        match (&self.registry, &self.chains) {
            // Registered certificates come from any CA: no hint that would make a client
            // hold back a certificate of another one.
            (Some(_), _) | (None, None) => &[],
            (None, Some(chains)) => chains.root_hint_subjects(),
        }
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let key = key_of(end_entity.as_ref());
        if let (Some(key), Some(revoked)) = (&key, &self.revoked)
            && revoked.contains(key)
        {
            tracing::info!(fingerprint = %hex::encode(&key.fingerprint), "revoked client certificate refused");
            return Err(Error::InvalidCertificate(CertificateError::Revoked));
        }
        let registered = match (&key, &self.registry) {
            (Some(key), Some(registry)) => registry.lookup(&key.fingerprint),
            _ => None,
        };
        if let Some(registered) = registered {
            if registered.status != ACTIVE {
                tracing::info!(
                    certificate = %hex::encode(key.map(|k| k.fingerprint).unwrap_or_default()),
                    status = %registered.status,
                    "registered client certificate refused: not ACTIVE"
                );
                return Err(Error::InvalidCertificate(CertificateError::Revoked));
            }
            within_validity(end_entity, now)?;
            return Ok(ClientCertVerified::assertion());
        }
        match &self.chains {
            Some(chains) => chains.verify_client_cert(end_entity, intermediates, now),
            None => Err(Error::InvalidCertificate(CertificateError::UnknownIssuer)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tokio_rustls::rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        tokio_rustls::rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A registered certificate is still held to its validity dates, as IoT Core holds it.
fn within_validity(der: &CertificateDer<'_>, now: UnixTime) -> Result<(), Error> {
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let now = now.as_secs() as i64;
    let validity = cert.validity();
    if now < validity.not_before.timestamp() {
        return Err(Error::InvalidCertificate(CertificateError::NotValidYet));
    }
    if now > validity.not_after.timestamp() {
        return Err(Error::InvalidCertificate(CertificateError::Expired));
    }
    Ok(())
}

/// The identity of a registered certificate: its one thing (none or several: refused,
/// with the count), no groups.
pub fn registered_identity(
    der: &CertificateDer<'_>,
    registered: &Registered,
) -> Result<Identity, AuthError> {
    let [thing] = registered.things.as_slice() else {
        return Err(AuthError::CertificateNotOneThing(registered.things.len()));
    };
    check_device_id(thing)
        .map_err(|why| AuthError::BadDeviceId(format!("the thing `{thing}` {why}")))?;
    let parsed = X509Certificate::from_der(der.as_ref()).ok();
    let cert = parsed.as_ref().map(|(_, cert)| cert);
    Ok(Identity {
        device_id: thing.clone(),
        groups: Vec::new(),
        method: Method::Certificate,
        expires_at_secs: cert
            .and_then(|cert| u64::try_from(cert.validity().not_after.timestamp()).ok()),
        certificate: cert.map(|cert| CertificateKey {
            registered: true,
            ..key_of_parsed(der.as_ref(), cert)
        }),
        claims: Vec::new(),
    })
}

/// The identity in a verified client certificate: the device id from `source`, groups
/// from the subject's organizational units.
pub fn identity(der: &CertificateDer<'_>, source: DeviceIdSource) -> Result<Identity, AuthError> {
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|_| AuthError::CertificateWithoutId("certificate (unreadable)"))?;
    let subject = cert.subject();
    let san = || cert.subject_alternative_name().ok().flatten();
    let id = match source {
        DeviceIdSource::Cn => subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string),
        DeviceIdSource::SanDns | DeviceIdSource::SanUri | DeviceIdSource::SanEmail => san()
            .and_then(|san| {
                san.value
                    .general_names
                    .iter()
                    .find_map(|name| match (source, name) {
                        (DeviceIdSource::SanDns, GeneralName::DNSName(v))
                        | (DeviceIdSource::SanUri, GeneralName::URI(v))
                        | (DeviceIdSource::SanEmail, GeneralName::RFC822Name(v)) => {
                            Some(v.to_string())
                        }
                        _ => None,
                    })
            }),
    };
    let where_ = match source {
        DeviceIdSource::Cn => "subject CN",
        DeviceIdSource::SanDns => "DNS SAN",
        DeviceIdSource::SanUri => "URI SAN",
        DeviceIdSource::SanEmail => "e-mail SAN",
    };
    let id = id.ok_or(AuthError::CertificateWithoutId(where_))?;
    check_device_id(&id).map_err(|why| AuthError::BadDeviceId(format!("{where_} `{id}` {why}")))?;
    let groups = subject
        .iter_organizational_unit()
        .filter_map(|ou| ou.as_str().ok().map(str::to_string))
        .collect();
    let expires_at_secs = u64::try_from(cert.validity().not_after.timestamp()).ok();
    Ok(Identity {
        device_id: id,
        groups,
        method: Method::Certificate,
        expires_at_secs,
        certificate: Some(key_of_parsed(der.as_ref(), &cert)),
        claims: Vec::new(),
    })
}
