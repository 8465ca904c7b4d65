//! Whether the gateway is ready for traffic, and why not, as `GET /readyz` and the
//! console both say it: a sink that is failing (its records wait in the spool), devices
//! that cannot authenticate yet (the identity provider's keys never read, no recent
//! snapshot of the registered certificates).

use crate::auth::Authenticator;
use crate::auth::registry::Registry;
use crate::pipeline::Pipeline;

/// The reasons the gateway is not ready; none when it is.
pub fn not_ready_reasons(
    pipeline: &Pipeline,
    auth: &Authenticator,
    registry: Option<&Registry>,
) -> Vec<String> {
    let auth = auth
        .not_ready()
        .into_iter()
        .chain(registry.and_then(Registry::not_ready));
    pipeline
        .spool()
        .failing_sinks()
        .into_iter()
        .map(|sink| {
            format!(
                "the {} sink is failing; records wait in the spool",
                sink.name()
            )
        })
        .chain(auth)
        .collect()
}
