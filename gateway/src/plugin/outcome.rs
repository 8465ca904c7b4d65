//! What the chain made of each input message: outputs to route (with a router's
//! choice), parts dropped, parts failed and why.

use crate::message::Message;
use crate::route::Destination;

/// Why a part of an input message did not go on to routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The plugin returned `fail` for it.
    Refused,
    /// The plugin trapped (a panic, an illegal operation).
    Trap,
    /// The call ran over its time limit.
    Timeout,
    /// The instance ran over its memory limit.
    MemoryLimit,
    /// The plugin returned the wrong number of outcomes.
    BadOutput,
    /// No instance of the plugin could be created.
    Unavailable,
}

impl FailureKind {
    /// Every kind, for listings.
    pub const ALL: [FailureKind; 6] = [
        FailureKind::Refused,
        FailureKind::Trap,
        FailureKind::Timeout,
        FailureKind::MemoryLimit,
        FailureKind::BadOutput,
        FailureKind::Unavailable,
    ];

    /// A stable code for API responses and dead-letter records.
    pub fn code(self) -> &'static str {
        match self {
            FailureKind::Refused => "plugin_refused",
            FailureKind::Trap => "plugin_trap",
            FailureKind::Timeout => "plugin_timeout",
            FailureKind::MemoryLimit => "plugin_memory_limit",
            FailureKind::BadOutput => "plugin_bad_output",
            FailureKind::Unavailable => "plugin_unavailable",
        }
    }
}

/// A message (or a part of one) that failed in a plugin.
pub struct PartFailure {
    /// The message as it entered the failing plugin.
    pub message: Message,
    /// The failing plugin.
    pub plugin: String,
    /// What went wrong.
    pub kind: FailureKind,
    /// In words.
    pub reason: String,
}

/// A router plugin's answer for one message.
pub struct RouterChoice {
    /// The router plugin's name.
    pub plugin: String,
    /// Its destination; `None` keeps the built-in decision.
    pub destination: Option<Destination>,
    /// Its reason.
    pub reason: String,
}

/// A message that made it through the transforms.
pub struct Output {
    /// The transformed message.
    pub message: Message,
    /// The router plugin's choice, if there is a router.
    pub router: Option<RouterChoice>,
}

/// What the chain made of one input message.
#[derive(Default)]
pub struct InputResult {
    /// Messages to route (several after a split).
    pub outputs: Vec<Output>,
    /// Parts discarded by a plugin.
    pub dropped: usize,
    /// Parts that failed.
    pub failures: Vec<PartFailure>,
}

impl InputResult {
    /// A message that no plugin touched.
    pub(super) fn passed(message: Message) -> InputResult {
        InputResult {
            outputs: vec![Output {
                message,
                router: None,
            }],
            ..InputResult::default()
        }
    }
}

/// Results for a batch no worker could take (the host is stopping).
pub(super) fn unavailable(count: usize, batch: Vec<Message>) -> Vec<InputResult> {
    let mut results: Vec<InputResult> = (0..count).map(|_| InputResult::default()).collect();
    for (result, message) in results.iter_mut().zip(batch) {
        result.failures.push(PartFailure {
            message,
            plugin: String::new(),
            kind: FailureKind::Unavailable,
            reason: "the plugin host is shutting down".to_string(),
        });
    }
    results
}
