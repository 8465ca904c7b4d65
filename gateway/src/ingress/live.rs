//! What a configuration reload can swap on the device side without dropping a
//! connection: the device rules ([`DeviceRules`]) and the TLS acceptor.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio_rustls::TlsAcceptor;

use crate::auth::registry::Registry;
use crate::config::{AuthConfig, Config, TlsConfig};
use crate::ingress::admit::DeviceRules;

/// ALPN names that select MQTT on a TLS port: IoT Core's, and the standard one.
pub const MQTT_ALPN: [&[u8]; 2] = [b"x-amzn-mqtt-ca", b"mqtt"];
/// IoT Core's ALPN name for HTTPS with a client certificate on port 443.
pub const HTTP_ALPN: &[u8] = b"x-amzn-http-ca";

/// What a configuration reload can change on the device side without dropping a
/// connection: the rules every request is checked against, and the TLS acceptor (new
/// certificates and CAs apply to new connections; open ones keep their session).
pub struct Live {
    /// Authentication, policy and limits.
    pub rules: ArcSwap<DeviceRules>,
    /// The TLS acceptor, when the listener serves HTTPS.
    pub tls: ArcSwapOption<TlsAcceptor>,
    /// Counts the updates committed, so that open sessions check their credentials
    /// again at once (a certificate revoked by a reload ends its sessions, and so does
    /// one the registry no longer has ACTIVE).
    pub updates: tokio::sync::watch::Sender<u64>,
    /// The certificates registered at AWS IoT (`[auth.registry]`; set at start).
    pub registry: Option<Arc<Registry>>,
}

