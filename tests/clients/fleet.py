"""A fleet of MQTT devices with paho-mqtt (a client nobody here wrote), each publishing QoS 1
at a steady pace and reconnecting on its own when its connection ends, as device code does
behind a load balancer. Reports JSON lines on stdout.

usage: fleet.py JSON
  {"url": "mqtt://127.0.0.1:PORT", "version": 4 | 5, "devices": N, "prefix": "dev",
   "interval": SECONDS between a device's publishes, "seconds": SECONDS of publishing
   after every device connected,
   "subscribe"?: "cmd/run/{id}/#" (each device subscribes, QoS 1, to its own filter; with
   MQTT 5 its session is kept 600 s and resumed on every reconnection)}
events:
  {"event": "connected", "devices": N}                       every device connected once
                                                             (and subscribed)
  {"event": "progress", "acked": N, "connections": N, "received": N}   about once a second
  {"event": "done", "published": N, "acked": ["dev-3:17", ...], "refused": N,
   "connections": N, "disconnect_reasons": {"139": N, ...},
   "received": ["payload", ...] (every message received, repeats included)}
A payload is "<client id>:<sequence>"; "acked" lists those whose PUBACK said success
(reason below 0x80). "connections" counts CONNACKs, reconnections included;
"disconnect_reasons" counts the DISCONNECT reason codes the server sent (MQTT 5).
"""
import json
import queue
import sys
import threading
import time
import urllib.parse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

spec = json.loads(sys.argv[1])
url = urllib.parse.urlparse(spec["url"])
version = mqtt.MQTTv5 if spec["version"] == 5 else mqtt.MQTTv311
count = spec["devices"]
interval = spec.get("interval", 0.5)
seconds = spec.get("seconds", 10)
subscribe = spec.get("subscribe")

# Callbacks run on paho's network threads: they only put events on this queue, so that
# they never wait on a lock a publishing thread holds.
events = queue.Queue()
first_connacks = set()
lock = threading.Lock()


def emit(event):
    print(json.dumps(event), flush=True)


class Device:
    def __init__(self, n):
        self.id = f'{spec.get("prefix", "dev")}-{n}'
        kwargs = {} if version == mqtt.MQTTv5 else {"clean_session": True}
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=self.id, protocol=version, **kwargs
        )
        self.client.reconnect_delay_set(min_delay=0.05, max_delay=0.5)
        self.client.on_connect = self.on_connect
        self.client.on_publish = self.on_publish
        self.client.on_disconnect = self.on_disconnect
        self.client.on_subscribe = self.on_subscribe
        self.client.on_message = self.on_message
        self.sent = {}  # mid -> payload, per connection's numbering (paho keeps mids)
        self.seq = 0

    def on_connect(self, client, userdata, flags, reason, properties):
        code = int(reason.value if hasattr(reason, "value") else reason)
        events.put(("connack", self.id, code))
        if code == 0 and subscribe and not flags.session_present:
            client.subscribe(subscribe.replace("{id}", self.id), qos=1)

    def on_subscribe(self, client, userdata, mid, reasons, properties):
        events.put(("suback", self.id))

    def on_message(self, client, userdata, message):
        events.put(("message", self.id, message.payload.decode()))

    def on_publish(self, client, userdata, mid, reason, properties):
        code = reason.value if hasattr(reason, "value") else int(reason)
        events.put(("puback", self.id, mid, code))

    def on_disconnect(self, client, userdata, flags, reason, properties):
        code = reason.value if hasattr(reason, "value") else int(reason)
        events.put(("disconnect", self.id, code))

    def start(self):
        if subscribe and version == mqtt.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 600
            # Clean start on the first connection only: every reconnection resumes.
            self.client.connect_async(url.hostname, url.port, keepalive=30, properties=properties)
        else:
            self.client.connect_async(url.hostname, url.port, keepalive=30)
        self.client.loop_start()

    def publish(self):
        if not self.client.is_connected():
            return None
        payload = f"{self.id}:{self.seq}"
        with lock:
            info = self.client.publish(f"fleet/{self.id}", payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
                return None
            self.sent[info.mid] = payload
        self.seq += 1
        return payload


devices = [Device(n) for n in range(count)]
by_id = {d.id: d for d in devices}
acked = set()
refused = 0
connections = 0
reasons = {}
published = 0
subscribed = set()
received = []


def settle_events():
    global refused, connections
    while True:
        try:
            event = events.get_nowait()
        except queue.Empty:
            return
        kind, device = event[0], by_id[event[1]]
        if kind == "connack" and event[2] == 0:
            connections += 1
            first_connacks.add(device.id)
        elif kind == "puback":
            with lock:
                payload = device.sent.get(event[2])
            if payload is None:
                continue
            if event[3] < 0x80:
                acked.add(payload)
            else:
                refused += 1
        elif kind == "suback":
            subscribed.add(device.id)
        elif kind == "message":
            received.append(event[2])
        elif kind == "disconnect" and version == mqtt.MQTTv5 and event[2] not in (0,):
            reasons[str(event[2])] = reasons.get(str(event[2]), 0) + 1


for device in devices:
    device.start()
deadline = time.monotonic() + 60
while len(first_connacks) < count or (subscribe and len(subscribed) < count):
    settle_events()
    if time.monotonic() > deadline:
        emit({"event": "error", "message": f"{len(first_connacks)} of {count} connected"})
        sys.exit(1)
    time.sleep(0.02)
emit({"event": "connected", "devices": count})

end = time.monotonic() + seconds
next_progress = time.monotonic() + 1
while time.monotonic() < end:
    round_started = time.monotonic()
    for device in devices:
        if device.publish() is not None:
            published += 1
    settle_events()
    if time.monotonic() >= next_progress:
        emit({"event": "progress", "acked": len(acked), "connections": connections,
              "received": len(received)})
        next_progress += 1
    time.sleep(max(0.0, interval - (time.monotonic() - round_started)))

# The last publishes' PUBACKs: wait for the in-flight ones a little (those never
# acknowledged are not counted as acked, which is what matters).
settle_until = time.monotonic() + 5
while time.monotonic() < settle_until:
    settle_events()
    if len(acked) + refused >= published:
        break
    time.sleep(0.05)
settle_events()
for device in devices:
    device.client.disconnect()
    device.client.loop_stop()
emit({
    "event": "done",
    "published": published,
    "acked": sorted(acked),
    "refused": refused,
    "connections": connections,
    "disconnect_reasons": reasons,
    "received": received,
})
