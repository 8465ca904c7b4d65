//! One accept path for every device listener, in linkerd2-proxy's order: accept under
//! the connection [`Guard`], the TLS handshake (within its timeout), the peer's identity
//! from its client certificate, the protocol detected (ALPN), then the connection handed
//! to that protocol's server.
//!
//! The device listener detects by ALPN as IoT Core does on 443 (`x-amzn-mqtt-ca` or
//! `mqtt`: MQTT; anything else, or none: HTTP); `[mqtt] listen` speaks MQTT only.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::auth::PeerIdentity;
use crate::ingress::guard::{Guard, Slot};
use crate::ingress::live::MQTT_ALPN;
use crate::ingress::state::AppState;

/// A connection's bytes, whatever carries them (TLS or plain TCP).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for S {}

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2 (the device API, WebSocket upgrades).
    Http,
    /// MQTT 3.1.1 or 5.0.
    Mqtt,
}

/// How a listener tells what a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detect {
    /// By the protocol the TLS handshake negotiated (ALPN); HTTP without one.
    Alpn,
    /// Always this protocol.
    Only(Protocol),
}

impl Detect {
    /// The protocol of a connection that negotiated `alpn` (none without TLS).
    pub fn protocol(self, alpn: Option<&[u8]>) -> Protocol {
        match self {
            Detect::Only(protocol) => protocol,
            Detect::Alpn if alpn.is_some_and(|name| MQTT_ALPN.contains(&name)) => Protocol::Mqtt,
            Detect::Alpn => Protocol::Http,
        }
    }
}

/// An accepted connection, ready for its protocol.
pub struct Connection {
    /// The bytes (after the TLS handshake, when the listener serves TLS).
    pub stream: Box<dyn Io>,
    /// The address it comes from.
    pub remote: SocketAddr,
    /// Its client certificate's identity (none without TLS or a certificate).
    pub peer: PeerIdentity,
    /// What it speaks.
    pub protocol: Protocol,
    /// Its place under the listener's connection limit, given back when it ends.
    pub slot: Slot,
}

/// Accepts connections on `listener` until the gateway shuts down, each under `guard`,
/// and runs `serve` on each in a task of its own, tracked by `tasks`.
pub async fn accept<F, Fut>(
    listener: TcpListener,
    guard: Guard,
    detect: Detect,
    state: &AppState,
    tasks: TaskTracker,
    serve: F,
) where
    F: Fn(Connection, Guard) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    // Shared: each connection's task holds a pointer, not its own copy of what `serve`
    // captured (the HTTP router and server settings).
    let serve = std::sync::Arc::new(serve);
    let mut shutdown = state.shutdown.clone();
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.wait() => return,
        };
        let Some(slot) = guard.admit() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let tls = state.live.tls.load_full();
        let (guard, live, serve) = (
            guard.clone(),
            state.live.clone(),
            std::sync::Arc::clone(&serve),
        );
        tasks.spawn(async move {
            let (stream, peer, alpn): (Box<dyn Io>, PeerIdentity, Option<Vec<u8>>) = match tls {
                Some(acceptor) => {
                    // Boxed: the task does not keep the handshake's room after it.
                    let handshake = TlsAcceptor::clone(&acceptor).accept(stream);
                    let Some(stream) = Box::pin(guard.handshake(remote, handshake)).await else {
                        return;
                    };
                    let (_, session) = stream.get_ref();
                    let peer = live.peer_identity(session.peer_certificates());
                    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
                    (Box::new(stream), peer, alpn)
                }
                None => (Box::new(stream), PeerIdentity::default(), None),
            };
            let connection = Connection {
                stream,
                remote,
                peer,
                protocol: detect.protocol(alpn.as_deref()),
                slot,
            };
            // `serve` gives each protocol's future boxed on its own: the task is as small
            // as the protocol's session needs.
            (*serve)(connection, guard).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_is_detected_by_alpn_where_the_listener_says() {
        let cases: [(Detect, Option<&[u8]>, Protocol); 7] = [
            (Detect::Alpn, None, Protocol::Http),
            (Detect::Alpn, Some(b"h2"), Protocol::Http),
            (Detect::Alpn, Some(b"http/1.1"), Protocol::Http),
            (Detect::Alpn, Some(b"x-amzn-mqtt-ca"), Protocol::Mqtt),
            (Detect::Alpn, Some(b"mqtt"), Protocol::Mqtt),
            (Detect::Only(Protocol::Mqtt), None, Protocol::Mqtt),
            (Detect::Only(Protocol::Mqtt), Some(b"h2"), Protocol::Mqtt),
        ];
        for (detect, alpn, expected) in cases {
            assert_eq!(detect.protocol(alpn), expected, "{detect:?} {alpn:?}");
        }
    }
}
