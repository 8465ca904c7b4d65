//! The device side: listeners, protocols, and the protocol-neutral device core under
//! them.
//!
//! - [`listener`]: the device listener (HTTP or HTTPS, MQTT by ALPN) and `[mqtt] listen`,
//!   and the one shutdown sequence that ends their connections and sessions;
//! - [`accept`]: the one accept path every listener takes (under a [`guard`]: connection
//!   limit, handshake, first-request and idle timeouts; TLS, the peer's identity, the
//!   protocol by ALPN);
//! - [`http`]: the HTTP routes (IoT Core's publish API, batches, long-poll commands);
//! - [`ws`]: WebSocket sessions (`sluice.v1`);
//! - [`mqtt`]: MQTT 3.1.1 and 5.0 over TLS, by ALPN, and over WebSocket (`GET /mqtt`);
//!
//! and the core every protocol shares, written once:
//!
//! - [`device`]: the device of an HTTP request (its credential, authenticated);
//! - [`session`]: the session shell of every long-lived protocol (registration, why it
//!   ends, the device's session at IoT Core, accounting);
//! - [`commands`]: commands for the devices that cannot subscribe (the WebSocket dialect,
//!   HTTP long-polls), through their own sessions at IoT Core, and their replies;
//! - [`admit`]: the checks every protocol's messages pass before the pipeline;
//! - [`verdict`]: what a device is told about each message, accepted or refused, which
//!   each protocol maps once to its wire form;
//! - [`live`]: what a configuration reload swaps (device rules, TLS acceptor);
//! - [`state`]: what the routes share; [`sessions`]: the open sessions.

pub mod accept;
pub mod admit;
pub mod commands;
pub mod device;
pub mod guard;
pub mod http;
pub mod listener;
pub mod live;
pub mod mqtt;
pub mod session;
pub mod sessions;
pub mod state;
pub mod verdict;
pub mod ws;
