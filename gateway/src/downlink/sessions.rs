//! The device side of the downlink: sessions attach to their device's queue, take its
//! commands, confirm them and detach; an HTTP long-poll waits on the queue.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::downlink::{Command, Downlink};

/// A session registered for a device's commands.
pub struct Attached {
    /// Its number, for [`Downlink::claim`], [`Downlink::done`] and [`Downlink::detach`].
    pub session: u64,
    /// Receives whenever there may be commands to claim (once at the start).
    pub nudges: mpsc::Receiver<()>,
}

impl Downlink {
    /// Registers a session of `device`; it is nudged at once, and whenever a command
    /// arrives or one is given back.
    pub async fn attach(&self, device: &str) -> Attached {
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (nudge, nudges) = mpsc::channel(1);
        let _ = nudge.try_send(());
        {
            let mut devices = self.lock();
            let entry = devices.entry(device.to_string()).or_default();
            entry.sessions.push((session, nudge));
            entry.elsewhere = false;
            entry.held_here = true;
            entry.announced = true;
        }
        self.announce(device, true).await;
        Attached { session, nudges }
    }

    /// Takes up to `max` of `device`'s waiting commands that `wanted` accepts, in order,
    /// for `session`. They stay queued until [`Downlink::done`] (or, when the session
    /// detaches first, go to the next).
    pub fn claim(
        &self,
        device: &str,
        session: u64,
        max: usize,
        mut wanted: impl FnMut(&Command) -> bool,
    ) -> Vec<(u64, Command)> {
        let mut devices = self.lock();
        let Some(entry) = devices.get_mut(device) else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        for pending in entry.queue.iter_mut() {
            if taken.len() >= max {
                break;
            }
            if pending.claimed.is_none() && wanted(&pending.command) {
                pending.claimed = Some(session);
                taken.push((pending.seq, pending.command.clone()));
            }
        }
        taken
    }

    /// Commands a session delivered (`seqs` from [`Downlink::claim`]): out of the queue
    /// for good.
    pub async fn done(&self, device: &str, seqs: Vec<u64>) {
        if seqs.is_empty() {
            return;
        }
        if let Some(entry) = self.lock().get_mut(device) {
            entry.queue.retain(|p| !seqs.contains(&p.seq));
        }
        self.forget(seqs).await;
    }

    /// Ends a session: what it took and did not confirm goes back to the queue; with no
    /// session left the device is announced offline.
    pub async fn detach(&self, device: &str, session: u64) {
        let last = {
            let mut devices = self.lock();
            let entry = devices.entry(device.to_string()).or_default();
            entry.sessions.retain(|(id, _)| *id != session);
            let mut returned = false;
            for pending in entry.queue.iter_mut() {
                if pending.claimed == Some(session) {
                    pending.claimed = None;
                    returned = true;
                }
            }
            if returned {
                entry.nudge();
            }
            let last = entry.sessions.is_empty();
            if last {
                entry.announced = false;
            }
            last
        };
        if last {
            self.announce(device, false).await;
        }
    }

    /// An HTTP long-poll: the device's queued commands, waiting up to `wait` for one.
    /// The commands returned are out of the queue.
    pub async fn poll(&self, device: &str, wait: Duration) -> Vec<Command> {
        let (notify, announce) = {
            let mut devices = self.lock();
            let entry = devices.entry(device.to_string()).or_default();
            entry.held_here = true;
            entry.elsewhere = false;
            let announce = !entry.announced;
            entry.announced = true;
            (entry.waiting.clone(), announce)
        };
        if announce {
            self.announce(device, true).await;
        }
        let poll = self.next_session.fetch_add(1, Ordering::Relaxed);
        let notified = notify.notified();
        tokio::pin!(notified);
        // Registered before the look, so a command arriving in between wakes it.
        notified.as_mut().enable();
        let mut taken = self.claim(device, poll, usize::MAX, |_| true);
        if taken.is_empty() {
            let _ = tokio::time::timeout(wait, notified).await;
            taken = self.claim(device, poll, usize::MAX, |_| true);
        }
        let seqs = taken.iter().map(|(seq, _)| *seq).collect();
        self.done(device, seqs).await;
        taken.into_iter().map(|(_, command)| command).collect()
    }
}
