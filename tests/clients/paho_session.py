"""An MQTT device session with paho-mqtt (a client nobody here wrote), reporting each
event as one JSON line on stdout, so that a test can act between them.

usage: paho_session.py JSON
  {"url": "ws://127.0.0.1:PORT/mqtt" | "mqtt://127.0.0.1:PORT" | "mqtts://HOST:PORT",
   "tls"?: {"ca": PEM, "cert": PEM, "key": PEM} (with mqtts: mutual TLS),
   "version": 4 | 5, "client_id": "...", "username"?: "...", "password"?: "...",
   "clean": true|false, "session_expiry"?: SECONDS (5.0),
   "will"?: {"topic": "...", "payload": "...", "qos": 0|1, "retain": false},
   "subscribe"?: [["filter", QOS], ...],
   "publishes"?: [{"topic": "...", "payload": "...", "qos": 0|1, "retain"?: bool,
                   "properties"?: PROPERTIES (5.0)}],
   "max_packet_size"?: BYTES, "receive_maximum"?: N (5.0, in the CONNECT),
   "expect": N (messages to wait for), "timeout": SECONDS,
   "ack": true|false (false: QoS 1 messages are never acknowledged),
   "end": "disconnect" | "disconnect_with_will" | "drop" (no DISCONNECT)}
events:
  {"event": "connack", "reason": CODE, "session_present": bool}
  {"event": "suback", "granted": [CODE, ...]}
  {"event": "puback", "mid": N, "reason": CODE}
  {"event": "message", "topic", "payload", "qos", "dup", "retain", "properties"?: PROPERTIES}
PROPERTIES (MQTT 5): {"response_topic", "correlation_data" (text), "content_type",
  "user_properties": [["key", "value"], ...]}, each optional
  {"event": "end", "disconnected": bool, "disconnect_reason": CODE|null}
"""
import json
import os
import sys
import threading
import urllib.parse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

spec = json.loads(sys.argv[1])
url = urllib.parse.urlparse(spec["url"])
version = mqtt.MQTTv5 if spec["version"] == 5 else mqtt.MQTTv311
transport = "websockets" if url.scheme in ("ws", "wss") else "tcp"
clean = spec.get("clean", True)
kwargs = {} if version == mqtt.MQTTv5 else {"clean_session": clean}
client = mqtt.Client(
    mqtt.CallbackAPIVersion.VERSION2,
    client_id=spec["client_id"],
    protocol=version,
    transport=transport,
    **kwargs,
)
if transport == "websockets":
    client.ws_set_options(path=url.path or "/mqtt")
if url.scheme == "mqtts":
    tls = spec["tls"]
    client.tls_set(ca_certs=tls["ca"], certfile=tls["cert"], keyfile=tls["key"])
if spec.get("username") or spec.get("password"):
    client.username_pw_set(spec.get("username"), spec.get("password"))
if spec.get("will"):
    will = spec["will"]
    client.will_set(will["topic"], will["payload"], qos=will.get("qos", 0), retain=will.get("retain", False))
if not spec.get("ack", True):
    client.manual_ack_set(True)

lock = threading.Lock()
connected = threading.Event()
subscribed = threading.Event()
finished = threading.Event()
state = {"messages": 0, "pubacks": 0, "disconnected": False, "disconnect_reason": None}
acked = threading.Event()
expected_acks = sum(1 for p in spec.get("publishes", []) if p.get("qos", 0) == 1)


def emit(event):
    with lock:
        print(json.dumps(event), flush=True)


def on_connect(client, userdata, flags, reason, properties):
    emit({"event": "connack", "reason": reason.value, "session_present": bool(flags.session_present)})
    connected.set()


def on_subscribe(client, userdata, mid, reasons, properties):
    emit({"event": "suback", "granted": [r.value for r in reasons]})
    subscribed.set()