impl Live {
    /// The device side of `config`, with the certificates `registry` holds; fails on
    /// unreadable TLS material.
    pub fn new(config: &Config, registry: Option<Arc<Registry>>) -> anyhow::Result<Arc<Live>> {
        let live = Arc::new(Live {
            rules: ArcSwap::from_pointee(DeviceRules::new(config, None)),
            tls: ArcSwapOption::new(
                config
                    .server
                    .tls
                    .as_ref()
                    .map(|tls| tls_acceptor(tls, config.auth.as_ref(), registry.clone()))
                    .transpose()?
                    .map(Arc::new),
            ),
            updates: tokio::sync::watch::Sender::new(0),
            registry,
        });
        // A refresh of the registry that changed it: open sessions check their
        // certificates again.
        if let Some(registry) = &live.registry {
            let mut changes = registry.changes();
            let weak = Arc::downgrade(&live);
            tokio::spawn(async move {
                while changes.changed().await.is_ok() {
                    let Some(live) = weak.upgrade() else { return };
                    live.updates.send_modify(|n| *n += 1);
                }
            });
        }
        // Rate-limit state of devices gone quiet is forgotten now and then.
        let weak = Arc::downgrade(&live);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let Some(live) = weak.upgrade() else { return };
                live.rules.load().policy.prune();
            }
        });
        Ok(live)
    }

    /// Builds the device side of `new` (reading TLS material, which can fail) without
    /// applying it. Whether the listener serves TLS at all, or asks for client
    /// certificates, cannot change: the caller keeps those as they were.
    pub fn prepare(&self, old: &Config, new: &Config) -> anyhow::Result<DeviceUpdate> {
        let tls_changed = old.server.tls != new.server.tls
            || old.auth.as_ref().map(|a| &a.mtls) != new.auth.as_ref().map(|a| &a.mtls);
        // Read again on every reload, changed or not: certificates are usually rotated by
        // writing new files under the same names. (Whether tokens are accepted besides
        // client certificates is part of the acceptor too.)
        let tls = new
            .server
            .tls
            .as_ref()
            .map(|tls| tls_acceptor(tls, new.auth.as_ref(), self.registry.clone()))
            .transpose()?
            .map(Arc::new);
        let current = self.rules.load_full();
        let mut changed = Vec::new();
        for (differs, name) in [
            (tls_changed, "server.tls"),
            (old.auth != new.auth, "auth"),
            (old.policy != new.policy, "policy"),
            (old.limits != new.limits, "limits"),
            (old.websocket != new.websocket, "websocket"),
            (old.mqtt != new.mqtt, "mqtt"),
        ] {
            if differs {
                changed.push(name);
            }
        }
        Ok(DeviceUpdate {
            rules: DeviceRules::new(new, Some((old, &current))),
            tls,
            changed,
        })
    }

    /// The device a verified client certificate chain names: a registered certificate's
    /// thing, else where `[auth.mtls] device_id` says (as configured now); none without a
    /// certificate.
    pub fn peer_identity(
        &self,
        certificates: Option<&[tokio_rustls::rustls::pki_types::CertificateDer<'static>]>,
    ) -> crate::auth::PeerIdentity {
        let Some([leaf, ..]) = certificates else {
            return crate::auth::PeerIdentity(None);
        };
        let registered = self
            .registry
            .as_ref()
            .and_then(|registry| registry.lookup(&crate::auth::mtls::fingerprint(leaf.as_ref())));
        if let Some(registered) = registered {
            let identity = crate::auth::mtls::registered_identity(leaf, &registered);
            return crate::auth::PeerIdentity(Some(identity));
        }
        let source = self.rules.load().auth.mtls_device_id();
        crate::auth::PeerIdentity(source.map(|source| crate::auth::mtls::identity(leaf, source)))
    }

    /// Whether a session of `identity` may go on at `now_secs`: its credential is still
    /// valid ([`crate::auth::Authenticator::still_valid`]), and a registered certificate
    /// is still ACTIVE in the registry.
    pub fn still_valid(
        &self,
        identity: &crate::auth::Identity,
        now_secs: u64,
    ) -> Result<(), crate::auth::AuthError> {
        self.rules.load().auth.still_valid(identity, now_secs)?;
        if let (Some(key), Some(registry)) = (&identity.certificate, &self.registry)
            && key.registered
            && registry
                .lookup(&key.fingerprint)
                .is_none_or(|registered| registered.status != crate::auth::registry::ACTIVE)
        {
            return Err(crate::auth::AuthError::CertificateRevoked);
        }
        Ok(())
    }

    /// Swaps in a prepared update; returns the sections that changed.
    pub fn commit(&self, update: DeviceUpdate) -> Vec<&'static str> {
        self.rules.store(Arc::new(update.rules));
        if let Some(tls) = update.tls {
            self.tls.store(Some(tls));
        }
        self.updates.send_modify(|n| *n += 1);
        update.changed
    }
}

/// A device side built by [`Live::prepare`], ready to swap in.
pub struct DeviceUpdate {
    rules: DeviceRules,
    tls: Option<Arc<TlsAcceptor>>,
    changed: Vec<&'static str>,
}

/// Builds the TLS acceptor from the configured certificate and key, asking for client
/// certificates when `[auth.mtls]` or `[auth.registry]` is set (optional when tokens are
/// accepted too). HTTP first; MQTT by ALPN as IoT Core does on 443 (a client offering
/// none gets HTTP, as does one offering IoT Core's `x-amzn-http-ca`).
fn tls_acceptor(
    tls: &TlsConfig,
    auth: Option<&AuthConfig>,
    registry: Option<Arc<Registry>>,
) -> anyhow::Result<TlsAcceptor> {
    let clients = match auth {
        Some(auth) if auth.mtls.is_some() || registry.is_some() => {
            let tokens_too = auth.tokens.is_some() || auth.jwt.is_some();
            Some(crate::auth::mtls::verifier(
                auth.mtls.as_ref(),
                registry,
                tokens_too,
            )?)
        }
        _ => None,
    };
    let [iot_core, mqtt] = MQTT_ALPN;
    let alpn = [b"h2".as_slice(), b"http/1.1", HTTP_ALPN, iot_core, mqtt];
    let server = crate::tls::server_config(&tls.cert, &tls.key, clients, &alpn)?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}
