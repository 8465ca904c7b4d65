"""Publishes with paho-mqtt (a client nobody here wrote) and reports what the server said.

usage: paho_publish.py JSON
  {"url": "ws://127.0.0.1:PORT/mqtt" | "mqtt://127.0.0.1:PORT" | "mqtts://127.0.0.1:PORT",
   "ca"?, "cert"?, "key"?: PEM files for mqtts (the CA; the client certificate and key),
   "version": 4 | 5, "client_id": "...", "username"?: "...", "password"?: "...",
   "generate"?: {"topic": "...", "prefix": "m", "count": N, "qos": 0|1} (instead of publishes),
   "publishes": [{"topic": "...", "payload": "...", "qos": 0|1,
                  "properties"?: {"content_type": "...", "message_expiry": N,
                                   "user": [["k", "v"]]}}]}
prints one JSON line: {"connack": CODE, "results": [{"mid", "reason"}...],
                       "disconnected": bool, "disconnect_reason": CODE|null}
"""
import json
import sys
import threading
import urllib.parse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

spec = json.loads(sys.argv[1])
if "generate" in spec:
    # {"topic", "prefix", "count", "qos"}: COUNT publishes with payloads PREFIX0, PREFIX1, …
    g = spec["generate"]
    spec["publishes"] = [
        {"topic": g["topic"], "payload": f'{g["prefix"]}{n}', "qos": g.get("qos", 1)}
        for n in range(g["count"])
    ]
url = urllib.parse.urlparse(spec["url"])
version = mqtt.MQTTv5 if spec["version"] == 5 else mqtt.MQTTv311
transport = "websockets" if url.scheme in ("ws", "wss") else "tcp"
client = mqtt.Client(
    mqtt.CallbackAPIVersion.VERSION2,
    client_id=spec["client_id"],
    protocol=version,
    transport=transport,
)
if transport == "websockets":
    # The query too: a token may travel in the WebSocket URL.
    client.ws_set_options(path=(url.path or "/mqtt") + (f"?{url.query}" if url.query else ""))
if spec.get("username") or spec.get("password"):
    client.username_pw_set(spec.get("username"), spec.get("password"))
if url.scheme in ("mqtts", "wss"):
    # TLS, with the client certificate when given (the device's identity).
    client.tls_set(ca_certs=spec["ca"], certfile=spec.get("cert"), keyfile=spec.get("key"))

connected = threading.Event()
finished = threading.Event()
state = {"connack": None, "results": {}, "disconnected": False, "disconnect_reason": None}
expected = sum(1 for p in spec["publishes"] if p.get("qos", 0) == 1)


def on_connect(client, userdata, flags, reason, properties):
    state["connack"] = reason.value
    connected.set()


def on_publish(client, userdata, mid, reason, properties):
    state["results"][mid] = reason.value
    if len(state["results"]) >= expected:
        finished.set()


def on_disconnect(client, userdata, flags, reason, properties):
    state["disconnected"] = True
    state["disconnect_reason"] = reason.value if reason is not None else None
    connected.set()
    finished.set()


client.on_connect = on_connect
client.on_publish = on_publish
client.on_disconnect = on_disconnect
client.connect(url.hostname, url.port, keepalive=60)
client.loop_start()
connected.wait(15)
mids = []
if state["connack"] == 0 and not state["disconnected"]:
    for publish in spec["publishes"]:
        properties = None
        if version == mqtt.MQTTv5 and publish.get("properties"):
            properties = Properties(PacketTypes.PUBLISH)
            given = publish["properties"]
            if "content_type" in given:
                properties.ContentType = given["content_type"]
            if "message_expiry" in given:
                properties.MessageExpiryInterval = given["message_expiry"]
            if "user" in given:
                properties.UserProperty = [tuple(pair) for pair in given["user"]]
        info = client.publish(
            publish["topic"], publish["payload"], qos=publish.get("qos", 0), properties=properties
        )
        mids.append(info.mid)
    if expected:
        finished.wait(15)
client.loop_stop()
print(json.dumps({
    "connack": state["connack"],
    "results": [{"mid": mid, "reason": state["results"].get(mid)} for mid in mids],
    "disconnected": state["disconnected"],
    "disconnect_reason": state["disconnect_reason"],
}))
