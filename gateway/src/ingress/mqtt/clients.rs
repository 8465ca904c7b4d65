//! The MQTT client ids connected to this gateway: a second connection with the same
//! client id takes over, and the first is closed (MQTT 5: DISCONNECT 0x8E), but only
//! when both are the same device's. A client id another device holds, or held last, is
//! refused to a device that is not its owner by id and has no grant naming it: a
//! `client_ids` pattern such as `${device.id}-*` must not let device `pump` take over
//! device `pump-3`'s connection, its session or its will.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::oneshot;

/// Client ids whose last device is remembered after their connection ends, at most (past
/// it, those not connected now are forgotten).
const REMEMBERED_OWNERS: usize = 100_000;

/// A client id held by a connection.
struct Held {
    /// The connection's number.
    connection: u64,
    /// Tells it to go.
    go: oneshot::Sender<()>,
}

#[derive(Default)]
struct Ids {
    /// Per client id: the connection holding it.
    open: HashMap<String, Held>,
    /// Per client id: the device that held it last.
    owners: HashMap<String, String>,
}

/// Client ids with their connections.
#[derive(Default)]
pub struct Clients {
    /// The last connection number handed out.
    next: AtomicU64,
    ids: Mutex<Ids>,
}

/// A connection's hold on its client id.
pub struct Registration {
    /// The connection's number.
    pub id: u64,
    /// Fires when another connection takes the client id over.
    pub receiver: oneshot::Receiver<()>,
}

impl Clients {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ids> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `client_id` for a new connection of `device`; the connection holding it, if
    /// any, is told to go. `Err` with the other device when another device holds it or
    /// held it last, unless it is `device`'s own id or `named` (a grant names it for
    /// `device`).
    pub fn register(
        &self,
        client_id: &str,
        device: &str,
        named: bool,
    ) -> Result<Registration, String> {
        let mut ids = self.lock();
        if let Some(owner) = ids.owners.get(client_id)
            && owner != device
            && client_id != device
            && !named
        {
            return Err(owner.clone());
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (go, receiver) = oneshot::channel();
        if let Some(earlier) = ids
            .open
            .insert(client_id.to_string(), Held { connection: id, go })
        {
            let _ = earlier.go.send(());
        }
        if ids.owners.len() >= REMEMBERED_OWNERS {
            let Ids { open, owners } = &mut *ids;
            owners.retain(|id, _| open.contains_key(id));
        }
        ids.owners.insert(client_id.to_string(), device.to_string());
        Ok(Registration { id, receiver })
    }

    /// Gives `client_id` up, if connection `id` still holds it; whether it did.
    pub fn unregister(&self, client_id: &str, id: u64) -> bool {
        let mut ids = self.lock();
        let held = ids
            .open
            .get(client_id)
            .is_some_and(|held| held.connection == id);
        if held {
            ids.open.remove(client_id);
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
        let mut first = clients.register("dev-1", "dev-1", false).unwrap();
        let second = clients.register("dev-1", "dev-1", false).unwrap();
        assert!(first.receiver.try_recv().is_ok(), "the first is told to go");
        assert!(!clients.unregister("dev-1", first.id));
        let third = clients.register("dev-1", "dev-1", false).unwrap();
        let mut second = second;
        assert!(
            second.receiver.try_recv().is_ok(),
            "the second was still registered"
        );
        assert!(clients.unregister("dev-1", third.id));
        assert!(clients.lock().open.is_empty());
    }

    /// Another device cannot take a client id over, connected or not, unless it is its
    /// own id or a grant names it; the same device can.
    #[test]
    fn only_its_own_device_takes_a_client_id_over() {
        let clients = Clients::default();
        let mut held = clients.register("pump-3", "pump-3", false).unwrap();
        assert_eq!(
            clients.register("pump-3", "pump", false).err().as_deref(),
            Some("pump-3")
        );
        assert!(held.receiver.try_recv().is_err(), "not told to go");
        assert!(clients.unregister("pump-3", held.id));
        assert!(
            clients.register("pump-3", "pump", false).is_err(),
            "its owner is remembered"
        );
        let console = clients.register("pump-3", "console", true).unwrap();
        assert!(
            clients.register("pump-3", "pump-3", false).is_ok(),
            "its own id"
        );
        assert!(!clients.unregister("pump-3", console.id));
        assert!(clients.register("pump-9", "pump", false).is_ok());
    }
}
