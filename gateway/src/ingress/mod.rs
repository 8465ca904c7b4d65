//! The device-facing listener: plain HTTP or HTTPS (rustls), serving [`http::app`].
//!
//! One accept loop serves both, with hyper's connection builder (HTTP/1.1 and HTTP/2),
//! so every connection is tracked for graceful shutdown.

pub mod http;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tower::ServiceExt as _;

use crate::auth::PeerIdentity;
use arc_swap::{ArcSwap, ArcSwapOption};

use crate::config::{AuthConfig, Config, TlsConfig};
use crate::pipeline::Pipeline;
use crate::shutdown::Shutdown;

/// How long in-flight requests may take to finish after shutdown is requested.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What a configuration reload can change on the device side without dropping a
/// connection: the rules every request is checked against, and the TLS acceptor (new
/// certificates and CAs apply to new connections; open ones keep their session).
pub struct Live {
    /// Authentication, policy and limits.
    pub rules: ArcSwap<http::DeviceRules>,
    /// The TLS acceptor, when the listener serves HTTPS.
    pub tls: ArcSwapOption<TlsAcceptor>,
}

impl Live {
    /// The device side of `config`; fails on unreadable TLS material.
    pub fn new(config: &Config) -> anyhow::Result<Arc<Live>> {
        let live = Arc::new(Live {
            rules: ArcSwap::from_pointee(http::DeviceRules::new(config, None)),
            tls: ArcSwapOption::new(
                config
                    .server
                    .tls
                    .as_ref()
                    .map(|tls| tls_acceptor(tls, config.auth.as_ref()).map(Arc::new))
                    .transpose()?,
            ),
        });
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
            .map(|tls| tls_acceptor(tls, new.auth.as_ref()).map(Arc::new))
            .transpose()?;
        let current = self.rules.load_full();
        let mut changed = Vec::new();
        for (differs, name) in [
            (tls_changed, "server.tls"),
            (old.auth != new.auth, "auth"),
            (old.policy != new.policy, "policy"),
            (old.limits != new.limits, "limits"),
            (old.websocket != new.websocket, "websocket"),
        ] {
            if differs {
                changed.push(name);
            }
        }
        Ok(DeviceUpdate {
            rules: http::DeviceRules::new(new, Some((old, &current))),
            tls,
            changed,
        })
    }

    /// Swaps in a prepared update; returns the sections that changed.
    pub fn commit(&self, update: DeviceUpdate) -> Vec<&'static str> {
        self.rules.store(Arc::new(update.rules));
        if let Some(tls) = update.tls {
            self.tls.store(Some(tls));
        }
        update.changed
    }
}

/// A device side built by [`Live::prepare`], ready to swap in.
pub struct DeviceUpdate {
    rules: http::DeviceRules,
    tls: Option<Arc<TlsAcceptor>>,
    changed: Vec<&'static str>,
}

/// Binds the listener and serves until `shutdown` fires; then stops accepting and waits
/// up to [`SHUTDOWN_GRACE`] for in-flight requests.
///
/// Once listening, prints `sluice: listening on <scheme>://<address>` on stdout: the
/// address is the bound one, which matters with port 0.
pub async fn serve(
    config: &Config,
    live: Arc<Live>,
    pipeline: Arc<Pipeline>,
    sessions: Arc<ws::Sessions>,
    downlink: Option<Arc<crate::downlink::Downlink>>,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let address = listener.local_addr()?;
    let serves_tls = live.tls.load().is_some();
    let scheme = if serves_tls { "https" } else { "http" };
    if !serves_tls && !address.ip().is_loopback() {
        tracing::warn!(%address, "serving plain HTTP beyond loopback: configure [server.tls]");
    }
    println!("sluice: listening on {scheme}://{address}");
    tracing::info!(%address, scheme, "listening");

    let app = http::app(http::AppState {
        pipeline,
        live: live.clone(),
        shutdown: shutdown.clone(),
        sessions,
        downlink,
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.wait() => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = live.tls.load_full();
        // The device id source is read per connection too: `[auth.mtls]` can change on
        // reload.
        let id_source = live.rules.load().auth.mtls_device_id();
        tokio::spawn(async move {
            let result = match tls {
                Some(acceptor) => match TlsAcceptor::clone(&acceptor).accept(stream).await {
                    Ok(stream) => {
                        // The client certificate (verified in the handshake) names the
                        // device for every request on this connection.
                        let peer = PeerIdentity(
                            match (id_source, stream.get_ref().1.peer_certificates()) {
                                (Some(source), Some([leaf, ..])) => {
                                    Some(crate::auth::mtls::identity(leaf, source))
                                }
                                _ => None,
                            },
                        );
                        let app = app.map_request(move |mut request: axum::http::Request<_>| {
                            request.extensions_mut().insert(peer.clone());
                            request
                        });
                        let service = TowerToHyperService::new(app);
                        let connection =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        watcher.watch(connection.into_owned()).await
                    }
                    Err(error) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                        return;
                    }
                },
                None => {
                    let service = TowerToHyperService::new(app);
                    let connection =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(connection.into_owned()).await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("no longer accepting; finishing in-flight requests");
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within {SHUTDOWN_GRACE:?}");
    }
    Ok(())
}

/// Builds the TLS acceptor from the configured certificate and key, asking for client
/// certificates when `[auth.mtls]` is set (optional when tokens are accepted too).
fn tls_acceptor(tls: &TlsConfig, auth: Option<&AuthConfig>) -> anyhow::Result<TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(&tls.cert)
            .with_context(|| format!("cannot open {}", tls.cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("cannot read certificates from {}", tls.cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no PEM certificate", tls.cert.display());
    }
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(&tls.key)
            .with_context(|| format!("cannot open {}", tls.key.display()))?,
    ))
    .with_context(|| format!("cannot read the private key from {}", tls.key.display()))?
    .with_context(|| format!("{} holds no PEM private key", tls.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match auth.and_then(|a| a.mtls.as_ref().map(|m| (m, a.tokens.is_some()))) {
        Some((mtls, tokens_too)) => builder
            .with_client_cert_verifier(crate::auth::mtls::verifier(mtls, provider, tokens_too)?),
        None => builder.with_no_client_auth(),
    };
    let mut server = builder
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not fit together")?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}
