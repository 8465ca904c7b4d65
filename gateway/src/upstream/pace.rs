//! The pace of CONNECTs to the endpoint: IoT Core limits connect requests per account
//! (and per client id to one a second), and a gateway that restarts with 10,000 devices
//! must not spend them all in its first second.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The least time between two CONNECTs of one client id (IoT Core's limit).
pub const PER_CLIENT_ID: Duration = Duration::from_secs(1);

/// Hands out turns to connect, evenly spaced at the gateway's rate.
pub struct Pace {
    /// The time between two turns.
    interval: Duration,
    /// The earliest time the next turn may start.
    next: Mutex<Instant>,
}

impl Pace {
    /// Turns at `per_sec` a second (at least one).
    pub fn new(per_sec: u32) -> Pace {
        Pace {
            interval: Duration::from_secs(1) / per_sec.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// Waits for this caller's turn. Turns are reserved in the order of the calls, so
    /// that a burst of sessions is spread over time instead of refused.
    pub async fn turn(&self) {
        let at = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let at = (*next).max(Instant::now());
            *next = at + self.interval;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Six turns at 50 a second, taken at once by six callers, are spread over at least
    /// 100 ms: the first at once, then one every 20 ms.
    #[tokio::test]
    async fn turns_are_spaced_at_the_rate() {
        let pace = std::sync::Arc::new(Pace::new(50));
        let start = Instant::now();
        let turns: Vec<_> = (0..6)
            .map(|_| {
                let pace = pace.clone();
                tokio::spawn(async move { pace.turn().await })
            })
            .collect();
        for turn in turns {
            turn.await.unwrap();
        }
        assert!(start.elapsed() >= Duration::from_millis(100));
    }
}
