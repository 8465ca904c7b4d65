"""A device built on the AWS IoT Device SDK v2 for Python (awsiotsdk, on awscrt): AWS's own
device code, which nobody here wrote. It reports each step as one JSON line on stdout, so
that a test can act between them (publish a desired change, create a job).

The connection comes from `mqtt_connection_builder.mtls_from_path` with the SDK's
defaults (MQTT 3.1.1, clean_session False, keep-alive 1200 s, SDK metrics in the CONNECT's
username) unless the spec overrides them; the shadow and jobs steps go through `iotshadow.IotShadowClient` and
`iotjobs.IotJobsClient`, so the topics and payloads are the SDK's. The SDK checks the
server certificate against `endpoint`: use a name the certificate has (`localhost`).

usage: aws_device.py JSON
  {"endpoint": "localhost", "port": N, "ca": PATH, "cert": PATH, "key": PATH,
   "client_id": "...", "thing": "...", "scenario": "pubsub"|"retained"|"shadow"|"jobs",
   "timeout": SECONDS (30, for the whole run),
   "clean_session"?: bool (false), "keep_alive"?: SECONDS (1200),
   "metrics"?: bool (true, the SDK's default: the CONNECT then carries a username the
             device never set, "?SDK=IoTDeviceSDK/Python&Platform=...&Metadata=(...)";
             false sends no username),
   "crt_log"?: "Error"|"Warn"|"Info"|"Debug"|"Trace" (awscrt's own log, on stderr),
   pubsub:   "topic": "...", "count"?: N (3), "message"?: TEXT ("Hello World!"; message i
             is "TEXT [i]", i from 1, as in the SDK's pubsub sample)
   retained: "topic": FILTER, "expect"?: N (1 retained message)
   shadow:   "shadow"?: NAME (a named shadow; absent: the classic one),
             "reported": {...} (the state first reported), "client_token"?: "..." (a
             fresh one), "report_delta"?: bool (false: when true, the device reports the
             delta's values back, as the SDK's shadow sample does)
   jobs:     "status"?: "SUCCEEDED" (the final status it sets), "status_details"?: {...},
             "await_next"?: bool (true: after the update, wait for the notify-next that
             no longer names the job)}
events (SDK objects are printed field by field with the SDK's snake_case names, times as
epoch seconds, absent fields left out):
  {"event": "connected", "session_present": bool}
  {"event": "interrupted", "error": "..."}, {"event": "resumed", "return_code": N,
   "session_present": bool}  (whenever the SDK reports them)
  {"event": "suback", "topic": "...", "qos": N}   (one per subscription, in order)
  pubsub / retained:
    {"event": "published", "topic", "payload"}    (after its PUBACK)
    {"event": "message", "topic", "payload", "qos", "dup", "retain"}
  shadow (each SDK message as it arrives; "response" is the SDK's parsed payload):
    {"event": "update_accepted"|"update_rejected"|"delta"|"get_accepted"|"get_rejected",
     "response": {...}}
    {"event": "waiting_delta"}  (the test may now change the desired state)
  jobs:
    {"event": "notify_next"|"start_next_accepted"|"start_next_rejected"|
              "update_accepted"|"update_rejected", "response": {...}}
    {"event": "waiting_job"}    (the test may now create a job for the thing)
  {"event": "end"}  then exit 0
  {"event": "error", "message": "...", ...}  then exit 1 (a timeout, a refused
   subscription, a rejection of this device's own request, a failed connection)
"""
import datetime
import json
import os
import queue
import sys
import threading
import time
import uuid

from awscrt import io, mqtt
from awsiot import ModeledClass, iotjobs, iotshadow, mqtt_connection_builder

spec = json.loads(sys.argv[1])
deadline = time.monotonic() + spec.get("timeout", 30)
QOS = mqtt.QoS.AT_LEAST_ONCE
print_lock = threading.Lock()
# What the SDK's callbacks (on awscrt's threads) hand to the main thread: (event, data).
inbox = queue.Queue()


def emit(event):
    with print_lock:
        print(json.dumps(event), flush=True)


def fail(message, **extra):
    emit({"event": "error", "message": message, **extra})
    os._exit(1)  # awscrt's threads may still hold the connection: do not wait for them


def remaining():
    left = deadline - time.monotonic()
    if left <= 0:
        fail("timed out")
    return left


def plain(value):
    """An SDK object (or anything inside one) as JSON-ready data."""
    if isinstance(value, ModeledClass):
        return {slot: plain(getattr(value, slot)) for slot in value.__slots__
                if not slot.endswith("_is_nullable") and getattr(value, slot) is not None}
    if isinstance(value, datetime.datetime):
        return int(value.timestamp())
    if isinstance(value, dict):
        return {key: plain(inner) for key, inner in value.items()}
    if isinstance(value, list):
        return [plain(inner) for inner in value]
    return value


def relay(name):
    """An SDK callback that prints the message as event `name` and queues it."""
    def callback(response):
        if response is None:  # the SDK could not parse the payload
            emit({"event": name, "response": None, "unparsed": True})
        else:
            emit({"event": name, "response": plain(response)})
        inbox.put((name, response))
    return callback


