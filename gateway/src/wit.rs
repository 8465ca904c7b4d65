//! Host bindings for the WIT package `sluice:plugin` (the repository's `wit/` folder).

/// The `transform` world; it also owns the shared `types` and `host` interfaces.
#[allow(unsafe_code, missing_docs, clippy::all)]
pub mod transform {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "sluice:plugin/transform",
        exports: { default: async },
    });
}

/// The `router` world, sharing the transform world's `types` and `host` bindings.
#[allow(unsafe_code, missing_docs, clippy::all)]
pub mod router {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "sluice:plugin/router",
        exports: { default: async },
        with: {
            "sluice:plugin/types": super::transform::sluice::plugin::types,
            "sluice:plugin/host": super::transform::sluice::plugin::host,
        },
    });
}

pub use self::router::exports::sluice::plugin::routing::{Decision, Destination};
pub use self::transform::exports::sluice::plugin::transformer::Outcome;
pub use self::transform::sluice;
