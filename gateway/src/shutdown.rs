//! The shutdown signal shared by the listener and its connections.

use tokio::sync::watch;

/// A cloneable signal that fires once; everything that must stop waits on it.
#[derive(Clone)]
pub struct Shutdown {
    /// Flips to `true` exactly once; receivers see the change.
    receiver: watch::Receiver<bool>,
}

/// Fires the [`Shutdown`] signal it was created with.
pub struct ShutdownTrigger {
    /// Sending `true` wakes every waiting [`Shutdown::wait`].
    sender: watch::Sender<bool>,
}

impl Shutdown {
    /// A new signal and the trigger that fires it.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (sender, receiver) = watch::channel(false);
        (ShutdownTrigger { sender }, Shutdown { receiver })
    }

    /// A signal that fires on Ctrl-C or SIGTERM.
    pub fn on_signals() -> Shutdown {
        let (trigger, shutdown) = Shutdown::new();
        tokio::spawn(async move {
            let ctrl_c = tokio::signal::ctrl_c();
            let mut term = match tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::terminate(),
            ) {
                Ok(term) => term,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the gateway");
                    let _ = ctrl_c.await;
                    trigger.fire();
                    return;
                }
            };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutdown requested");
            trigger.fire();
        });
        shutdown
    }

    /// Waits until the signal fires (returns at once if it already has).
    pub async fn wait(&mut self) {
        let _ = self.receiver.wait_for(|fired| *fired).await;
    }

    /// Whether the signal has fired.
    pub fn fired(&self) -> bool {
        *self.receiver.borrow()
    }
}

/// Stopping in two steps, so that a load balancer in front sees the gateway go before its
/// connections do: first the gateway *leaves* (`/readyz` turns red, HTTP requests are
/// refused with `503 leaving`), then, `delay` later, it *stops* (the listeners close,
/// sessions end, the spool drains).
pub struct Leave {
    /// Starts leaving: SIGTERM, Ctrl-C or the admin API's `POST /admin/drain`.
    pub trigger: std::sync::Arc<ShutdownTrigger>,
    /// Fires when leaving starts.
    pub leaving: Shutdown,
    /// Fires `delay` after `leaving`.
    pub stop: Shutdown,
}

impl Leave {
    /// Leaving starts when `outside` fires or the trigger is pulled; stopping `delay`
    /// after that.
    pub fn start(mut outside: Shutdown, delay: std::time::Duration) -> Leave {
        let (trigger, leaving) = Shutdown::new();
        let trigger = std::sync::Arc::new(trigger);
        let (stop_trigger, stop) = Shutdown::new();
        let pull = trigger.clone();
        let mut left = leaving.clone();
        tokio::spawn(async move {
            // Either way, leaving has started.
            tokio::select! {
                () = outside.wait() => pull.fire(),
                () = left.wait() => {}
            }
            tracing::info!(
                ?delay,
                "leaving: /readyz answers 503 and HTTP requests are refused; the listeners close after server.leave_delay_ms"
            );
            tokio::time::sleep(delay).await;
            stop_trigger.fire();
        });
        Leave {
            trigger,
            leaving,
            stop,
        }
    }
}

impl ShutdownTrigger {
    /// Fires the signal.
    pub fn fire(&self) {
        let _ = self.sender.send(true);
    }
}
