//! The device listener: plain HTTP or HTTPS (rustls), serving [`crate::ingress::http::app`].
//!
//! One accept loop serves both, with hyper's connection builder (HTTP/1.1 and HTTP/2),
//! so every connection is tracked for graceful shutdown, and every connection is held
//! to the [`Guard`]'s limits.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::config::Config;
use crate::ingress::guard::Guard;
use crate::ingress::live::Live;
use crate::ingress::sessions::RemoteAddr;
use crate::ingress::state::AppState;
use crate::shutdown::Shutdown;

/// How long in-flight requests may take to finish after shutdown is requested.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Binds the listener and serves `state`'s routes until `shutdown` fires; then stops
/// accepting and waits up to [`SHUTDOWN_GRACE`] for in-flight requests.
///
/// Once listening, prints `sluice: listening on <scheme>://<address>` on stdout: the
/// address is the bound one, which matters with port 0.
pub async fn serve(config: &Config, state: AppState) -> anyhow::Result<()> {
    let live: Arc<Live> = state.live.clone();
    let mut shutdown: Shutdown = state.shutdown.clone();
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let address = listener.local_addr()?;
    let serves_tls = live.tls.load().is_some();
    let scheme = if serves_tls { "https" } else { "http" };
    if !serves_tls && !address.ip().is_loopback() {
        tracing::warn!(%address, "serving plain HTTP beyond loopback: configure [server.tls]");
    }
    if config.auth.is_none() && !address.ip().is_loopback() {
        tracing::warn!(
            %address,
            "serving without [auth] beyond loopback (server.allow_unauthenticated): any client can name itself any device"
        );
    }
    println!("sluice: listening on {scheme}://{address}");
    tracing::info!(%address, scheme, "listening");

    let guard = Guard::new("http", &config.server);
    let app = crate::ingress::http::app(state.clone());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's header timeout needs a timer; it covers every request after the first
    // (the guard covers the first, and the protocol detection before it).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(guard.first_request_timeout);
    builder.http2().timer(TokioTimer::new());
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
        let Some(slot) = guard.admit() else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = live.tls.load_full();
        let guard = guard.clone();
        let live = live.clone();
        let state = state.clone();
        let remote = peer;
        tokio::spawn(async move {
            let _slot = slot;
            let result = match tls {
                Some(acceptor) => {
                    let handshake = TlsAcceptor::clone(&acceptor).accept(stream);
                    let Some(stream) = guard.handshake(peer, handshake).await else {
                        return;
                    };
                    // The client certificate (verified in the handshake) names the
                    // device for every request on this connection.
                    let (_, session) = stream.get_ref();
                    let peer = live.peer_identity(session.peer_certificates());
                    if crate::ingress::mqtt::is_mqtt_alpn(session.alpn_protocol()) {
                        crate::ingress::mqtt::serve_tls(stream, peer, remote, &guard, state).await;
                        return;
                    }
                    let app = app.map_request(move |mut request: axum::http::Request<_>| {
                        request.extensions_mut().insert(peer.clone());
                        request.extensions_mut().insert(RemoteAddr(remote));
                        request
                    });
                    let service = TowerToHyperService::new(app);
                    let io = TokioIo::new(guard.watch(stream));
                    let connection = builder.serve_connection_with_upgrades(io, service);
                    watcher.watch(connection.into_owned()).await
                }
                None => {
                    let app = app.map_request(move |mut request: axum::http::Request<_>| {
                        request.extensions_mut().insert(RemoteAddr(remote));
                        request
                    });
                    let service = TowerToHyperService::new(app);
                    let io = TokioIo::new(guard.watch(stream));
                    let connection = builder.serve_connection_with_upgrades(io, service);
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
