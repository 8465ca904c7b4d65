"""Added latency of the way down: broker -> Sluice -> device, against broker -> device.

Two paho-mqtt subscribers take the same messages in the same run: one connected to the
broker directly (mutual TLS), one through Sluice (its own session at the broker, opened
by the gateway). A publisher on the broker sends COUNT QoS 1 messages, one every
INTERVAL ms, each carrying its send time; each subscriber notes its receive time. The
output is one JSON object: per path the p50/p90/p99 of send-to-receive in microseconds
and the messages a second it took (COUNT over the time from the first send to its last
message; INTERVAL_MS 0 sends as fast as the publisher can), and the added p50 (through
Sluice minus direct).

usage: latency.py BROKER_PORT CERTS_DIR SLUICE_MQTT_PORT [COUNT] [INTERVAL_MS]
"""
import json
import ssl
import sys
import threading
import time

import paho.mqtt.client as mqtt

broker_port, certs, sluice_port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
count = int(sys.argv[4]) if len(sys.argv) > 4 else 2000
interval = (float(sys.argv[5]) if len(sys.argv) > 5 else 2.0) / 1000
topic = f"cmd/latency-{time.time_ns()}/x"


def tls(client):
    client.tls_set(ca_certs=f"{certs}/ca.pem", certfile=f"{certs}/test-subscriber.pem",
                   keyfile=f"{certs}/test-subscriber.key", cert_reqs=ssl.CERT_REQUIRED)


def subscriber(name, host, port, secure):
    got, done, ready = [], threading.Event(), threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{time.time_ns()}",
                         protocol=mqtt.MQTTv5)
    if secure:
        tls(client)
    client.on_connect = lambda c, u, f, r, p: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda c, u, m, r, p: ready.set()

    def on_message(c, u, message):
        got.append(time.monotonic_ns() - int(message.payload))
        if len(got) >= count:
            finished.append(time.monotonic())
            done.set()
    finished = []
    client.on_message = on_message
    client.connect(host, port)
    client.loop_start()
    if not ready.wait(10):
        sys.exit(f"{name}: no SUBACK")
    return client, got, done, finished


direct = subscriber("direct", "localhost", broker_port, True)
through = subscriber("through-sluice", "127.0.0.1", sluice_port, False)
publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{time.time_ns()}",
                        protocol=mqtt.MQTTv5)
tls(publisher)
publisher.connect("localhost", broker_port)
publisher.loop_start()
time.sleep(0.5)  # not readiness: both SUBACKs came; this lets the publisher's CONNACK land
start = time.monotonic()
for n in range(count):
    publisher.publish(topic, str(time.monotonic_ns()), qos=1)
    time.sleep(max(0.0, start + (n + 1) * interval - time.monotonic()))
for name, (_, got, done, _) in (("direct", direct), ("through_sluice", through)):
    if not done.wait(30):
        sys.exit(f"{name}: {len(got)} of {count} messages")


def summary(path):
    _, values, _, finished = path
    return {**percentiles(values), "rate_per_s": round(count / (finished[0] - start))}


def percentiles(values):
    values = sorted(v / 1000 for v in values)
    pick = lambda q: round(values[min(len(values) - 1, int(q * len(values)))], 1)
    return {"p50_us": pick(0.5), "p90_us": pick(0.9), "p99_us": pick(0.99)}


result = {"count": count, "interval_ms": interval * 1000,
          "direct": summary(direct), "through_sluice": summary(through)}
result["added_p50_us"] = round(result["through_sluice"]["p50_us"] - result["direct"]["p50_us"], 1)
print(json.dumps(result))
