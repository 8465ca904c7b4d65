//! The device listeners: the device listener (plain HTTP or HTTPS, with MQTT by ALPN on
//! TLS) and `[mqtt] listen`, both through the one accept path ([`accept`]), and the one
//! shutdown sequence that ends them.
//!
//! HTTP connections are served by hyper's connection builder (HTTP/1.1 and HTTP/2);
//! MQTT connections by [`crate::ingress::mqtt`].
//!
//! **Shutdown.** When the signal fires, both listeners stop accepting; HTTP connections
//! finish their requests in flight, and every device session (WebSocket, MQTT, MQTT over
//! WebSocket) answers what it received and closes, all within `server.shutdown_grace_ms`.
//!
//! [`accept`]: crate::ingress::accept

use std::time::Duration;

use anyhow::Context as _;
use futures_util::future::BoxFuture;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use crate::config::Config;
use crate::ingress::accept::{Connection, Detect, Protocol, accept};
use crate::ingress::guard::Guard;
use crate::ingress::sessions::RemoteAddr;
use crate::ingress::state::AppState;

/// The bound listeners, before they serve.
pub struct Listeners {
    /// The device listener.
    device: TcpListener,
    /// `[mqtt] listen`, when set.
    mqtt: Option<TcpListener>,
}

/// Binds `[mqtt] listen` and the device listener, and prints `sluice: mqtt on
/// <scheme>://<address>` (`mqtts` with `[server.tls]`), then `sluice: listening on
/// <scheme>://<address>` on stdout: the addresses are the bound ones, which matters with
/// port 0.
pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
    let device = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let mqtt = match config.mqtt.listen {
        Some(listen) => Some(
            TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen} (mqtt)"))?,
        ),
        None => None,
    };
    let tls = config.server.tls.is_some();
    // The MQTT line first, then the device listener's: scripts read up to "listening on".
    if let Some(mqtt) = &mqtt {
        let address = mqtt.local_addr()?;
        let scheme = if tls { "mqtts" } else { "mqtt" };
        println!("sluice: mqtt on {scheme}://{address}");
        tracing::info!(%address, scheme, "MQTT listening");
    }
    let address = device.local_addr()?;
    let scheme = if tls { "https" } else { "http" };
    if !tls && !address.ip().is_loopback() {
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
    Ok(Listeners { device, mqtt })
}

/// Serves `state`'s devices on `listeners` until the shutdown signal, then ends as the
/// module says; returns once every connection and session is done or the grace is over.
pub async fn serve(listeners: Listeners, config: &Config, state: AppState) {
    let app = crate::ingress::http::app(state.clone());
    let guard = Guard::new("http", &config.server);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's header timeout needs a timer; it covers every request after the first
    // (the guard covers the first, and the protocol detection before it). hyper starts
    // it when it waits for the next request, so it is also how long a kept-alive
    // connection may sit idle between requests: the idle timeout, not the first
    // request's (a device publishing every 15 s on one connection keeps it).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(guard.idle_timeout.max(guard.first_request_timeout));
    builder.http2().timer(TokioTimer::new());
    let connections = TaskTracker::new();
    let serve = {
        let state = state.clone();
        // Each protocol's future boxed on its own: an MQTT session's task is as small as
        // its session, not as large as an HTTP connection's (nor holding its router).
        move |connection: Connection, guard: Guard| -> BoxFuture<'static, ()> {
            match connection.protocol {
                Protocol::Mqtt => Box::pin(crate::ingress::mqtt::serve(
                    connection,
                    &guard,
                    state.clone(),
                )),
                Protocol::Http => {
                    let (state, app, builder) = (state.clone(), app.clone(), builder.clone());
                    Box::pin(async move {
                        serve_http(connection, &guard, app, &builder, state).await;
                    })
                }
            }
        }
    };
    let device = accept(
        listeners.device,
        guard,
        Detect::Alpn,
        &state,
        connections.clone(),
        serve.clone(),
    );
    let mqtt = async {
        if let Some(listener) = listeners.mqtt {
            let guard = Guard::new("mqtt", &config.server);
            let detect = Detect::Only(Protocol::Mqtt);
            accept(listener, guard, detect, &state, connections.clone(), serve).await;
        }
    };
    tokio::join!(device, mqtt);
    connections.close();
    let grace = Duration::from_millis(config.server.shutdown_grace_ms);
    tracing::info!("no longer accepting; finishing in-flight requests and sessions");
    // HTTP requests and MQTT connections are the tracked tasks; WebSocket sessions run
    // in tasks of their own once upgraded, and are in the session list.
    let finished = async { tokio::join!(connections.wait(), state.sessions.all_closed()) };
    if tokio::time::timeout(grace, finished).await.is_err() {
        tracing::warn!(
            ?grace,
            "in-flight requests or sessions did not finish within server.shutdown_grace_ms"
        );
    }
}

/// Serves HTTP on `connection` until the client is done or, at shutdown, its requests in
/// flight are (hyper's graceful shutdown: no new request on it).
async fn serve_http(
    connection: Connection,
    guard: &Guard,
    app: axum::Router,
    builder: &auto::Builder<TokioExecutor>,
    state: AppState,
) {
    let Connection {
        stream,
        remote,
        peer,
        slot: _slot,
        ..
    } = connection;
    let stream = guard.watch(stream);
    let allowance = stream.allowance();
    let app = app.map_request(move |mut request: axum::http::Request<_>| {
        // The client certificate (verified in the handshake) names the device for every
        // request on this connection; an upgrade may bound what the connection reads.
        request.extensions_mut().insert(peer.clone());
        request.extensions_mut().insert(RemoteAddr(remote));
        request.extensions_mut().insert(allowance.clone());
        request
    });
    let service = TowerToHyperService::new(app);
    let io = TokioIo::new(stream);
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    let mut shutdown = state.shutdown.clone();
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.wait() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%remote, %error, "connection ended with an error");
    }
}
