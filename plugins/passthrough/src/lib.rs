//! Keeps every message exactly as it came. It measures what the gateway's plugin host
//! costs on its own, and it is the smallest possible starting point for a new plugin.

use sluice_sdk::{Config, Message, Outcome, Transform};

struct Passthrough;

impl Transform for Passthrough {
    fn init(_config: &Config) -> Result<Self, String> {
        Ok(Passthrough)
    }

    fn transform(&mut self, _message: Message) -> Outcome {
        Outcome::Pass
    }
}

sluice_sdk::export_transform!(Passthrough);
