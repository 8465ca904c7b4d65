//! Client certificates: the verifier the TLS listener uses, and the device identity read
//! from a verified certificate.
//!
//! The chain is checked by rustls' WebPKI verifier against the configured CA bundles (a
//! foreign CA or an expired certificate fails the handshake). On top of that, a
//! certificate whose serial number or SHA-256 fingerprint is listed as revoked fails the
//! handshake with rustls' `Revoked` error (the TLS alert `certificate_revoked`). Lists
//! from the config rather than CRLs: operators revoke a device's certificate by adding
//! one line, without running a CRL publisher.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::{CertificateDer, UnixTime};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    SignatureScheme,
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::auth::{AuthError, Identity, Method, check_device_id, parse_hex};
use crate::config::{DeviceIdSource, MtlsConfig};

/// Builds the client-certificate verifier. With `optional`, clients without a
/// certificate get through the handshake (to authenticate with a token instead).
pub fn verifier(
    config: &MtlsConfig,
    provider: Arc<CryptoProvider>,
    optional: bool,
) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    let mut roots = RootCertStore::empty();
    for path in &config.ca {
        let certs = read_certs(path)?;
        anyhow::ensure!(
            !certs.is_empty(),
            "{} holds no PEM certificate",
            path.display()
        );
        for cert in certs {
            roots
                .add(cert)
                .with_context(|| format!("{}: not a usable CA certificate", path.display()))?;
        }
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    let builder = if optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    let inner = builder
        .build()
        .context("cannot build the client certificate verifier")?;
    Ok(Arc::new(Revocations {
        inner,
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
    }))
}

fn read_certs(path: &PathBuf) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    rustls_pemfile::certs(&mut std::io::BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("cannot read certificates from {}", path.display()))
}

fn strip_zeros(bytes: Vec<u8>) -> Vec<u8> {
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    bytes[first..].to_vec()
}

/// The WebPKI verifier, plus the configured revocations.
#[derive(Debug)]
struct Revocations {
    inner: Arc<dyn ClientCertVerifier>,
    serials: HashSet<Vec<u8>>,
    fingerprints: HashSet<Vec<u8>>,
}

impl ClientCertVerifier for Revocations {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let fingerprint = Sha256::digest(end_entity.as_ref()).to_vec();
        let revoked = self.fingerprints.contains(&fingerprint)
            || X509Certificate::from_der(end_entity.as_ref())
                .map(|(_, cert)| {
                    self.serials
                        .contains(&strip_zeros(cert.raw_serial().to_vec()))
                })
                .unwrap_or(false);
        if revoked {
            tracing::info!(fingerprint = %hex::encode(&fingerprint), "revoked client certificate refused");
            return Err(Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The identity in a verified client certificate: the device id from `source`, groups
/// from the subject's organizational units.
pub fn identity(cert: &CertificateDer<'_>, source: DeviceIdSource) -> Result<Identity, AuthError> {
    let (_, cert) = X509Certificate::from_der(cert.as_ref())
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
    Ok(Identity {
        device_id: id,
        groups,
        method: Method::Certificate,
    })
}
