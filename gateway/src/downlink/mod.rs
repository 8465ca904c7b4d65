//! Commands to devices (downlink), through the MQTT broker (AWS IoT Core, or mosquitto).
//!
//! The gateway subscribes to the command topics of every device (`command_topic` with
//! `${device.id}` as a wildcard) and queues each command for its device, on disk
//! ([`store`]) before it acknowledges it to the broker. The device's sessions take
//! their commands from the queue: a WebSocket session as `command` frames, an MQTT
//! session as PUBLISHes on the filters it subscribed to (a QoS 1 command stays queued
//! until its PUBACK, so one sent to a connection that drops goes again to the next), an
//! HTTP long-poll (`GET /commands`) as its answer. The queue keeps the commands in
//! order, at most `queue_max_depth` (the oldest go first), each for `queue_ttl_secs`; a
//! command that expires or is pushed out is reported on the device's reply topic
//! (`{"command_id", "status": "expired"}` or `"overflow"`). The device's answers
//! (`command_reply` frames, `POST /commands/{id}/reply`, MQTT publishes on the reply
//! topic) are published on its reply topic.
//!
//! With `instance_id` set, the gateway's broker session is persistent (clean session
//! off, under a client id that stays the same across restarts), so commands that arrive
//! while the gateway is down wait at the broker.
//!
//! **Several instances.** Every instance receives every command; only one delivers it.
//! An instance that holds a device's connection publishes a retained presence message
//! (`presence_topic`, `{"instance", "online"}`); the other instances then leave that
//! device's commands to it and drop what they had queued for it, which the holder
//! queued too. When the device leaves, the holder marks it offline and every instance
//! queues again, so whichever instance the device comes back to has its commands. Only
//! the broker is involved; there is no cluster protocol.
//!
//! This file holds the broker side (the connection, subscriptions, incoming commands,
//! presence, replies); [`sessions`] the device side; [`store`] the queue on disk.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use crate::config::DownlinkConfig;
use crate::message::{new_id, now_ms};

mod sessions;
pub mod store;

pub use sessions::Attached;
use store::CommandStore;

/// Most device queues `status` lists (the fullest first).
pub const MAX_QUEUES_LISTED: usize = 100;

/// A command for a device.
#[derive(Debug, Clone)]
pub struct Command {
    /// The gateway's id for it; the device names it in its reply.
    pub id: String,
    /// The MQTT topic it came on.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// When the gateway received it.
    pub received_at_ms: u64,
}

impl Command {
    /// The command as a JSON object (`type: command`, id, topic, and the payload as
    /// `payload`, `payload_text` or `payload_base64`).
    pub fn to_json(&self) -> Value {
        let mut value = json!({"type": "command", "id": self.id, "topic": self.topic});
        let (field, payload) = crate::sink::local::payload_json(&self.payload);
        value[field] = payload;
        value
    }
}

/// A command in a device's queue.
struct Pending {
    /// Its place in the store.
    seq: u64,
    command: Command,
    /// The session that took it and has not yet confirmed it.
    claimed: Option<u64>,
}

#[derive(Default)]
struct Device {
    /// Local sessions, by number, each with the channel that tells it of new commands.
    sessions: Vec<(u64, mpsc::Sender<()>)>,
    /// Commands waiting for the device, in order.
    queue: VecDeque<Pending>,
    /// Long-polls waiting for a command.
    waiting: Arc<Notify>,
    /// Online at another instance (its presence says so).
    elsewhere: bool,
    /// This instance was the last to hold the device (it reports expiries).
    held_here: bool,
    /// This instance announced the device online.
    announced: bool,
}

impl Device {
    /// Tells every session (and long-poll) that there is something to take.
    fn nudge(&mut self) {
        self.sessions.retain(|(_, nudge)| !nudge.is_closed());
        for (_, nudge) in &self.sessions {
            let _ = nudge.try_send(());
        }
        self.waiting.notify_waiters();
    }
}

/// The downlink: one MQTT connection, the devices' queues.
pub struct Downlink {
    client: AsyncClient,
    settings: DownlinkConfig,
    instance: String,
    devices: Mutex<HashMap<String, Device>>,
    store: CommandStore,
    next_seq: AtomicU64,
    next_session: AtomicU64,
    /// Subscriptions the broker confirmed on the current connection (2 when ready).
    subscribed: AtomicUsize,
}

