//! The MQTT client ids connected to this gateway: a second connection with the same
//! client id takes over, and the first is closed (MQTT 5: DISCONNECT 0x8E).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::oneshot;

/// Client ids with their connections.
#[derive(Default)]
pub struct Clients {
    /// The last connection number handed out.
    next: AtomicU64,
    /// Per client id: the connection holding it, and how to tell it to go.
    open: Mutex<HashMap<String, (u64, oneshot::Sender<()>)>>,
}

/// A connection's hold on its client id.
pub struct Registration {
    /// The connection's number.
    pub id: u64,
    /// Fires when another connection takes the client id over.
    pub receiver: oneshot::Receiver<()>,
}

impl Clients {
    /// Takes `client_id` for a new connection; the one holding it, if any, is told to go.
    pub fn register(&self, client_id: &str) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (sender, receiver) = oneshot::channel();
        let previous = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(client_id.to_string(), (id, sender));
        if let Some((_, earlier)) = previous {
            let _ = earlier.send(());
        }
        Registration { id, receiver }
    }

    /// Gives `client_id` up, if connection `id` still holds it; whether it did.
    pub fn unregister(&self, client_id: &str, id: u64) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let held = open.get(client_id).is_some_and(|(holder, _)| *holder == id);
        if held {
            open.remove(client_id);
        }
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_connection_takes_over_and_the_first_cannot_remove_it() {
        let clients = Clients::default();
        let mut first = clients.register("dev-1");
        let second = clients.register("dev-1");
        assert!(first.receiver.try_recv().is_ok(), "the first is told to go");
        assert!(!clients.unregister("dev-1", first.id));
        let third = clients.register("dev-1");
        let mut second = second;
        assert!(
            second.receiver.try_recv().is_ok(),
            "the second was still registered"
        );
        assert!(clients.unregister("dev-1", third.id));
        assert!(clients.open.lock().unwrap().is_empty());
    }
}
