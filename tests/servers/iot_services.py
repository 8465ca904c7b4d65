"""A STAND-IN for AWS IoT Core's Device Shadow and Jobs services, on any MQTT broker.

IoT Core's shadow and jobs services have no open-source server, so the end-to-end tests
run this instead: an ordinary MQTT client (paho-mqtt, mutual TLS, here with the
test-subscriber certificate on mosquitto) that subscribes to the services' request topics
and answers on their reply topics, following the MQTT topic contract of the AWS IoT
developer guide. It is not IoT Core: it keeps everything in memory, checks no policy,
and does only what is listed below. Check a device client against it by pointing that
client straight at the broker first (tests/clients/aws_device.py does this).

What it answers (THING is any thing name; SHADOW below is either `shadow` for the
classic shadow or `shadow/name/NAME` for a named one):

  $aws/things/THING/SHADOW/get      -> .../get/accepted     {state{desired,reported,delta},
                                                             metadata, version, timestamp}
                                       .../get/rejected     404 when there is no shadow
  $aws/things/THING/SHADOW/update   -> .../update/accepted  {state (as requested), metadata,
                                                             version, timestamp}
                                       .../update/documents {previous (absent when the
                                                             shadow is new), current, timestamp}
                                       .../update/delta     {state (desired fields that
                                                             differ from reported), metadata,
                                                             version, timestamp}: only when the
                                                             request set desired state and
                                                             the shadow has a difference
                                       .../update/rejected  400 bad JSON or no `state`,
                                                             409 `version` not the current one
  $aws/things/THING/SHADOW/delete   -> .../delete/accepted  {version, timestamp}
                                       .../delete/rejected  404 when there is no shadow

  Shadow semantics: `null` removes a field (or a whole `desired`/`reported`); objects
  merge field by field; anything else (arrays included) replaces. Objects left empty are
  dropped. The version starts at 1, grows by one per accepted update and survives a
  delete. Metadata mirrors the state with {"timestamp": T} at each leaf.

  $aws/things/THING/jobs/get               -> jobs/get/accepted {inProgressJobs, queuedJobs,
                                                                 timestamp}
  $aws/things/THING/jobs/start-next        -> jobs/start-next/accepted {execution?, timestamp}
                                              (the next pending execution, moved to
                                              IN_PROGRESS if it was QUEUED; no `execution`
                                              when nothing is pending)
  $aws/things/THING/jobs/JOBID/get         -> jobs/JOBID/get/accepted {execution, timestamp}
                                              (JOBID `$next`: the next pending one)
                                              jobs/JOBID/get/rejected ResourceNotFound
  $aws/things/THING/jobs/JOBID/update      -> jobs/JOBID/update/accepted {executionState?,
                                              jobDocument?, timestamp}
                                              jobs/JOBID/update/rejected InvalidJson,
                                              InvalidRequest, ResourceNotFound,
                                              VersionMismatch (with executionState),
                                              InvalidStateTransition (already terminal)
  published by the stand-in:
    $aws/things/THING/jobs/notify-next  {execution?, timestamp} when the next pending
                                        execution becomes a different job (or none)
    $aws/things/THING/jobs/notify       {jobs: {QUEUED: [...], IN_PROGRESS: [...]},
                                        timestamp} when the pending lists change

  Jobs semantics: an execution is pending while QUEUED or IN_PROGRESS; IN_PROGRESS ones
  come first, then QUEUED ones, each in creation order. A device may set IN_PROGRESS,
  SUCCEEDED, FAILED or REJECTED; the last three are terminal. versionNumber starts at 1
  and grows by one per change; executionNumber is always 1. Times are epoch seconds.

  Every reply to a request carries the request's `clientToken` when it had one.

Jobs are created by the test, as IoT Core's control plane would, with a QoS 1 message on
the control topic (the stand-in's only non-AWS topic):

  standin/jobs/create  {"thing": "THING", "jobId": "JOBID", "document": {...}}

which queues the execution (a jobId the thing already has is ignored, with a line on
stderr) and publishes notify / notify-next as above. State lives as long as the process:
tests that share one stand-in should use their own thing names.

usage: iot_services.py --host H --port P --ca CA --cert CERT --key KEY
                       [--ready-file F] [--client-id ID] [--verbose]
It prints {"event": "ready"} on stdout (and writes F, atomically) once its subscriptions
are acknowledged, then runs in the foreground until SIGTERM or SIGINT. With --verbose it
prints one JSON line per request handled. It reconnects, and resubscribes, if the broker
goes away.
"""
import argparse
import copy
import json
import os
import signal
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

