//! The open device sessions (WebSocket `sluice.v1` and MQTT), for the admin API's device
//! list and the metrics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::auth::Identity;
use crate::message::now_ms;

/// The open sessions, for the admin API's device list.
#[derive(Default)]
pub struct Sessions {
    /// The last session number handed out.
    next: AtomicU64,
    /// The open sessions by number.
    open: Mutex<HashMap<u64, Arc<SessionInfo>>>,
    /// Wakes [`Sessions::all_closed`] when a session closes.
    closed: tokio::sync::Notify,
}

/// One session, as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct SessionInfo {
    /// The session number (unique in this process).
    pub session: u64,
    /// The device.
    pub device: String,
    /// `websocket`, `mqtt` (over TLS or TCP) or `mqtt-ws` (MQTT over WebSocket).
    pub protocol: &'static str,
    /// How it authenticated.
    pub auth: crate::auth::Method,
    /// When it connected (milliseconds since the Unix epoch).
    pub connected_at_ms: u64,
    /// Messages received.
    pub messages: AtomicU64,
    /// Messages received and not yet acknowledged.
    pub in_flight: AtomicU64,
    /// The most that were ever in flight (at most the window).
    pub max_in_flight: AtomicU64,
    /// The window.
    pub window: usize,
    /// The address the connection comes from (`IP:port`).
    pub remote: Option<String>,
    /// Commands sent to the device on this session.
    pub commands: AtomicU64,
}

/// The address a device connection comes from: the listener puts it on every request
/// of the connection (an extension), for the sessions opened on it.
#[derive(Debug, Clone, Copy)]
pub struct RemoteAddr(pub std::net::SocketAddr);

impl Sessions {
    /// Registers a session of `identity` over `protocol` with `window` messages in flight
    /// at most, on a connection from `remote`.
    pub fn open(
        &self,
        identity: &Identity,
        protocol: &'static str,
        window: usize,
        remote: Option<std::net::SocketAddr>,
    ) -> Arc<SessionInfo> {
        let session = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let info = Arc::new(SessionInfo {
            session,
            device: identity.device_id.clone(),
            protocol,
            auth: identity.method,
            connected_at_ms: now_ms(),
            messages: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            window,
            remote: remote.map(|address| address.to_string()),
            commands: AtomicU64::new(0),
        });
        self.lock().insert(session, info.clone());
        info
    }

    /// Forgets session `session`.
    pub fn close(&self, session: u64) {
        self.lock().remove(&session);
        self.closed.notify_waiters();
    }

    /// Resolves once no session is open (at shutdown, when they are all ending).
    pub async fn all_closed(&self) {
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            // Registered before looking, so that a close in between is not missed.
            closed.as_mut().enable();
            if self.lock().is_empty() {
                return;
            }
            closed.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<SessionInfo>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open sessions, oldest first.
    pub fn list(&self) -> Vec<Arc<SessionInfo>> {
        let mut all: Vec<_> = self.lock().values().cloned().collect();
        all.sort_by_key(|info| info.session);
        all
    }
}