impl Downlink {
    /// Opens the queue in `data_dir`, connects (in the background), subscribes, and
    /// starts the expiry sweep.
    pub fn start(settings: DownlinkConfig, data_dir: &Path) -> anyhow::Result<Arc<Downlink>> {
        let (store, held) = CommandStore::open(data_dir)?;
        let persistent = settings.instance_id.is_some();
        let instance = settings.instance_id.clone().unwrap_or_else(new_id);
        let tls = crate::tls::client_config(&settings.ca, &settings.cert, &settings.key)?;
        let client_id = format!("{}-{instance}", settings.client_id_prefix);
        let mut options = MqttOptions::new(client_id, &settings.host, settings.port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(!persistent)
            // A command is acknowledged to the broker once it is in the store.
            .set_manual_acks(true)
            .set_max_packet_size(256 * 1024, 256 * 1024)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        let (client, mut events) = AsyncClient::new(options, 256);
        let mut devices: HashMap<String, Device> = HashMap::new();
        let mut next_seq = 1;
        for held in held {
            next_seq = held.seq + 1;
            devices
                .entry(held.device)
                .or_default()
                .queue
                .push_back(Pending {
                    seq: held.seq,
                    command: held.command,
                    claimed: None,
                });
        }
        if next_seq > 1 {
            tracing::info!(
                commands = devices.values().map(|d| d.queue.len()).sum::<usize>(),
                "queued commands kept from before the restart"
            );
        }
        let downlink = Arc::new(Downlink {
            client,
            settings,
            instance,
            devices: Mutex::new(devices),
            store,
            next_seq: AtomicU64::new(next_seq),
            next_session: AtomicU64::new(0),
            subscribed: AtomicUsize::new(0),
        });
        let this = downlink.clone();
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        this.subscribed.store(0, Ordering::Relaxed);
                        this.subscribe().await
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        this.subscribed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        this.incoming(&publish.topic, publish.payload.to_vec())
                            .await;
                        // `try_ack`: this task drives the client, so it must not wait
                        // for room in the client's request queue.
                        if let Err(error) = this.client.try_ack(&publish) {
                            tracing::warn!(%error, "cannot acknowledge a command to the broker");
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        this.subscribed.store(0, Ordering::Relaxed);
                        tracing::warn!(%error, "downlink MQTT connection lost; reconnecting");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        let sweeper = Arc::downgrade(&downlink);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let Some(downlink) = sweeper.upgrade() else {
                    return;
                };
                downlink.expire().await;
            }
        });
        Ok(downlink)
    }

    /// The instance id, whether the broker confirmed both subscriptions (commands and
    /// presence) on the current connection, the commands waiting, and the devices with
    /// the most waiting ([`MAX_QUEUES_LISTED`] of them): how many, since when, and
    /// whether the device has a session here.
    pub fn status(&self) -> Value {
        let devices = self.lock();
        let mut queues: Vec<(&String, &Device)> = devices
            .iter()
            .filter(|(_, d)| !d.queue.is_empty())
            .collect();
        queues.sort_by(|a, b| b.1.queue.len().cmp(&a.1.queue.len()).then(a.0.cmp(b.0)));
        let queues: Vec<Value> = queues
            .into_iter()
            .take(MAX_QUEUES_LISTED)
            .map(|(device, entry)| {
                json!({
                    "device": device,
                    "commands": entry.queue.len(),
                    "oldest_ms": entry.queue.front().map(|p| p.command.received_at_ms),
                    "connected_here": !entry.sessions.is_empty(),
                })
            })
            .collect();
        json!({
            "instance": self.instance,
            "subscribed": self.subscribed.load(Ordering::Relaxed) >= 2,
            "devices_waiting": devices.values().filter(|d| !d.queue.is_empty()).count(),
            "commands_queued": devices.values().map(|d| d.queue.len()).sum::<usize>(),
            "queues": queues,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Device>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The topic `device`'s replies are published on.
    pub fn reply_topic(&self, device: &str) -> String {
        Self::topic(&self.settings.reply_topic, device)
    }

    fn topic(pattern: &str, device: &str) -> String {
        crate::template::for_device(pattern, device)
    }

    /// The device a topic of `pattern` (with `${device.id}` as one level) belongs to.
    fn device_of(pattern: &str, topic: &str) -> Option<String> {
        let index = pattern
            .split('/')
            .position(|level| level == crate::template::DEVICE_ID)?;
        let device = topic.split('/').nth(index)?;
        let prefix: Vec<&str> = pattern.split('/').take(index).collect();
        let actual: Vec<&str> = topic.split('/').take(index).collect();
        (prefix == actual).then(|| device.to_string())
    }

    async fn subscribe(&self) {
        for pattern in [&self.settings.command_topic, &self.settings.presence_topic] {
            let filter = crate::template::for_device(pattern, "+");
            if let Err(error) = self.client.subscribe(filter, QoS::AtLeastOnce).await {
                tracing::error!(%error, "cannot subscribe for the downlink");
            }
        }
    }

    async fn incoming(&self, topic: &str, payload: Vec<u8>) {
        if let Some(device) = Self::device_of(&self.settings.presence_topic, topic) {
            self.presence(device, &payload).await;
            return;
        }
        let Some(device) = Self::device_of(&self.settings.command_topic, topic) else {
            return;
        };
        {
            let devices = self.lock();
            // Online at another instance: that one delivers it.
            if devices
                .get(&device)
                .is_some_and(|d| d.elsewhere && d.sessions.is_empty())
            {
                return;
            }
        }
        let command = Command {
            id: new_id(),
            topic: topic.to_string(),
            payload,
            received_at_ms: now_ms(),
        };
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = self.store.put(seq, &device, &command).await {
            tracing::error!(%error, %device, "cannot store a command; it is kept in memory only");
        }
        let overflow = {
            let mut devices = self.lock();
            let entry = devices.entry(device.clone()).or_default();
            entry.queue.push_back(Pending {
                seq,
                command,
                claimed: None,
            });
            entry.nudge();
            if entry.queue.len() > self.settings.queue_max_depth {
                let oldest = entry.queue.iter().position(|p| p.claimed.is_none());
                oldest.and_then(|index| entry.queue.remove(index))
            } else {
                None
            }
        };
        if let Some(dropped) = overflow {
            self.forget(vec![dropped.seq]).await;
            self.report(&device, &dropped.command.id, "overflow").await;
        }
    }

    /// Another instance's presence message for `device`.
    async fn presence(&self, device: String, payload: &[u8]) {
        let presence: Value = serde_json::from_slice(payload).unwrap_or_default();
        let online = presence["online"].as_bool().unwrap_or(false);
        let instance = presence["instance"].as_str().unwrap_or_default();
        if instance == self.instance {
            return;
        }
        let dropped: Vec<u64> = {
            let mut devices = self.lock();
            let entry = devices.entry(device).or_default();
            entry.elsewhere = online;
            if !online {
                return;
            }
            // The holder queued the same commands: they are its to deliver now.
            entry.held_here = false;
            let mut dropped = Vec::new();
            entry.queue.retain(|p| {
                let keep = p.claimed.is_some();
                if !keep {
                    dropped.push(p.seq);
                }
                keep
            });
            dropped
        };
        self.forget(dropped).await;
    }

    /// Removes commands from the store.
    async fn forget(&self, seqs: Vec<u64>) {
        if let Err(error) = self.store.remove(seqs).await {
            tracing::error!(%error, "cannot remove commands from the store; they may come again after a restart");
        }
    }

    /// Drops expired commands and reports them (only the instance that last held the
    /// device, or every instance if none did). Commands a session took are left to it.
    async fn expire(&self) {
        let ttl_ms = self.settings.queue_ttl_secs * 1000;
        let now = now_ms();
        let mut expired = Vec::new();
        let mut seqs = Vec::new();
        {
            let mut devices = self.lock();
            for (device, entry) in devices.iter_mut() {
                let report = entry.held_here || !entry.elsewhere;
                entry.queue.retain(|p| {
                    let keep = p.claimed.is_some() || p.command.received_at_ms + ttl_ms > now;
                    if !keep {
                        seqs.push(p.seq);
                        if report {
                            expired.push((device.clone(), p.command.id.clone()));
                        }
                    }
                    keep
                });
            }
        }
        self.forget(seqs).await;
        for (device, id) in expired {
            tracing::info!(%device, command = %id, "command expired before the device came");
            self.report(&device, &id, "expired").await;
        }
    }

    async fn report(&self, device: &str, id: &str, status: &str) {
        let body = json!({"command_id": id, "status": status, "instance": self.instance});
        self.publish_reply(device, body).await;
    }

    async fn publish_reply(&self, device: &str, body: Value) {
        let topic = Self::topic(&self.settings.reply_topic, device);
        if let Err(error) = self
            .client
            .publish(topic, QoS::AtLeastOnce, false, body.to_string())
            .await
        {
            tracing::warn!(%error, %device, "cannot publish a command reply");
        }
    }

    async fn announce(&self, device: &str, online: bool) {
        let topic = Self::topic(&self.settings.presence_topic, device);
        let body = json!({"instance": self.instance, "online": online});
        if let Err(error) = self
            .client
            .publish(topic, QoS::AtLeastOnce, true, body.to_string())
            .await
        {
            tracing::warn!(%error, %device, "cannot publish presence");
        }
    }

    /// A device's answer to a command, published on its reply topic.
    pub async fn reply(
        &self,
        device: &str,
        command_id: &str,
        status: &str,
        payload: Option<Value>,
    ) {
        let mut body =
            json!({"command_id": command_id, "status": status, "instance": self.instance});
        if let Some(payload) = payload {
            body["payload"] = payload;
        }
        self.publish_reply(device, body).await;
    }

    /// A device's raw publish on its reply topic (an MQTT device's reply), as it is.
    pub async fn publish_raw_reply(&self, device: &str, payload: Vec<u8>) {
        let topic = Self::topic(&self.settings.reply_topic, device);
        if let Err(error) = self
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
        {
            tracing::warn!(%error, %device, "cannot publish a command reply");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_found_in_their_topics() {
        assert_eq!(
            Downlink::device_of("cmd/${device.id}/#", "cmd/dev-1/reboot").as_deref(),
            Some("dev-1")
        );
        assert_eq!(
            Downlink::device_of("cmd/${device.id}/#", "other/dev-1/x"),
            None
        );
        assert_eq!(
            Downlink::device_of("sluice/presence/${device.id}", "sluice/presence/d9").as_deref(),
            Some("d9")
        );
    }
}