def wait_for(what, accept, refuse=()):
    """Takes queued messages until `accept(name, data)` is true, and returns that data.
    A message for which `refuse(name, data)` is true ends the run with an error."""
    while True:
        try:
            name, data = inbox.get(timeout=remaining())
        except queue.Empty:
            fail(f"timed out waiting for {what}")
        if refuse and refuse(name, data):
            fail(f"{name} while waiting for {what}", response=plain(data))
        if accept(name, data):
            return data


def settle(future, what):
    """The result of an SDK future, or the end of the run."""
    try:
        return future.result(timeout=remaining())
    except Exception as error:  # TimeoutError included
        fail(f"{what} failed: {error!r}")


def subscribed(pair, topic=None):
    """Waits for the SUBACK of a subscribe call's (future, x) pair: x is the topic for the
    service clients' subscribe_to_* methods, the packet id for connection.subscribe (then
    `topic` names the filter)."""
    future, second = pair
    topic = topic or second
    granted = settle(future, f"subscribe to {topic}")
    qos = granted["qos"] if isinstance(granted, dict) else granted
    emit({"event": "suback", "topic": topic, "qos": int(qos.value)})


def token(stage):
    return f"{spec['client_id']}-{stage}-{uuid.uuid4().hex[:8]}"


def own(kinds, client_token):
    """Whether a message is one of `kinds` answering this device's request."""
    return lambda n, data: n in kinds and data is not None and getattr(data, "client_token", None) == client_token


# ---------------------------------------------------------------- scenarios

def pubsub(connection):
    """The SDK's pubsub sample: subscribe, publish `count` messages there, get them back."""
    topic, count = spec["topic"], spec.get("count", 3)
    text = spec.get("message", "Hello World!")
    wanted = {f"{text} [{i}]" for i in range(1, count + 1)}

    def on_message(topic, payload, dup, qos, retain, **kwargs):
        event = message_event(topic, payload, dup, qos, retain)
        emit(event)
        inbox.put(("message", event))

    subscribed(connection.subscribe(topic, QOS, on_message), topic)
    for i in range(1, count + 1):
        payload = f"{text} [{i}]"
        future, _ = connection.publish(topic, payload, QOS)
        settle(future, f"publish {i}")
        emit({"event": "published", "topic": topic, "payload": payload})
    while wanted:
        event = wait_for(f"{len(wanted)} more message(s) on {topic}", lambda n, d: n == "message")
        wanted.discard(event["payload"])


def retained(connection):
    """Subscribes and waits for the retained message(s) the broker holds."""
    expect = spec.get("expect", 1)

    def on_message(topic, payload, dup, qos, retain, **kwargs):
        event = message_event(topic, payload, dup, qos, retain)
        emit(event)
        inbox.put(("message", event))

    subscribed(connection.subscribe(spec["topic"], QOS, on_message), spec["topic"])
    for _ in range(expect):
        wait_for("a retained message", lambda n, d: n == "message" and d["retain"])


def message_event(topic, payload, dup, qos, retain):
    return {"event": "message", "topic": topic, "payload": payload.decode("utf-8", "replace"),
            "qos": int(getattr(qos, "value", qos)), "dup": bool(dup), "retain": bool(retain)}


def shadow(connection):
    """Reports state, waits for a desired change (delta), then reads the document."""
    client = iotshadow.IotShadowClient(connection)
    thing, name = spec["thing"], spec.get("shadow")
    if name:
        ids = {"thing_name": thing, "shadow_name": name}
        sub = iotshadow.UpdateNamedShadowSubscriptionRequest  # all named ones take the same two ids
        calls = [
            (client.subscribe_to_update_named_shadow_accepted, sub, "update_accepted"),
            (client.subscribe_to_update_named_shadow_rejected, sub, "update_rejected"),
            (client.subscribe_to_named_shadow_delta_updated_events,
             iotshadow.NamedShadowDeltaUpdatedSubscriptionRequest, "delta"),
            (client.subscribe_to_get_named_shadow_accepted, iotshadow.GetNamedShadowSubscriptionRequest, "get_accepted"),
            (client.subscribe_to_get_named_shadow_rejected, iotshadow.GetNamedShadowSubscriptionRequest, "get_rejected"),
        ]
        update = lambda state, t: client.publish_update_named_shadow(
            iotshadow.UpdateNamedShadowRequest(state=state, client_token=t, **ids), QOS)
        get = lambda t: client.publish_get_named_shadow(iotshadow.GetNamedShadowRequest(client_token=t, **ids), QOS)
    else:
        ids = {"thing_name": thing}
        calls = [
            (client.subscribe_to_update_shadow_accepted, iotshadow.UpdateShadowSubscriptionRequest, "update_accepted"),
            (client.subscribe_to_update_shadow_rejected, iotshadow.UpdateShadowSubscriptionRequest, "update_rejected"),
            (client.subscribe_to_shadow_delta_updated_events,
             iotshadow.ShadowDeltaUpdatedSubscriptionRequest, "delta"),
            (client.subscribe_to_get_shadow_accepted, iotshadow.GetShadowSubscriptionRequest, "get_accepted"),
            (client.subscribe_to_get_shadow_rejected, iotshadow.GetShadowSubscriptionRequest, "get_rejected"),
        ]
        update = lambda state, t: client.publish_update_shadow(
            iotshadow.UpdateShadowRequest(state=state, client_token=t, **ids), QOS)
        get = lambda t: client.publish_get_shadow(iotshadow.GetShadowRequest(client_token=t, **ids), QOS)
    for subscribe, request, event_name in calls:
        subscribed(subscribe(request(**ids), QOS, relay(event_name)))

    def report(state, client_token):
        settle(update(iotshadow.ShadowState(reported=state), client_token), "publish update")
        wait_for("update/accepted", own({"update_accepted"}, client_token),
                 own({"update_rejected"}, client_token))

    report(spec["reported"], spec.get("client_token") or token("update"))
    emit({"event": "waiting_delta"})
    event = wait_for("update/delta", lambda n, d: n == "delta" and d is not None)
    if spec.get("report_delta"):
        report(event.state, token("report"))
    get_token = token("get")
    settle(get(get_token), "publish get")
    wait_for("get/accepted", own({"get_accepted"}, get_token), own({"get_rejected"}, get_token))


