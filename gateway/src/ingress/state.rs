//! What the device-facing routes and sessions share.

use std::sync::Arc;

use crate::ingress::admit::DeviceRules;
use crate::ingress::live::Live;
use crate::ingress::mqtt::clients::Clients;
use crate::ingress::sessions::Sessions;
use crate::pipeline::Pipeline;
use crate::shutdown::Shutdown;

/// What the routes share.
#[derive(Clone)]
pub struct AppState {
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

impl AppState {
    /// The device rules now: a request uses the ones it started with.
    pub fn rules(&self) -> Arc<DeviceRules> {
        self.live.rules.load_full()
    }
}
