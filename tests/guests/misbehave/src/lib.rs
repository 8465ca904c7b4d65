//! A transform that misbehaves on request, for the gateway's failure-path tests.
//!
//! The payload says what to do: `loop` spins forever, `alloc` allocates until memory
//! runs out, `trap` panics (a WebAssembly trap), `fail` returns a `fail` outcome, `log`
//! writes a warning through the host's log (with the topic as a field) and passes;
//! anything else is kept unchanged.

use sluice_sdk::{Config, Message, Outcome, Transform};

struct Misbehave;

impl Transform for Misbehave {
    fn init(_config: &Config) -> Result<Self, String> {
        Ok(Misbehave)
    }

    fn transform(&mut self, message: Message) -> Outcome {
        match message.payload.as_slice() {
            b"loop" => loop {
                std::hint::spin_loop();
            },
            b"alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            b"trap" => panic!("asked to trap"),
            b"fail" => Outcome::Fail("asked to fail".to_string()),
            b"log" => {
                sluice_sdk::log(
                    sluice_sdk::Level::Warn,
                    "asked to log",
                    &[("topic", &message.topic)],
                );
                Outcome::Pass
            }
            _ => Outcome::Pass,
        }
    }
}

sluice_sdk::export_transform!(Misbehave);