def jobs(connection):
    """Waits for a job, starts it with start-next, and finishes it with an update."""
    client = iotjobs.IotJobsClient(connection)
    thing = spec["thing"]
    subscribed(client.subscribe_to_next_job_execution_changed_events(
        iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=thing), QOS, relay("notify_next")))
    start_sub = iotjobs.StartNextPendingJobExecutionSubscriptionRequest(thing_name=thing)
    subscribed(client.subscribe_to_start_next_pending_job_execution_accepted(
        start_sub, QOS, relay("start_next_accepted")))
    subscribed(client.subscribe_to_start_next_pending_job_execution_rejected(
        start_sub, QOS, relay("start_next_rejected")))
    # job_id "+": one subscription for the updates of every job, as the SDK's jobs sample does.
    update_sub = iotjobs.UpdateJobExecutionSubscriptionRequest(thing_name=thing, job_id="+")
    subscribed(client.subscribe_to_update_job_execution_accepted(update_sub, QOS, relay("update_accepted")))
    subscribed(client.subscribe_to_update_job_execution_rejected(update_sub, QOS, relay("update_rejected")))

    emit({"event": "waiting_job"})
    wait_for("notify-next with an execution",
             lambda n, d: n == "notify_next" and d is not None and d.execution is not None)

    start_token = token("start")
    settle(client.publish_start_next_pending_job_execution(
        iotjobs.StartNextPendingJobExecutionRequest(thing_name=thing, client_token=start_token), QOS),
        "publish start-next")
    started = wait_for("start-next/accepted", own({"start_next_accepted"}, start_token),
                       own({"start_next_rejected"}, start_token))
    execution = started.execution
    if execution is None:
        fail("start-next found no pending job")

    update_token = token("update")
    settle(client.publish_update_job_execution(iotjobs.UpdateJobExecutionRequest(
        thing_name=thing, job_id=execution.job_id, status=spec.get("status", "SUCCEEDED"),
        status_details=spec.get("status_details"), expected_version=execution.version_number,
        client_token=update_token), QOS), "publish update")
    wait_for("update/accepted", own({"update_accepted"}, update_token),
             own({"update_rejected"}, update_token))
    if spec.get("await_next", True):
        wait_for("notify-next without the finished job",
                 lambda n, d: n == "notify_next" and d is not None
                 and (d.execution is None or d.execution.job_id != execution.job_id))


SCENARIOS = {"pubsub": pubsub, "retained": retained, "shadow": shadow, "jobs": jobs}


def main():
    scenario = SCENARIOS.get(spec.get("scenario"))
    if scenario is None:
        fail(f"unknown scenario {spec.get('scenario')!r}")
    if spec.get("crt_log"):
        io.init_logging(getattr(io.LogLevel, spec["crt_log"]), "stderr")

    def on_interrupted(connection, error, **kwargs):
        emit({"event": "interrupted", "error": str(error)})

    def on_resumed(connection, return_code, session_present, **kwargs):
        emit({"event": "resumed", "return_code": int(getattr(return_code, "value", return_code)),
              "session_present": bool(session_present)})

    connection = mqtt_connection_builder.mtls_from_path(
        endpoint=spec["endpoint"], port=spec["port"], ca_filepath=spec["ca"],
        cert_filepath=spec["cert"], pri_key_filepath=spec["key"], client_id=spec["client_id"],
        clean_session=spec.get("clean_session"), keep_alive_secs=spec.get("keep_alive"),
        enable_metrics_collection=spec.get("metrics"),
        on_connection_interrupted=on_interrupted, on_connection_resumed=on_resumed)
    connected = settle(connection.connect(), "connect")
    emit({"event": "connected", "session_present": bool(connected["session_present"])})
    scenario(connection)
    settle(connection.disconnect(), "disconnect")
    emit({"event": "end"})


if __name__ == "__main__":
    main()