CONTROL_CREATE_JOB = "standin/jobs/create"
REQUEST_FILTERS = ["$aws/things/+/shadow/#", "$aws/things/+/jobs/#", CONTROL_CREATE_JOB]

PENDING = ("IN_PROGRESS", "QUEUED")
DEVICE_SETTABLE = ("IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED")
TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "TIMED_OUT", "REMOVED")


def now():
    return int(time.time())


def with_token(payload, request):
    """`payload` plus the request's clientToken, when it had a string one."""
    token = request.get("clientToken") if isinstance(request, dict) else None
    if isinstance(token, str):
        payload["clientToken"] = token
    return payload


def parse_json_object(raw):
    """The payload as a dict, {} for an empty payload, or None when it is not a JSON
    object."""
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------- shadow documents

def merge(target, patch):
    """Applies `patch` to the dict `target` in place: None removes, dicts merge, anything
    else replaces. Dicts left empty are removed."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            inner = target.get(key)
            if not isinstance(inner, dict):
                inner = {}
            merge(inner, value)
            if inner:
                target[key] = inner
            else:
                target.pop(key, None)
        else:
            target[key] = copy.deepcopy(value)


def metadata_for(value, timestamp):
    """The metadata tree of a state value: each leaf becomes {"timestamp": T}; None (a
    removal) keeps its None so that merging it removes the metadata too."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {key: metadata_for(inner, timestamp) for key, inner in value.items()}
    if isinstance(value, list):
        return [metadata_for(inner, timestamp) for inner in value]
    return {"timestamp": timestamp}


def restamp(old, value, patch, timestamp):
    """The metadata of the merged state `value`: fresh timestamps where `patch` (the
    request) wrote, the `old` metadata elsewhere."""
    if not (isinstance(value, dict) and isinstance(patch, dict)):
        return metadata_for(value, timestamp)
    old = old if isinstance(old, dict) else {}
    out = {}
    for key, inner in value.items():
        if key in patch:
            out[key] = restamp(old.get(key), inner, patch[key], timestamp)
        else:
            out[key] = old[key] if key in old else metadata_for(inner, timestamp)
    return out


def delta(desired, reported):
    """The desired fields whose value differs from (or is missing in) reported."""
    out = {}
    for key, want in desired.items():
        have = reported.get(key) if isinstance(reported, dict) else None
        if isinstance(want, dict) and isinstance(have, dict):
            inner = delta(want, have)
            if inner:
                out[key] = inner
        elif key not in (reported or {}) or want != have:
            out[key] = copy.deepcopy(want)
    return out


def pick(tree, shape):
    """The parts of the metadata `tree` at the paths present in `shape`."""
    if not isinstance(shape, dict) or not isinstance(tree, dict):
        return tree
    return {key: pick(tree.get(key), inner) for key, inner in shape.items() if key in tree}


class Shadow:
    """One shadow document: desired and reported state, their metadata, a version."""

    def __init__(self, version):
        self.state = {}      # "desired" / "reported" -> dict, absent when empty
        self.metadata = {}   # the same shape, leaves {"timestamp": T}
        self.version = version

    def snapshot(self):
        return {"state": copy.deepcopy(self.state), "metadata": copy.deepcopy(self.metadata),
                "version": self.version}

    def current_delta(self):
        return delta(self.state.get("desired", {}), self.state.get("reported", {}))

    def apply(self, requested, timestamp):
        for section in ("desired", "reported"):
            if section not in requested:
                continue
            value = requested[section]
            if value is None:
                self.state.pop(section, None)
                self.metadata.pop(section, None)
                continue
            merged = self.state.get(section, {})
            merge(merged, value)
            if merged:
                self.state[section] = merged
                self.metadata[section] = restamp(self.metadata.get(section), merged, value, timestamp)
            else:
                self.state.pop(section, None)
                self.metadata.pop(section, None)
        self.version += 1


# ---------------------------------------------------------------- the stand-in

