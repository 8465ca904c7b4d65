//! Per-device throughput, for the "high-throughput producer" row of the routing table.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Devices not heard from for this many one-second windows are forgotten.
const FORGET_AFTER_WINDOWS: u64 = 10;

/// Bytes per second per device, measured over whole one-second windows.
///
/// The rate reported is the larger of the last complete window and the current one, so a
/// burst counts at once and a quiet device drops back within two seconds.
pub struct ThroughputMeter {
    /// When the meter started; windows are whole seconds since then.
    start: Instant,
    /// Per device: (window index, bytes in that window, bytes in the window before).
    devices: Mutex<HashMap<String, (u64, u64, u64)>>,
}

impl Default for ThroughputMeter {
    fn default() -> Self {
        ThroughputMeter {
            start: Instant::now(),
            devices: Mutex::new(HashMap::new()),
        }
    }
}

impl ThroughputMeter {
    /// Counts `bytes` from `device` and returns its current rate in bytes per second.
    pub fn record(&self, device: &str, bytes: u64) -> u64 {
        let window = self.start.elapsed().as_secs();
        let mut devices = self
            .devices
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let rate = match devices.get_mut(device) {
            Some(entry) => {
                advance(entry, window);
                entry.1 += bytes;
                entry.1.max(entry.2)
            }
            None => {
                devices.insert(device.to_string(), (window, bytes, 0));
                bytes
            }
        };
        // Forgetting stale devices now and then keeps the map as large as the active fleet.
        if devices.len() > 1024 && window.is_multiple_of(FORGET_AFTER_WINDOWS) {
            devices.retain(|_, (seen, _, _)| window.saturating_sub(*seen) < FORGET_AFTER_WINDOWS);
        }
        rate
    }
}

/// Moves a device's counters forward to `window`.
fn advance(entry: &mut (u64, u64, u64), window: u64) {
    let (seen, current, _) = *entry;
    *entry = match window.saturating_sub(seen) {
        0 => return,
        1 => (window, 0, current),
        _ => (window, 0, 0),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_roll_forward() {
        let mut entry = (5, 700, 100);
        advance(&mut entry, 5);
        assert_eq!(entry, (5, 700, 100));
        advance(&mut entry, 6);
        assert_eq!(entry, (6, 0, 700));
        advance(&mut entry, 9);
        assert_eq!(entry, (9, 0, 0));
    }

    #[test]
    fn rates_add_up_within_a_window() {
        let meter = ThroughputMeter::default();
        assert_eq!(meter.record("a", 100), 100);
        let second = meter.record("a", 50);
        // Both calls normally land in the same second; if the second rolled over, the
        // previous window's 100 bytes still count.
        assert!(second == 150 || second == 100, "{second}");
        assert_eq!(meter.record("b", 7), 7);
    }
}
