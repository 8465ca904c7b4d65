//! The device session shell: what every long-lived protocol (the `sluice.v1` WebSocket
//! dialect, MQTT) does around its framing, written once.
//!
//! [`DeviceSession::open`] registers the session (`GET /admin/devices`, the metrics); the
//! device's own session at IoT Core is attached when the protocol opens it
//! ([`DeviceSession::attach_upstream`]). While it runs, the protocol's loop `select!`s on
//! its socket, on [`Ending::ended`] (why the session must stop: its credential expired,
//! a reload revoked it, another connection took it over, here or at IoT Core, the gateway
//! is stopping) and on [`DeviceSession::upstream`]'s messages; it counts what it
//! received, answered and sent ([`DeviceSession::received`], [`DeviceSession::answered`],
//! [`DeviceSession::commands_sent`]). [`DeviceSession::close`] ends the session at IoT
//! Core and unregisters.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::auth::{AuthError, Identity};
use crate::ingress::live::Live;
use crate::ingress::sessions::SessionInfo;
use crate::ingress::state::AppState;
use crate::shutdown::Shutdown;
use crate::upstream::{self, UpstreamSession};

/// Why the gateway ends a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The credential's validity ended (a token's `exp`, a certificate's end of
    /// validity), or a reload made it invalid otherwise.
    Expired(AuthError),
    /// A configuration reload revoked the session's client certificate.
    Revoked,
    /// Another connection took the session over (MQTT: the same client id).
    TakenOver,
    /// The device's own session at IoT Core ended without a takeover being said: the
    /// device connects again, as it would to IoT Core directly.
    UpstreamLost,
    /// The gateway is shutting down.
    ShuttingDown,
}

/// An open device session.
pub struct DeviceSession {
    /// The session as `GET /admin/devices` lists it, with its counters.
    info: Arc<SessionInfo>,
    /// Why the session must stop.
    pub end: Ending,
    /// The session list it leaves at close.
    state: AppState,
    /// The device's own session at IoT Core, once the protocol opened it.
    pub upstream: Option<UpstreamSession>,
}

impl DeviceSession {
    /// Opens a session of `identity` over `protocol`, with `window` messages in flight at
    /// most, on a connection from `remote`; `takeover` fires when another connection
    /// takes it over.
    pub fn open(
        state: &AppState,
        identity: &Identity,
        protocol: &'static str,
        window: usize,
        remote: Option<std::net::SocketAddr>,
        takeover: Option<oneshot::Receiver<()>>,
    ) -> DeviceSession {
        let info = state.sessions.open(identity, protocol, window, remote);
        DeviceSession {
            end: Ending::new(state, identity, takeover),
            state: state.clone(),
            info,
            upstream: None,
        }
    }

    /// Attaches the device's own session at IoT Core: it is the device's from now on,
    /// and its takeover (the device connected elsewhere) ends this session.
    pub fn attach_upstream(&mut self, upstream: UpstreamSession) {
        self.end.upstream = Some(upstream.watch());
        self.upstream = Some(upstream);
    }

    /// `count` messages came in: they are in flight until [`DeviceSession::answered`].
    pub fn received(&self, count: usize) {
        let count = count as u64;
        self.info.messages.fetch_add(count, Ordering::Relaxed);
        let now = self.info.in_flight.fetch_add(count, Ordering::Relaxed) + count;
        self.info.max_in_flight.fetch_max(now, Ordering::Relaxed);
    }

    /// `count` messages were answered (acknowledged or refused).
    pub fn answered(&self, count: usize) {
        self.info
            .in_flight
            .fetch_sub(count as u64, Ordering::Relaxed);
    }

    /// `count` messages from IoT Core were written to the device.
    pub fn commands_sent(&self, count: u64) {
        self.info.commands.fetch_add(count, Ordering::Relaxed);
    }

    /// Closes the session: the session at IoT Core ends (`with_will`: by dropping its connection, so that IoT Core
    /// publishes the device's will; otherwise with DISCONNECT), and the session leaves
    /// the list.
    pub async fn close(self, with_will: bool) {
        if let Some(upstream) = self.upstream {
            upstream.close(!with_will).await;
        }
        self.state.sessions.close(self.info.session);
    }
}

/// What ends a session from outside its connection.
pub struct Ending {
    /// The credential, checked again after each configuration reload.
    identity: Identity,
    /// The rules now (a reload swaps them).
    live: Arc<Live>,
    /// The gateway's stop signal.
    shutdown: Shutdown,
    /// Counts the reloads; a change means the credential is checked again.
    updates: tokio::sync::watch::Receiver<u64>,
    /// The credential's expiry, when it has one; boxed so that a session without one
    /// pays nothing for the timer.
    expiry: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Fires when another connection takes the session over.
    takeover: Option<oneshot::Receiver<()>>,
    /// Where the device's session at IoT Core stands, once there is one.
    upstream: Option<watch::Receiver<upstream::State>>,
}