class Services:
    """Shadow and jobs state, and the handling of one request message at a time (paho
    calls on_message from its single network thread, so no locking is needed)."""

    def __init__(self, client, verbose):
        self.client = client
        self.verbose = verbose
        self.shadows = {}        # (thing, shadow name or "") -> Shadow
        self.last_version = {}   # (thing, shadow name or "") -> version when deleted
        self.jobs = {}           # thing -> {jobId: execution dict}, in creation order

    def publish(self, topic, payload):
        self.client.publish(topic, json.dumps(payload), qos=1)

    def log(self, **event):
        if self.verbose:
            print(json.dumps(event), flush=True)

    # ---- dispatch

    def handle(self, topic, raw):
        if topic == CONTROL_CREATE_JOB:
            self.create_job(raw)
            return
        parts = topic.split("/")
        if len(parts) < 5 or parts[0] != "$aws" or parts[1] != "things":
            return
        thing, service, rest = parts[2], parts[3], parts[4:]
        if service == "shadow":
            name = ""
            if len(rest) >= 2 and rest[0] == "name":
                name, rest = rest[1], rest[2:]
            # Only the three request topics; every longer topic is a reply (ours or not).
            if len(rest) == 1 and rest[0] in ("get", "update", "delete"):
                prefix = "/".join(parts[: len(parts) - 1])
                self.log(event="request", topic=topic)
                getattr(self, "shadow_" + rest[0])(thing, name, prefix, raw)
        elif service == "jobs":
            if rest == ["get"]:
                self.log(event="request", topic=topic)
                self.jobs_get(thing, topic, raw)
            elif rest == ["start-next"]:
                self.log(event="request", topic=topic)
                self.jobs_start_next(thing, topic, raw)
            elif len(rest) == 2 and rest[1] in ("get", "update"):
                self.log(event="request", topic=topic)
                if rest[1] == "get":
                    self.job_get(thing, rest[0], topic, raw)
                else:
                    self.job_update(thing, rest[0], topic, raw)

    # ---- shadows

    def shadow_rejected(self, topic, code, message, request):
        self.publish(topic + "/rejected",
                     with_token({"code": code, "message": message, "timestamp": now()}, request))

    def shadow_get(self, thing, name, prefix, raw):
        topic = prefix + "/get"
        request = parse_json_object(raw)
        if request is None:
            return self.shadow_rejected(topic, 400, "Invalid JSON", {})
        shadow = self.shadows.get((thing, name))
        if shadow is None:
            return self.shadow_rejected(topic, 404, f"no shadow {name or 'classic'} for {thing}", request)
        answer = shadow.snapshot()
        found = shadow.current_delta()
        if found:
            answer["state"]["delta"] = found
        answer["timestamp"] = now()
        self.publish(topic + "/accepted", with_token(answer, request))

    def shadow_update(self, thing, name, prefix, raw):
        topic = prefix + "/update"
        request = parse_json_object(raw)
        if request is None:
            return self.shadow_rejected(topic, 400, "Invalid JSON", {})
        requested = request.get("state")
        if not isinstance(requested, dict):
            return self.shadow_rejected(topic, 400, "Missing required node: state", request)
        for section, value in requested.items():
            if section not in ("desired", "reported") or not (value is None or isinstance(value, dict)):
                return self.shadow_rejected(topic, 400, f"invalid state node: {section}", request)
        key = (thing, name)
        shadow = self.shadows.get(key)
        current_version = shadow.version if shadow else self.last_version.get(key, 0)
        if "version" in request and request["version"] != current_version:
            return self.shadow_rejected(topic, 409, "Version conflict", request)

        previous = shadow.snapshot() if shadow else None
        if shadow is None:
            shadow = self.shadows[key] = Shadow(current_version)
        timestamp = now()
        shadow.apply(requested, timestamp)

        accepted = {"state": requested, "metadata": metadata_for(requested, timestamp),
                    "version": shadow.version, "timestamp": timestamp}
        self.publish(topic + "/accepted", with_token(accepted, request))
        documents = {"current": shadow.snapshot(), "timestamp": timestamp}
        if previous is not None:
            documents["previous"] = previous
        self.publish(topic + "/documents", with_token(documents, request))
        found = shadow.current_delta()
        if requested.get("desired") and found:
            event = {"state": found, "metadata": pick(shadow.metadata.get("desired", {}), found),
                     "version": shadow.version, "timestamp": timestamp}
            self.publish(topic + "/delta", with_token(event, request))

    def shadow_delete(self, thing, name, prefix, raw):
        topic = prefix + "/delete"
        request = parse_json_object(raw)
        if request is None:
            return self.shadow_rejected(topic, 400, "Invalid JSON", {})
        shadow = self.shadows.pop((thing, name), None)
        if shadow is None:
            return self.shadow_rejected(topic, 404, f"no shadow {name or 'classic'} for {thing}", request)
        self.last_version[(thing, name)] = shadow.version
        self.publish(topic + "/accepted",
                     with_token({"version": shadow.version, "timestamp": now()}, request))

    # ---- jobs

    def pending(self, thing):
        executions = self.jobs.get(thing, {}).values()
        return ([e for e in executions if e["status"] == "IN_PROGRESS"]
                + [e for e in executions if e["status"] == "QUEUED"])

    def next_pending(self, thing):
        found = self.pending(thing)
        return found[0] if found else None

    @staticmethod
    def summary(execution):
        fields = ("jobId", "queuedAt", "startedAt", "lastUpdatedAt", "versionNumber", "executionNumber")
        return {k: execution[k] for k in fields if k in execution}

    def pending_lists(self, thing):
        lists = {}
        for execution in self.pending(thing):
            lists.setdefault(execution["status"], []).append(self.summary(execution))
        return lists

    def changing(self, thing):
        """What notify / notify-next compare: call before a change, then notify_changes."""
        upcoming = self.next_pending(thing)
        return (upcoming["jobId"] if upcoming else None, self.pending_lists(thing))

    def notify_changes(self, thing, before):
        next_before, lists_before = before
        lists = self.pending_lists(thing)
        timestamp = now()
        if lists != lists_before:
            self.publish(f"$aws/things/{thing}/jobs/notify", {"timestamp": timestamp, "jobs": lists})
        upcoming = self.next_pending(thing)
        if (upcoming["jobId"] if upcoming else None) != next_before:
            event = {"timestamp": timestamp}
            if upcoming:
                event["execution"] = copy.deepcopy(upcoming)
            self.publish(f"$aws/things/{thing}/jobs/notify-next", event)

    def jobs_rejected(self, topic, code, message, request, execution=None):
        payload = {"code": code, "message": message, "timestamp": now()}
        if execution is not None:
            payload["executionState"] = self.execution_state(execution)
        self.publish(topic + "/rejected", with_token(payload, request))

    @staticmethod
    def execution_state(execution):
        state = {"status": execution["status"], "versionNumber": execution["versionNumber"]}
        if "statusDetails" in execution:
            state["statusDetails"] = execution["statusDetails"]
        return state

    def create_job(self, raw):
        order = parse_json_object(raw)
        if (not order or not isinstance(order.get("thing"), str) or not isinstance(order.get("jobId"), str)
                or not isinstance(order.get("document"), dict)):
            print(f"iot_services: ignored bad {CONTROL_CREATE_JOB} message: {raw!r}", file=sys.stderr, flush=True)
            return
        thing, job_id = order["thing"], order["jobId"]
        executions = self.jobs.setdefault(thing, {})
        if job_id in executions:
            print(f"iot_services: {thing} already has job {job_id}; ignored", file=sys.stderr, flush=True)
            return
        before = self.changing(thing)
        timestamp = now()
        executions[job_id] = {
            "jobId": job_id, "thingName": thing, "jobDocument": order["document"],
            "status": "QUEUED", "queuedAt": timestamp, "lastUpdatedAt": timestamp,
            "versionNumber": 1, "executionNumber": 1,
        }
        self.log(event="job_created", thing=thing, jobId=job_id)
        self.notify_changes(thing, before)

    def jobs_get(self, thing, topic, raw):
        request = parse_json_object(raw)
        if request is None:
            return self.jobs_rejected(topic, "InvalidJson", "payload is not a JSON object", {})
        lists = self.pending_lists(thing)
        self.publish(topic + "/accepted", with_token({
            "inProgressJobs": lists.get("IN_PROGRESS", []), "queuedJobs": lists.get("QUEUED", []),
            "timestamp": now()}, request))

    def jobs_start_next(self, thing, topic, raw):
        request = parse_json_object(raw)
        if request is None:
            return self.jobs_rejected(topic, "InvalidJson", "payload is not a JSON object", {})
        details = request.get("statusDetails")
        if details is not None and not isinstance(details, dict):
            return self.jobs_rejected(topic, "InvalidRequest", "statusDetails must be an object", request)
        before = self.changing(thing)
        execution = self.next_pending(thing)
        answer = {"timestamp": now()}
        if execution is not None:
            if execution["status"] == "QUEUED":
                execution["status"] = "IN_PROGRESS"
                execution["startedAt"] = execution["lastUpdatedAt"] = answer["timestamp"]
                execution["versionNumber"] += 1
                if details is not None:
                    execution["statusDetails"] = details
            answer["execution"] = copy.deepcopy(execution)
        self.publish(topic + "/accepted", with_token(answer, request))
        self.notify_changes(thing, before)

    def job_get(self, thing, job_id, topic, raw):
        request = parse_json_object(raw)
        if request is None:
            return self.jobs_rejected(topic, "InvalidJson", "payload is not a JSON object", {})
        if job_id == "$next":
            execution = self.next_pending(thing)
        else:
            execution = self.jobs.get(thing, {}).get(job_id)
        number = request.get("executionNumber")
        if execution is None or (number is not None and number != execution["executionNumber"]):
            return self.jobs_rejected(topic, "ResourceNotFound", f"no execution of {job_id} on {thing}", request)
        shown = copy.deepcopy(execution)
        if request.get("includeJobDocument", True) is False:
            shown.pop("jobDocument", None)
        self.publish(topic + "/accepted", with_token({"execution": shown, "timestamp": now()}, request))

    def job_update(self, thing, job_id, topic, raw):
        request = parse_json_object(raw)
        if request is None:
            return self.jobs_rejected(topic, "InvalidJson", "payload is not a JSON object", {})
        execution = self.jobs.get(thing, {}).get(job_id)
        if execution is None:
            return self.jobs_rejected(topic, "ResourceNotFound", f"no execution of {job_id} on {thing}", request)
        status = request.get("status")
        if status not in DEVICE_SETTABLE:
            return self.jobs_rejected(topic, "InvalidRequest", f"status must be one of {', '.join(DEVICE_SETTABLE)}", request)
        details = request.get("statusDetails")
        if details is not None and not isinstance(details, dict):
            return self.jobs_rejected(topic, "InvalidRequest", "statusDetails must be an object", request)
        number = request.get("executionNumber")
        if number is not None and number != execution["executionNumber"]:
            return self.jobs_rejected(topic, "ResourceNotFound", f"no execution number {number}", request)
        expected = request.get("expectedVersion")
        if expected is not None and expected != execution["versionNumber"]:
            return self.jobs_rejected(topic, "VersionMismatch", f"version is {execution['versionNumber']}",
                                      request, execution)
        if execution["status"] in TERMINAL:
            return self.jobs_rejected(topic, "InvalidStateTransition",
                                      f"execution is already {execution['status']}", request, execution)

        before = self.changing(thing)
        timestamp = now()
        if status == "IN_PROGRESS" and "startedAt" not in execution:
            execution["startedAt"] = timestamp
        execution["status"] = status
        execution["lastUpdatedAt"] = timestamp
        execution["versionNumber"] += 1
        if details is not None:
            execution["statusDetails"] = details
        answer = {"timestamp": timestamp}
        if request.get("includeJobExecutionState"):
            answer["executionState"] = self.execution_state(execution)
        if request.get("includeJobDocument"):
            answer["jobDocument"] = copy.deepcopy(execution["jobDocument"])
        self.publish(topic + "/accepted", with_token(answer, request))
        self.notify_changes(thing, before)


