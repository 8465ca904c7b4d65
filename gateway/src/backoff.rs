//! Waiting between attempts, for every retry loop (a sink's refused or throttled
//! records, a sink the spool cannot reach, a broker connection lost): one exponential
//! backoff, with or without jitter.

use std::time::Duration;

/// Exponential backoff: `first` before the first retry, doubling per attempt up to `max`.
/// With `jitter`, each pause is drawn from the upper half of that (so that gateways
/// throttled together do not retry in lockstep).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The pause before the first retry.
    pub first: Duration,
    /// The longest pause.
    pub max: Duration,
    /// Whether pauses are drawn between half and all of the exponential value.
    pub jitter: bool,
}

impl Backoff {
    /// The pause before retry number `attempt` (1 for the first; 0 counts as 1).
    pub fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(20);
        let ceiling = self.first.saturating_mul(1 << doublings).min(self.max);
        if self.jitter {
            ceiling.mul_f64(0.5 + rand::random::<f64>() / 2.0)
        } else {
            ceiling
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_limit_and_jitter_stays_in_the_upper_half() {
        let plain = Backoff {
            first: Duration::from_millis(100),
            max: Duration::from_secs(5),
            jitter: false,
        };
        let cases = [
            (0, 100),
            (1, 100),
            (2, 200),
            (4, 800),
            (7, 5_000),
            (40, 5_000),
        ];
        for (attempt, ms) in cases {
            assert_eq!(plain.delay(attempt), Duration::from_millis(ms), "{attempt}");
        }
        let jittered = Backoff {
            jitter: true,
            ..plain
        };
        for attempt in 1..40 {
            let ceiling = plain.delay(attempt);
            let delay = jittered.delay(attempt);
            assert!(
                delay <= ceiling && delay >= ceiling / 2,
                "{attempt}: {delay:?}"
            );
        }
    }
}
