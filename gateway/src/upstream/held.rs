//! Sessions held open between a device's requests (HTTP long-polls), since no connection
//! of the device holds them: a device's session at the endpoint stays connected for the
//! idle time after its last use, the messages that came meanwhile waiting in it,
//! unacknowledged at the endpoint (which queues more QoS 1 messages once the session's
//! receive maximum is reached). Then it is closed politely, and the endpoint keeps it
//! for its session expiry. One sweep closes the idle sessions, and all of them when the
//! gateway stops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OwnedMutexGuard;

use crate::shutdown::Shutdown;
use crate::upstream::commands::Recent;
use crate::upstream::{Spec, Upstream, UpstreamSession};

/// A device's held session.
pub struct HeldSession {
    /// `None` once the sweep closed it.
    session: Option<UpstreamSession>,
    /// Where replies to the commands it delivered go.
    recent: Recent,
    last_used: Instant,
}

impl HeldSession {
    /// The session at the endpoint, and where the replies to its commands go.
    pub fn parts(&mut self) -> (&mut UpstreamSession, &mut Recent) {
        let session = self
            .session
            .as_mut()
            .expect("Held::session hands out open sessions only");
        (session, &mut self.recent)
    }
}

type Slot = Arc<tokio::sync::Mutex<HeldSession>>;

/// The held sessions, by client id.
pub struct Held {
    upstream: Arc<Upstream>,
    idle: Duration,
    sessions: Mutex<HashMap<String, Slot>>,
}

impl Held {
    /// No sessions yet; the sweep runs until `shutdown`, then closes them all.
    pub fn start(upstream: Arc<Upstream>, idle: Duration, shutdown: Shutdown) -> Arc<Held> {
        let held = Arc::new(Held {
            upstream,
            idle,
            sessions: Mutex::new(HashMap::new()),
        });
        tokio::spawn(held.clone().sweep(shutdown));
        held
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `spec`'s session, for the caller alone until the guard is dropped: the one held
    /// if it is still going, otherwise a new one (opened without waiting for the
    /// endpoint). Its idle time starts again.
    pub async fn session(&self, spec: Spec) -> OwnedMutexGuard<HeldSession> {
        loop {
            let slot = self
                .lock()
                .entry(spec.client_id.clone())
                .or_insert_with(|| {
                    Arc::new(tokio::sync::Mutex::new(HeldSession {
                        session: None,
                        recent: Recent::default(),
                        last_used: Instant::now(),
                    }))
                })
                .clone();
            let mut held = slot.clone().lock_owned().await;
            // Swept while this caller waited: the slot left the map; take the next one.
            let current = self
                .lock()
                .get(&spec.client_id)
                .is_some_and(|now| Arc::ptr_eq(now, &slot));
            if !current {
                continue;
            }
            if held.session.as_ref().is_none_or(UpstreamSession::is_over) {
                held.session = Some(self.upstream.open(spec.clone()));
                held.recent = Recent::default();
            }
            held.last_used = Instant::now();
            return held;
        }
    }

    /// Every so often, closes the sessions idle past their time (or over at the
    /// endpoint); all of them at `shutdown`.
    async fn sweep(self: Arc<Self>, mut shutdown: Shutdown) {
        let every = (self.idle / 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
        let mut tick = tokio::time::interval(every);
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                () = shutdown.wait() => true,
            };
            let mut closing = Vec::new();
            self.lock().retain(|_, slot| {
                // In use now: not idle.
                let Ok(mut held) = slot.try_lock() else {
                    return true;
                };
                let done = stopping
                    || held.last_used.elapsed() >= self.idle
                    || held.session.as_ref().is_none_or(UpstreamSession::is_over);
                if done && let Some(session) = held.session.take() {
                    closing.push(session);
                }
                !done
            });
            for session in closing {
                session.close(true).await;
            }
            if stopping {
                return;
            }
        }
    }
}
