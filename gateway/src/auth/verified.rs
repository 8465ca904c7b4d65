//! Tokens verified lately, shared by both kinds of token: a device sends the same token
//! with every request until it renews it, so its signature and claims are checked once,
//! not per request.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::auth::Identity;

/// At most this many tokens are kept; when full, the cache starts afresh.
const MAX_TOKENS: usize = 16_384;

/// Verified tokens with their identity and the second (since the Unix epoch) after which
/// they are refused. New keys (a configuration reload) start with an empty one.
#[derive(Default)]
pub struct Verified {
    tokens: Mutex<HashMap<String, (Identity, u64)>>,
}

impl Verified {
    /// The identity of `token`, verified before and still valid at `now`; an expired
    /// one is forgotten (the full check then says precisely why it is refused).
    pub fn get(&self, token: &str, now: u64) -> Option<Identity> {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        match tokens.get(token) {
            Some((identity, until)) if now <= *until => Some(identity.clone()),
            Some(_) => {
                tokens.remove(token);
                None
            }
            None => None,
        }
    }

    /// Keeps `token`'s identity until `until`.
    pub fn put(&self, token: &str, identity: &Identity, until: u64) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if tokens.len() >= MAX_TOKENS {
            tokens.clear();
        }
        tokens.insert(token.to_string(), (identity.clone(), until));
    }

    /// How many tokens are kept.
    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}