def main():
    parser = argparse.ArgumentParser(description="Stand-in for IoT Core's Device Shadow and Jobs services.")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ready-file")
    parser.add_argument("--client-id", default=f"iot-services-standin-{os.getpid()}")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=args.ca, certfile=args.cert, keyfile=args.key)
    client.reconnect_delay_set(min_delay=1, max_delay=5)
    services = Services(client, args.verbose)
    ready = {"done": False}

    def on_connect(client, userdata, flags, reason, properties):
        if reason.is_failure:
            print(f"iot_services: broker refused the connection: {reason}", file=sys.stderr, flush=True)
            return
        # No-local: the stand-in never hears its own replies (it ignores reply topics too).
        client.subscribe([(f, SubscribeOptions(qos=1, noLocal=True)) for f in REQUEST_FILTERS])

    def on_subscribe(client, userdata, mid, reasons, properties):
        refused = [f for f, r in zip(REQUEST_FILTERS, reasons) if r.is_failure]
        if refused:
            print(f"iot_services: subscription refused (broker ACL?): {refused}", file=sys.stderr, flush=True)
            os._exit(1)
        if ready["done"]:
            return
        ready["done"] = True
        if args.ready_file:
            partial = args.ready_file + ".partial"
            with open(partial, "w") as f:
                f.write(json.dumps({"pid": os.getpid()}) + "\n")
            os.replace(partial, args.ready_file)
        print(json.dumps({"event": "ready"}), flush=True)

    def on_message(client, userdata, message):
        try:
            services.handle(message.topic, message.payload.decode("utf-8", "replace"))
        except Exception as error:  # one bad request must not stop the stand-in
            print(f"iot_services: {message.topic}: {error!r}", file=sys.stderr, flush=True)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message

    def stop(signum, frame):
        client.disconnect()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    client.connect(args.host, args.port, keepalive=30, clean_start=True)
    client.loop_forever(retry_first_connection=False)


if __name__ == "__main__":
    main()
