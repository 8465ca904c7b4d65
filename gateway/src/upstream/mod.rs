//! Each receiving device's own MQTT 5 session at IoT Core, under its client id.
//!
//! Sluice is a transparent proxy for what a device receives: the gateway connects to
//! IoT Core *as the device* (its client id, the gateway's certificate; IoT Core's policy
//! for that certificate lets it use any client id of the fleet, Sluice's own policy
//! decides what each device may do). IoT Core then does what it does for a device
//! connected directly: it answers shadow, jobs and provisioning requests on that
//! session, delivers retained messages on subscribe, queues QoS 1 messages while a
//! persistent session's device is away, publishes the device's will when the
//! connection drops, emits its lifecycle events and applies its limits per device.
//! Because the session lives at IoT Core, a device that reconnects to another Sluice
//! instance resumes it there (IoT Core's takeover closes the old connection).
//!
//! - [`session`]: one device's session: subscriptions, publishes passed through and
//!   their acknowledgements, messages for the device, attempts to connect until it is
//!   made (a connection lost after that ends the session, and the device's with it).
//! - [`wire`]: a session's connection: TLS, the CONNECT exchange, MQTT 5 packets in and
//!   out with nothing held between them.
//! - [`pace`]: CONNECTs spread over time (the gateway's rate, one a second per client
//!   id).
//! - [`commands`]: messages as commands with ids, and where the replies go, for devices
//!   that cannot speak MQTT to the endpoint themselves.
//! - [`held`]: sessions held open between a device's requests (HTTP long-polls).
//! - [`properties`]: a message's MQTT 5 properties, as a publish there carries them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::UpstreamConfig;

pub mod commands;
pub mod held;
pub mod pace;
pub mod properties;
pub mod session;
pub mod wire;

pub use session::{Failure, Link, Spec, State, UpstreamSession};

/// The endpoint and what every device session shares.
pub struct Upstream {
    /// The endpoint and its limits.
    settings: UpstreamConfig,
    /// The gateway's client certificate and the endpoint's CA.
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    /// CONNECTs spread over time.
    pace: pace::Pace,
    /// Whether the last CONNECT of any session succeeded: while the endpoint is known to
    /// be down, a device's CONNECT does not wait for its session there (and stops
    /// waiting when another session finds it down).
    reachable: watch::Sender<bool>,
    /// Client ids whose session the endpoint no longer had after a device was told it
    /// went on: their next CONNECT hears the truth (session present 0).
    forgotten: Mutex<HashSet<String>>,
    /// Each device's latest session, for its telemetry.
    links: Mutex<HashMap<String, Weak<Link>>>,
}

/// The longest a device's CONNACK waits for its session at the endpoint: device
/// clients give up on a CONNACK after a few seconds (rumqttc 5 s).
pub const CONNACK_WAIT: Duration = Duration::from_secs(2);

impl Upstream {
    /// Reads the TLS material; connects nothing yet.
    pub fn new(settings: UpstreamConfig) -> anyhow::Result<Arc<Upstream>> {
        let tls = crate::tls::client_config(&settings.ca, &settings.cert, &settings.key)?;
        Ok(Arc::new(Upstream {
            pace: pace::Pace::new(settings.connects_per_sec),
            tls: Arc::new(tls),
            settings,
            reachable: watch::Sender::new(true),
            forgotten: Mutex::new(HashSet::new()),
            links: Mutex::new(HashMap::new()),
        }))
    }

    /// Opens `spec`'s session (it connects in the background).
    pub fn open(self: &Arc<Self>, spec: Spec) -> UpstreamSession {
        UpstreamSession::open(self.clone(), spec)
    }

    /// The endpoint's settings.
    pub fn settings(&self) -> &UpstreamConfig {
        &self.settings
    }

    /// How long a subscribe or a request passed through waits for the endpoint.
    pub fn answer_timeout(&self) -> Duration {
        Duration::from_millis(self.settings.answer_timeout_ms)
    }

    /// Whether the endpoint answered the last CONNECT.
    pub fn reachable(&self) -> bool {
        *self.reachable.borrow()
    }

    /// Resolves once a session finds the endpoint down.
    async fn found_down(&self) {
        let mut reachable = self.reachable.subscribe();
        let _ = reachable.wait_for(|up| !up).await;
    }

    /// Whether the endpoint lost `client_id`'s session after its device was told it
    /// went on (once: the answer is taken).
    pub fn take_forgotten(&self, client_id: &str) -> bool {
        self.forgotten
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(client_id)
    }

    fn forget(&self, client_id: &str) {
        self.forgotten
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(client_id.to_string());
    }

    /// `device`'s session, when it has one connected now: its telemetry goes through it.
    pub fn link_for(&self, device: &str) -> Option<Arc<Link>> {
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links
            .get(device)
            .and_then(Weak::upgrade)
            .filter(|link| link.is_connected())
    }

    /// `link` is `device`'s latest session.
    fn listed(&self, device: &str, link: &Arc<Link>) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.insert(device.to_string(), Arc::downgrade(link));
    }

    /// `link`'s session is over (unless a later one of the device replaced it).
    fn unlisted(&self, device: &str, link: &Arc<Link>) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if links
            .get(device)
            .is_some_and(|listed| std::ptr::eq(listed.as_ptr(), Arc::as_ptr(link)))
        {
            links.remove(device);
        }
    }

    fn connected(&self, yes: bool) {
        self.reachable
            .send_if_modified(|up| std::mem::replace(up, yes) != yes);
    }
}
