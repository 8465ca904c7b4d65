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
}

impl ShutdownTrigger {
    /// Fires the signal.
    pub fn fire(&self) {
        let _ = self.sender.send(true);
    }
}
