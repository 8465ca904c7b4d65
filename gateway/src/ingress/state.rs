//! What the device-facing routes and sessions share.

use std::sync::Arc;

use crate::ingress::admit::DeviceRules;
use crate::ingress::live::Live;
use crate::ingress::mqtt::clients::Clients;
use crate::ingress::sessions::Sessions;
use crate::pipeline::Pipeline;
use crate::shutdown::Shutdown;

/// What the routes share, behind one `Arc`: axum clones the state for every request
/// (each extractor and middleware that takes it), and a clone is then one counter's
/// increment, not one per shared part (dropping a field-by-field clone was 1.7% of an
/// HTTP request's CPU).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    /// The state around `shared`.
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct Shared {
    /// The message path.
    pub pipeline: Arc<Pipeline>,
    /// Authentication, policy and limits; a configuration reload swaps them.
    pub live: Arc<Live>,
    /// Fires when the gateway stops (WebSocket sessions close with 1001).
    pub shutdown: Shutdown,
    /// Fires when the gateway starts leaving, before it stops: `/readyz` is red and
    /// HTTP requests are refused (`503 leaving`).
    pub leaving: Shutdown,
    /// Open WebSocket sessions.
    pub sessions: Arc<Sessions>,
    /// IoT Core's endpoint for the devices' own sessions, when configured.
    pub upstream: Option<Arc<crate::upstream::Upstream>>,
    /// The sessions at IoT Core of devices that poll for commands (with `upstream`).
    pub held: Option<Arc<crate::upstream::held::Held>>,
    /// IoT Core's data plane for the Device Shadow routes (with `[sinks.iot_core]`).
    pub shadows: Option<Arc<crate::shadow::Shadows>>,
    /// MQTT client ids connected here (a second connection takes one over).
    pub mqtt_clients: Arc<Clients>,
}

impl Shared {
    /// The device rules now: a request uses the ones it started with.
    pub fn rules(&self) -> Arc<DeviceRules> {
        self.live.rules.load_full()
    }
}
