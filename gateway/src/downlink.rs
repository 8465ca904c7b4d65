//! Commands to devices (downlink), through the MQTT broker (AWS IoT Core, or mosquitto).
//!
//! The gateway subscribes to the command topics of every device (`command_topic` with
//! `${device.id}` as a wildcard) and hands each command to the device's WebSocket session
//! (a `command` frame) or its HTTP long-poll (`GET /commands`). A device that is not
//! connected gets its commands queued: in order, at most `queue_max_depth` (the oldest
//! go first), each for `queue_ttl_secs`; a command that expires or is pushed out is
//! reported on the device's reply topic (`{"command_id", "status": "expired"}` or
//! `"overflow"`). The device's answers (`command_reply` frames, `POST
//! /commands/{id}/reply`) are published on its reply topic.
//!
//! **Several instances.** Every instance receives every command; only one delivers it.
//! An instance that holds a device's connection publishes a retained presence message
//! (`presence_topic`, `{"instance", "online"}`); the other instances then leave that
//! device's commands to it and drop what they had queued for it, which the holder
//! queued too. When the device leaves, the holder marks it offline and every instance
//! queues again, so whichever instance the device comes back to has its commands. Only
//! the broker is involved; there is no cluster protocol.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use crate::config::DownlinkConfig;
use crate::message::{new_id, now_ms};

/// Commands buffered per session before they wait in the device's queue instead.
const SESSION_BUFFER: usize = 64;

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

#[derive(Default)]
struct Device {
    /// Local WebSocket sessions, by session number.
    sessions: Vec<(u64, mpsc::Sender<Command>)>,
    /// Commands waiting for the device.
    queue: VecDeque<Command>,
    /// Long-polls waiting for a command.
    waiting: Arc<Notify>,
    /// Online at another instance (its presence says so).
    elsewhere: bool,
    /// This instance was the last to hold the device (it reports expiries).
    held_here: bool,
    /// This instance announced the device online.
    announced: bool,
}

/// The downlink: one MQTT connection, the devices' queues.
pub struct Downlink {
    client: AsyncClient,
    settings: DownlinkConfig,
    instance: String,
    devices: Mutex<HashMap<String, Device>>,
    next_session: std::sync::atomic::AtomicU64,
    /// Subscriptions the broker confirmed on the current connection (2 when ready).
    subscribed: std::sync::atomic::AtomicUsize,
}

