//! The device side: listeners, protocols, and the admission step they share.
//!
//! - [`listener`]: the accept loop (plain HTTP or HTTPS), every connection under a
//!   [`guard`] (connection limit, handshake, first-request and idle timeouts);
//! - [`http`]: the HTTP routes (IoT Core's publish API, batches, long-poll commands);
//! - [`ws`]: WebSocket sessions (`sluice.v1`);
//! - [`mqtt`]: MQTT 3.1.1 and 5.0 over TLS, by ALPN, and over WebSocket (`GET /mqtt`);
//! - [`admit`]: the checks every protocol's messages pass before the pipeline, and the
//!   refusals ([`admit::ApiError`]);
//! - [`live`]: what a configuration reload swaps (device rules, TLS acceptor);
//! - [`state`]: what the routes share; [`sessions`]: the open sessions.

pub mod admit;
pub mod guard;
pub mod http;
pub mod listener;
pub mod live;
pub mod mqtt;
pub mod sessions;
pub mod state;
pub mod ws;