impl Ending {
    fn new(
        state: &AppState,
        identity: &Identity,
        takeover: Option<oneshot::Receiver<()>>,
    ) -> Ending {
        let mut updates = state.live.updates.subscribe();
        // A reload between the credential's check and here would go unnoticed.
        updates.mark_changed();
        let expiry = identity.expires_at_secs.map(|at| {
            let left = at.saturating_sub(crate::message::now_ms() / 1000);
            Box::pin(tokio::time::sleep(Duration::from_secs(
                left.saturating_add(1),
            )))
        });
        Ending {
            identity: identity.clone(),
            live: state.live.clone(),
            shutdown: state.shutdown.clone(),
            updates,
            expiry,
            takeover,
            upstream: None,
        }
    }

    /// Resolves when the session must end, saying why. Cancel-safe: a `select!` may
    /// drop it and call it again.
    pub async fn ended(&mut self) -> Ended {
        loop {
            tokio::select! {
                () = self.shutdown.wait() => return Ended::ShuttingDown,
                () = expired(&mut self.expiry) => {
                    return Ended::Expired(match self.identity.method {
                        crate::auth::Method::Certificate => AuthError::CertificateExpired,
                        _ => AuthError::TokenExpired,
                    });
                }
                () = taken_over(&mut self.takeover) => return Ended::TakenOver,
                ended = upstream_ended(&mut self.upstream) => return ended,
                Ok(()) = self.updates.changed() => {
                    let now = crate::message::now_ms() / 1000;
                    match self.live.still_valid(&self.identity, now) {
                        Ok(()) => {}
                        Err(AuthError::CertificateRevoked) => return Ended::Revoked,
                        Err(error) => return Ended::Expired(error),
                    }
                }
            }
        }
    }
}

/// Resolves at the credential's expiry; never without one.
async fn expired(expiry: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>) {
    match expiry {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Resolves when another connection takes over; never when none can (or the holder of
/// the client id is gone without saying so).
async fn taken_over(takeover: &mut Option<oneshot::Receiver<()>>) {
    match takeover {
        Some(receiver) => {
            if receiver.await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Resolves when the device's session at IoT Core is over (taken over by a connection
/// elsewhere, or lost); never while it lasts.
async fn upstream_ended(state: &mut Option<watch::Receiver<upstream::State>>) -> Ended {
    let Some(state) = state else {
        return std::future::pending().await;
    };
    let over = |state: &upstream::State| {
        matches!(state, upstream::State::TakenOver | upstream::State::Lost)
    };
    match state.wait_for(over).await.map(|state| *state) {
        Ok(upstream::State::TakenOver) => Ended::TakenOver,
        Ok(_) => Ended::UpstreamLost,
        Err(_) => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Method;

    fn identity(expires_at_secs: Option<u64>) -> Identity {
        Identity {
            device_id: "d1".to_string(),
            groups: Vec::new(),
            method: Method::Token,
            expires_at_secs,
            certificate: None,
            claims: Vec::new(),
        }
    }

    /// A session is listed while open, its accounting counts, and it ends with its
    /// credential: at the token's expiry, with that reason.
    #[tokio::test]
    async fn a_session_is_listed_counted_and_ends_with_its_credential() {
        let fixture = crate::testing::gateway("");
        let state = &fixture.state;
        // Valid to the end of this second: the session ends within a second or two.
        let expires = crate::message::now_ms() / 1000;
        let mut session =
            DeviceSession::open(state, &identity(Some(expires)), "mqtt", 8, None, None);
        session.received(3);
        session.answered(2);
        let listed = state.sessions.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].messages.load(Ordering::Relaxed), 3);
        assert_eq!(listed[0].in_flight.load(Ordering::Relaxed), 1);
        assert_eq!(listed[0].max_in_flight.load(Ordering::Relaxed), 3);
        assert_eq!(
            session.end.ended().await,
            Ended::Expired(AuthError::TokenExpired)
        );
        session.close(false).await;
        assert!(state.sessions.list().is_empty());
        state.sessions.all_closed().await;
    }

    /// Another connection taking the session over ends it with that reason.
    #[tokio::test]
    async fn a_takeover_ends_the_session() {
        let fixture = crate::testing::gateway("");
        let (take, takeover) = oneshot::channel();
        let mut session = DeviceSession::open(
            &fixture.state,
            &identity(None),
            "mqtt",
            8,
            None,
            Some(takeover),
        );
        take.send(()).unwrap();
        assert_eq!(session.end.ended().await, Ended::TakenOver);
        session.close(false).await;
    }

    /// Shutdown waits for open sessions: `all_closed` resolves once the last one closes.
    #[tokio::test]
    async fn all_closed_waits_for_the_last_session() {
        let fixture = crate::testing::gateway("");
        let state = fixture.state.clone();
        let session = DeviceSession::open(&state, &identity(None), "websocket", 8, None, None);
        let waiting = tokio::spawn(async move { state.sessions.all_closed().await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a session is still open");
        session.close(false).await;
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("all_closed resolves after the close")
            .unwrap();
    }
}