def on_publish(client, userdata, mid, reason, properties):
    emit({"event": "puback", "mid": mid, "reason": reason.value})
    state["pubacks"] += 1
    if state["pubacks"] >= expected_acks:
        acked.set()


def to_properties(given):
    """A PUBLISH's MQTT 5 properties from the spec's PROPERTIES."""
    properties = Properties(PacketTypes.PUBLISH)
    if "response_topic" in given:
        properties.ResponseTopic = given["response_topic"]
    if "correlation_data" in given:
        properties.CorrelationData = given["correlation_data"].encode()
    if "content_type" in given:
        properties.ContentType = given["content_type"]
    if "user_properties" in given:
        properties.UserProperty = [tuple(pair) for pair in given["user_properties"]]
    return properties


def from_properties(properties):
    """PROPERTIES of a received message (only those it has)."""
    out = {}
    if properties is None:
        return out
    if hasattr(properties, "ResponseTopic"):
        out["response_topic"] = properties.ResponseTopic
    if hasattr(properties, "CorrelationData"):
        out["correlation_data"] = properties.CorrelationData.decode("utf-8", "replace")
    if hasattr(properties, "ContentType"):
        out["content_type"] = properties.ContentType
    if hasattr(properties, "UserProperty"):
        out["user_properties"] = [list(pair) for pair in properties.UserProperty]
    return out


def on_message(client, userdata, message):
    event = {
        "event": "message",
        "topic": message.topic,
        "payload": message.payload.decode("utf-8", "replace"),
        "qos": message.qos,
        "dup": bool(message.dup),
        "retain": bool(message.retain),
    }
    if version == mqtt.MQTTv5:
        event["properties"] = from_properties(message.properties)
    emit(event)
    state["messages"] += 1
    if state["messages"] >= spec.get("expect", 0):
        finished.set()


def on_disconnect(client, userdata, flags, reason, properties):
    state["disconnected"] = True
    state["disconnect_reason"] = reason.value if reason is not None else None
    connected.set()
    subscribed.set()
    acked.set()
    finished.set()


client.on_connect = on_connect
client.on_subscribe = on_subscribe
client.on_publish = on_publish
client.on_message = on_message
client.on_disconnect = on_disconnect
properties = None
if version == mqtt.MQTTv5:
    properties = Properties(PacketTypes.CONNECT)
    if spec.get("session_expiry"):
        properties.SessionExpiryInterval = spec["session_expiry"]
    if spec.get("max_packet_size"):
        properties.MaximumPacketSize = spec["max_packet_size"]
    if spec.get("receive_maximum"):
        properties.ReceiveMaximum = spec["receive_maximum"]
    client.connect(url.hostname, url.port, keepalive=60, clean_start=clean, properties=properties)
else:
    client.connect(url.hostname, url.port, keepalive=60)
client.loop_start()
connected.wait(15)
if not state["disconnected"]:
    if spec.get("subscribe"):
        client.subscribe([(f, q) for f, q in spec["subscribe"]])
        subscribed.wait(15)
    for publish in spec.get("publishes", []):
        extra = {}
        if "properties" in publish:
            extra["properties"] = to_properties(publish["properties"])
        client.publish(publish["topic"], publish["payload"], qos=publish.get("qos", 0),
                       retain=publish.get("retain", False), **extra)
    if expected_acks:
        acked.wait(15)
    if spec.get("expect", 0) > 0:
        finished.wait(spec.get("timeout", 20))
end = spec.get("end", "disconnect")
if end == "drop":
    emit({"event": "end", "disconnected": state["disconnected"], "disconnect_reason": state["disconnect_reason"]})
    os._exit(0)
if not state["disconnected"]:
    if end == "disconnect_with_will" and version == mqtt.MQTTv5:
        client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4))
    else:
        client.disconnect()
client.loop_stop()
emit({"event": "end", "disconnected": state["disconnected"], "disconnect_reason": state["disconnect_reason"]})
