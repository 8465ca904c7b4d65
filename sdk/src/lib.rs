//! Write plugins for the [Sluice] IoT gateway in Rust.
//!
//! A plugin is a WebAssembly component that the gateway runs on every message. There are
//! two kinds:
//!
//! - a **transform** changes, drops, splits or refuses messages ([`Transform`],
//!   exported with [`export_transform!`]);
//! - a **router** chooses where each message goes: AWS IoT Core, a Kinesis data stream,
//!   the local sink, the dead-letter store, or nowhere ([`Route`], exported with
//!   [`export_router!`]).
//!
//! You add this crate as your only dependency, implement one trait, and invoke one macro.
//! The contract underneath is the WIT package `sluice:plugin@0.1.0` (in the repository's
//! `wit/` folder); you never need to touch its generated bindings.
//!
//! # A complete transform plugin
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "shout"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! sluice-sdk = { path = "../../sdk" }
//! ```
//!
//! `src/lib.rs`:
//!
//! ```
//! use sluice_sdk::{Config, Message, Outcome, Transform};
//!
//! /// Upper-cases text payloads; refuses binary ones unless configured to pass them.
//! struct Shout {
//!     pass_binary: bool,
//! }
//!
//! impl Transform for Shout {
//!     fn init(config: &Config) -> Result<Self, String> {
//!         Ok(Shout { pass_binary: config.get_bool("pass_binary", false)? })
//!     }
//!
//!     fn transform(&mut self, mut message: Message) -> Outcome {
//!         match std::str::from_utf8(&message.payload) {
//!             Ok(text) => {
//!                 message.payload = text.to_uppercase().into_bytes();
//!                 sluice_sdk::counter_add("shouted", 1);
//!                 Outcome::Keep(message)
//!             }
//!             Err(_) if self.pass_binary => Outcome::Keep(message),
//!             Err(_) => Outcome::Fail("payload is not UTF-8 text".to_string()),
//!         }
//!     }
//! }
//!
//! sluice_sdk::export_transform!(Shout);
//! # fn main() {}
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` (install the target once
//! with `rustup target add wasm32-wasip2`) and point the gateway at
//! `target/wasm32-wasip2/release/shout.wasm`. Try it offline on sample messages with
//! `sluice plugin run shout.wasm --input messages.jsonl`.
//!
//! # What a plugin may do
//!
//! Plugins see only what the gateway hands them: the messages, their configuration, a
//! [`log`] function and [`counter_add`]. They have no filesystem, network, environment
//! variables or clock (use [`Message::received_at_ms`] for time). Each call has a time
//! limit and each instance a memory limit; a plugin that traps, loops or runs out of memory
//! fails only the batch it was working on, and the gateway starts it afresh.
//!
//! [Sluice]: https://github.com/sluice-gateway/sluice

// The generated bindings name this crate by its public path, `sluice_sdk::…`, so the
// export macros work from plugin crates; this alias makes that path valid in here too.
extern crate self as sluice_sdk;

/// Generated bindings for the two worlds. Public only so the export macros can reach
/// them; plugin authors use the re-exports at the crate root instead.
#[doc(hidden)]
pub mod bindings {
    /// The `transform` world, which also owns the shared `types` and `host` imports.
    pub mod transform {
        wit_bindgen::generate!({
            path: "../wit",
            world: "sluice:plugin/transform",
            pub_export_macro: true,
            export_macro_name: "__export_transform_world",
            default_bindings_module: "sluice_sdk::bindings::transform",
            runtime_path: "sluice_sdk::__private::wit_bindgen::rt",
        });
    }

    /// The `router` world, reusing the transform world's `types` and `host` bindings.
    pub mod router {
        wit_bindgen::generate!({
            path: "../wit",
            world: "sluice:plugin/router",
            pub_export_macro: true,
            export_macro_name: "__export_router_world",
            default_bindings_module: "sluice_sdk::bindings::router",
            runtime_path: "sluice_sdk::__private::wit_bindgen::rt",
            with: {
                "sluice:plugin/types@0.1.0": crate::bindings::transform::sluice::plugin::types,
                "sluice:plugin/host@0.1.0": crate::bindings::transform::sluice::plugin::host,
            },
        });
    }
}

mod config;
mod message;
mod state;

pub use crate::bindings::router::exports::sluice::plugin::routing::{
    Decision, Destination, IotCoreTarget, KinesisTarget,
};
pub use crate::bindings::transform::exports::sluice::plugin::transformer::Outcome;
pub use crate::bindings::transform::sluice::plugin::host::Level;
pub use crate::bindings::transform::sluice::plugin::types::Message;
pub use crate::config::Config;

/// A transform plugin: called with every message (in batches) before routing.
///
/// The gateway creates one instance per worker thread with [`Transform::init`] and then
/// calls [`Transform::transform_batch`] for each batch. The default `transform_batch`
/// calls [`Transform::transform`] once per message, which is what most plugins want.
pub trait Transform: Sized + 'static {
    /// Builds the plugin from its configuration (the `config` table of its entry in the
    /// gateway configuration). An `Err` refuses the plugin at load time with that text.
    fn init(config: &Config) -> Result<Self, String>;

    /// Decides what happens to one message.
    fn transform(&mut self, message: Message) -> Outcome;

    /// Decides for a whole batch; must return one outcome per input, in order.
    fn transform_batch(&mut self, batch: Vec<Message>) -> Vec<Outcome> {
        batch
            .into_iter()
            .map(|message| self.transform(message))
            .collect()
    }
}

/// A router plugin: chooses the destination of every message after the transforms ran.
///
/// Returning a [`Decision`] whose `destination` is `None` keeps the gateway's built-in
/// choice (see [`Decision::builtin`]).
pub trait Route: Sized + 'static {
    /// Builds the plugin from its configuration. An `Err` refuses the plugin at load time.
    fn init(config: &Config) -> Result<Self, String>;

    /// Decides for one message.
    fn route(&mut self, message: &Message) -> Decision;

    /// Decides for a whole batch; must return one decision per input, in order.
    fn route_batch(&mut self, batch: &[Message]) -> Vec<Decision> {
        batch.iter().map(|message| self.route(message)).collect()
    }
}

impl Decision {
    /// Keeps the gateway's built-in routing decision for this message.
    pub fn builtin(reason: impl Into<String>) -> Self {
        Decision {
            destination: None,
            reason: reason.into(),
        }
    }

    /// Sends the message to `destination`, recording `reason`.
    pub fn to(destination: Destination, reason: impl Into<String>) -> Self {
        Decision {
            destination: Some(destination),
            reason: reason.into(),
        }
    }
}

/// Writes a structured log record through the gateway's logging, tagged with the
/// plugin's name. `fields` are extra key/value pairs.
pub fn log(level: Level, message: &str, fields: &[(&str, &str)]) {
    let fields: Vec<(String, String)> = fields
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    crate::bindings::transform::sluice::plugin::host::log(level, message, &fields);
}

/// Adds `delta` to this plugin's counter `name`; the gateway reports plugin counters
/// alongside its own statistics. Use a fixed set of names: a plugin gets at most 100, of
/// up to 64 bytes; counts under further names are added to `_other`.
pub fn counter_add(name: &str, delta: u64) {
    crate::bindings::transform::sluice::plugin::host::counter_add(name, delta);
}

/// Exports a [`Transform`] implementation as the plugin's entry point.
///
/// Invoke it once, at the root of a `cdylib` crate built for `wasm32-wasip2`.
#[macro_export]
macro_rules! export_transform {
    ($plugin:ty) => {
        const _: () = {
            struct SluiceTransformExport;

            impl $crate::__private::TransformGuest for SluiceTransformExport {
                fn init(
                    config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::core::result::Result<(), ::std::string::String> {
                    $crate::__private::init::<$plugin>(config, <$plugin as $crate::Transform>::init)
                }

                fn transform(
                    batch: ::std::vec::Vec<$crate::Message>,
                ) -> ::std::vec::Vec<$crate::Outcome> {
                    $crate::__private::run_transform::<$plugin>(batch)
                }
            }

            $crate::bindings::transform::__export_transform_world!(SluiceTransformExport);
        };
    };
}

/// Exports a [`Route`] implementation as the plugin's entry point.
///
/// Invoke it once, at the root of a `cdylib` crate built for `wasm32-wasip2`.
#[macro_export]
macro_rules! export_router {
    ($plugin:ty) => {
        const _: () = {
            struct SluiceRouterExport;

            impl $crate::__private::RouterGuest for SluiceRouterExport {
                fn init(
                    config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::core::result::Result<(), ::std::string::String> {
                    $crate::__private::init::<$plugin>(config, <$plugin as $crate::Route>::init)
                }

                fn route(
                    batch: ::std::vec::Vec<$crate::Message>,
                ) -> ::std::vec::Vec<$crate::Decision> {
                    $crate::__private::run_router::<$plugin>(batch)
                }
            }

            $crate::bindings::router::__export_router_world!(SluiceRouterExport);
        };
    };
}

/// Support for the export macros; not part of the public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::bindings::router::exports::sluice::plugin::routing::Guest as RouterGuest;
    pub use crate::bindings::transform::exports::sluice::plugin::transformer::Guest as TransformGuest;
    pub use crate::state::{init, run_router, run_transform};
    pub use wit_bindgen;
}
