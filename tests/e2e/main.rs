//! End-to-end tests: the real `sluice` binary, driven over HTTP(S), its effects read back
//! from the local sink's files. Plugins come from `scripts/build-plugins`.

mod harness;

mod balancer;
mod cli;
mod cloud;
mod commands;
mod console;
mod devices;
mod durability;
mod failures;
mod hardening;
mod http;
mod instances;
mod js_plugins;
mod mqtt;
mod mqtt_sessions;
mod net;
mod operate;
mod plugin_new;
mod plugins;
mod provider_tokens;
mod py_plugins;
mod raw_mqtt;
mod refusals;
mod registry;
mod reload;
mod routing;
mod shadows;
mod synced;
mod upstream;
mod websocket;
mod wsclient;