impl Downlink {
    /// Connects (in the background), subscribes, and starts the expiry sweep.
    pub fn start(settings: DownlinkConfig) -> anyhow::Result<Arc<Downlink>> {
        let instance = settings.instance_id.clone().unwrap_or_else(new_id);
        let tls =
            crate::sink::iot_core::mqtt::client_tls(&settings.ca, &settings.cert, &settings.key)?;
        let client_id = format!("{}-{instance}", settings.client_id_prefix);
        let mut options = MqttOptions::new(client_id, &settings.host, settings.port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(256 * 1024, 256 * 1024)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        let (client, mut events) = AsyncClient::new(options, 256);
        let downlink = Arc::new(Downlink {
            client,
            settings,
            instance,
            devices: Mutex::new(HashMap::new()),
            next_session: std::sync::atomic::AtomicU64::new(0),
            subscribed: std::sync::atomic::AtomicUsize::new(0),
        });
        let this = downlink.clone();
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        this.subscribed
                            .store(0, std::sync::atomic::Ordering::Relaxed);
                        this.subscribe().await
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        this.subscribed
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        this.incoming(&publish.topic, publish.payload.to_vec())
                            .await
                    }
                    Ok(_) => {}
                    Err(error) => {
                        this.subscribed
                            .store(0, std::sync::atomic::Ordering::Relaxed);
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

    /// The instance id, and whether the broker confirmed both subscriptions (commands
    /// and presence) on the current connection.
    pub fn status(&self) -> Value {
        json!({
            "instance": self.instance,
            "subscribed": self.subscribed.load(std::sync::atomic::Ordering::Relaxed) >= 2,
            "devices_waiting": self.lock().values().filter(|d| !d.queue.is_empty()).count(),
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
        pattern.replace("${device.id}", device)
    }

    /// The device a topic of `pattern` (with `${device.id}` as one level) belongs to.
    fn device_of(pattern: &str, topic: &str) -> Option<String> {
        let index = pattern
            .split('/')
            .position(|level| level == "${device.id}")?;
        let device = topic.split('/').nth(index)?;
        let prefix: Vec<&str> = pattern.split('/').take(index).collect();
        let actual: Vec<&str> = topic.split('/').take(index).collect();
        (prefix == actual).then(|| device.to_string())
    }

    async fn subscribe(&self) {
        for pattern in [&self.settings.command_topic, &self.settings.presence_topic] {
            let filter = pattern.replace("${device.id}", "+");
            if let Err(error) = self.client.subscribe(filter, QoS::AtLeastOnce).await {
                tracing::error!(%error, "cannot subscribe for the downlink");
            }
        }
    }

    async fn incoming(&self, topic: &str, payload: Vec<u8>) {
        if let Some(device) = Self::device_of(&self.settings.presence_topic, topic) {
            let presence: Value = serde_json::from_slice(&payload).unwrap_or_default();
            let online = presence["online"].as_bool().unwrap_or(false);
            let instance = presence["instance"].as_str().unwrap_or_default();
            if instance == self.instance {
                return;
            }
            let mut devices = self.lock();
            let entry = devices.entry(device).or_default();
            entry.elsewhere = online;
            if online {
                // The holder queued the same commands: they are its to deliver now.
                entry.queue.clear();
                entry.held_here = false;
            }
            return;
        }
        let Some(device) = Self::device_of(&self.settings.command_topic, topic) else {
            return;
        };
        let command = Command {
            id: new_id(),
            topic: topic.to_string(),
            payload,
            received_at_ms: now_ms(),
        };
        let overflow = {
            let mut devices = self.lock();
            let entry = devices.entry(device.clone()).or_default();
            let mut command = Some(command);
            entry.sessions.retain(|(_, session)| !session.is_closed());
            for (_, session) in &entry.sessions {
                match session.try_send(command.take().expect("present")) {
                    Ok(()) => break,
                    Err(
                        mpsc::error::TrySendError::Full(back)
                        | mpsc::error::TrySendError::Closed(back),
                    ) => command = Some(back),
                }
            }
            match command {
                None => None,
                Some(_) if entry.elsewhere && entry.sessions.is_empty() => None,
                Some(command) => {
                    entry.queue.push_back(command);
                    entry.waiting.notify_waiters();
                    (entry.queue.len() > self.settings.queue_max_depth)
                        .then(|| entry.queue.pop_front())
                        .flatten()
                }
            }
        };
        if let Some(dropped) = overflow {
            self.report(&device, &dropped.id, "overflow").await;
        }
    }

    /// Drops expired commands and reports them (only the instance that last held the
    /// device, or every instance if none did).
    async fn expire(&self) {
        let ttl_ms = self.settings.queue_ttl_secs * 1000;
        let now = now_ms();
        let mut expired = Vec::new();
        {
            let mut devices = self.lock();
            for (device, entry) in devices.iter_mut() {
                while entry
                    .queue
                    .front()
                    .is_some_and(|c| c.received_at_ms + ttl_ms <= now)
                {
                    let command = entry.queue.pop_front().expect("present");
                    if entry.held_here || !entry.elsewhere {
                        expired.push((device.clone(), command.id));
                    }
                }
            }
        }
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

    /// Registers a WebSocket session of `device`: its queued commands first, then new
    /// ones, on the returned receiver.
    pub async fn attach(&self, device: &str) -> (u64, mpsc::Receiver<Command>) {
        let session = self
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (sender, receiver) = mpsc::channel(SESSION_BUFFER.max(self.settings.queue_max_depth));
        {
            let mut devices = self.lock();
            let entry = devices.entry(device.to_string()).or_default();
            while let Some(command) = entry.queue.pop_front() {
                let _ = sender.try_send(command);
            }
            entry.sessions.push((session, sender));
            entry.elsewhere = false;
            entry.held_here = true;
            entry.announced = true;
        }
        self.announce(device, true).await;
        (session, receiver)
    }

    /// Ends a session; with none left the device is announced offline.
    pub async fn detach(&self, device: &str, session: u64) {
        let last = {
            let mut devices = self.lock();
            let entry = devices.entry(device.to_string()).or_default();
            entry.sessions.retain(|(id, _)| *id != session);
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
    pub async fn poll(&self, device: &str, wait: Duration) -> Vec<Command> {
        let (notify, announce, ready) = {
            let mut devices = self.lock();
            let entry = devices.entry(device.to_string()).or_default();
            entry.held_here = true;
            entry.elsewhere = false;
            let announce = !entry.announced;
            entry.announced = true;
            let ready: Vec<Command> = entry.queue.drain(..).collect();
            (entry.waiting.clone(), announce, ready)
        };
        if announce {
            self.announce(device, true).await;
        }
        if !ready.is_empty() {
            return ready;
        }
        let notified = notify.notified();
        tokio::pin!(notified);
        // Registered before the second look, so a command arriving in between wakes it.
        notified.as_mut().enable();
        let queued = self.take_queued(device);
        if !queued.is_empty() {
            return queued;
        }
        let _ = tokio::time::timeout(wait, notified).await;
        self.take_queued(device)
    }

    fn take_queued(&self, device: &str) -> Vec<Command> {
        self.lock()
            .get_mut(device)
            .map(|e| e.queue.drain(..).collect())
            .unwrap_or_default()
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
