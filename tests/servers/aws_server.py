#!/usr/bin/env python3
"""moto in server mode, wrapped with what Sluice's tests need and moto lacks.

Every request goes to moto's own server app (the one `moto_server` serves: a
DomainDispatcherApplication that picks the AWS service from the SigV4 credential scope),
except for these additions:

  GET    /_sluice/health      200 once the server answers.

  IoT certificate ids are IoT Core's (the SHA-256 of the DER certificate), not moto's
  default (the SHA-256 of the PEM text): moto's own `iot.use_valid_cert` setting, which
  its configuration API does not expose, is turned on at start.

  IoT data-plane publishes (`POST /topics/{topic}?qos=N`) are recorded before moto sees
  them (moto has no API to read them back):
  GET    /_sluice/published   JSON list, oldest first, of
                              {"topic", "qos", "retain", "payload_b64", "content_type",
                               "query", "mqtt5_headers", "signing_service", "status"}
                              topic is URL-decoded; qos/retain are null when absent;
                              content_type is the HTTP header (the MQTT5 content type is
                              the contentType query parameter, in "query");
                              signing_service is the SigV4 scope's service ("iotdata"),
                              null if unsigned; status is moto's HTTP status.
  DELETE /_sluice/published   forget them.

  Fault injection for Kinesis PutRecords (header X-Amz-Target: Kinesis_20131202.PutRecords):
  POST   /_sluice/faults      {"put_records": [{"kind": "throttle", "times": 2},
                                               {"kind": "partial", "times": 1, "fail_every": 2},
                                               {"kind": "error500", "times": 1}]}
                              appends to a queue; each PutRecords call takes one `times` from
                              the head of the queue (times defaults to 1).
      throttle  HTTP 400 {"__type": "ProvisionedThroughputExceededException", ...}
      error500  HTTP 500 {"__type": "InternalFailure", "message": "injected"}
      partial   records at indices 0, k, 2k, ... (i % fail_every == 0, fail_every = k,
                default 2) are answered as failed with ErrorCode
                ProvisionedThroughputExceededException and are NOT stored: only the other
                records are forwarded to moto, and moto's answer is merged back in the
                original order with FailedRecordCount set. Index 0 always fails, so a
                partial fault always fails at least one record; fail_every=1 fails all.
                A batch that breaks a PutRecords limit (over 500 records, a record over
                1 MiB, over 5 MiB in all) is sent to moto unchanged, so the client sees the
                validation error, and the fault stays queued; so does it when moto answers
                the forwarded records with an error (e.g. ResourceNotFoundException).
                throttle and error500 are used up by any PutRecords call.
  GET    /_sluice/faults      what is still queued.
  DELETE /_sluice/faults      clear the queue.
  POST   /_sluice/hold        pause Kinesis: every PutRecords call from now on waits (before
                              any fault applies) until the hold is released; a paused sink
                              whose calls are neither answered nor refused.
  DELETE /_sluice/hold        release the hold: the waiting calls go on to moto.
  GET    /_sluice/hold        {"holding": bool, "waiting": N}: N calls are waiting now.
  GET    /_sluice/stats       {"put_records_calls": N, "put_records_records": M,
                               "faults_applied": F}; every PutRecords call counts, faulted
                              or not; M sums the records in the requests as sent.
  DELETE /_sluice/stats       reset the counters.

Usage: python aws_server.py --port PORT [--port-file FILE]   (binds 127.0.0.1; --port 0
picks a free port, which --port-file receives once the socket is bound). Logs to stderr.
"""

import argparse
import base64
import io
import json
import logging
import os
import signal
import sys
import threading
import urllib.parse
import uuid

from werkzeug.serving import make_server
from werkzeug.wsgi import get_input_stream

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)

log = logging.getLogger("sluice-aws")

PUT_RECORDS_TARGET = "Kinesis_20131202.PutRecords"
AMZ_JSON_11 = "application/x-amz-json-1.1"
MAX_RECORDS = 500
MAX_RECORD_BYTES = 1024 * 1024
MAX_BATCH_BYTES = 5 * 1024 * 1024
FAULT_KINDS = ("throttle", "partial", "error500")
THROTTLE_MESSAGE = "Rate exceeded for shard"


class BadRequest(Exception):
    pass


# ---------------------------------------------------------------- WSGI helpers

def read_body(environ):
    """Reads the request body and puts it back so the next app can read it again."""
    body = get_input_stream(environ).read()
    replace_body(environ, body)
    return body


def replace_body(environ, body):
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    environ.pop("wsgi.input_terminated", None)
    environ.pop("HTTP_TRANSFER_ENCODING", None)


def call_app(app, environ):
    """Runs a WSGI app to completion; returns (status line, headers, body bytes)."""
    captured = {}

    def start_response(status, headers, exc_info=None):
        captured["status"], captured["headers"] = status, list(headers)
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    return captured["status"], captured["headers"], body


def respond(start_response, status, body, content_type="application/json", headers=()):
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    start_response(status, [("Content-Type", content_type),
                            ("Content-Length", str(len(body))), *headers])
    return [body]


def aws_json_error(start_response, status, error_type, message):
    return respond(start_response, status, {"__type": error_type, "message": message},
                   content_type=AMZ_JSON_11,
                   headers=[("x-amzn-RequestId", str(uuid.uuid4()))])


def signing_service(environ):
    """The service name in the SigV4 credential scope, or None if the request is unsigned."""
    try:
        scope = environ["HTTP_AUTHORIZATION"].split(",")[0].split()[1]
        return scope.split("/")[3]
    except (KeyError, IndexError):
        return None


def raw_path(environ):
    """The request path still percent-encoded, as the client sent it."""
    uri = environ.get("REQUEST_URI") or environ.get("RAW_URI")
    if uri:
        return urllib.parse.urlsplit(uri).path
    return urllib.parse.quote(environ.get("PATH_INFO", "").encode("latin-1"))


# ---------------------------------------------------------------- the state tests control

class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.published = []
        self.faults = []
        self.released = threading.Event()
        self.released.set()
        self.waiting = 0
        self.reset_stats()

    def reset_stats(self):
        self.stats = {"put_records_calls": 0, "put_records_records": 0, "faults_applied": 0}

    def add_faults(self, spec):
        if not isinstance(spec, dict) or set(spec) - {"put_records"}:
            raise BadRequest('expected {"put_records": [...]}')
        entries = spec.get("put_records", [])
        if not isinstance(entries, list):
            raise BadRequest("put_records must be a list")
        parsed = [parse_fault(entry) for entry in entries]
        with self.lock:
            self.faults.extend(parsed)
            return list(self.faults)

    def next_fault(self, batch_is_valid):
        """Takes one use of the fault at the head of the queue, if any applies."""
        with self.lock:
            if not self.faults:
                return None
            fault = self.faults[0]
            if fault["kind"] == "partial" and not batch_is_valid:
                return None
            fault["times"] -= 1
            if fault["times"] == 0:
                self.faults.pop(0)
            self.stats["faults_applied"] += 1
            return fault

    def give_back(self, fault):
        """Undoes next_fault() for a call the fault turned out not to apply to."""
        with self.lock:
            fault["times"] += 1
            if not self.faults or self.faults[0] is not fault:
                self.faults.insert(0, fault)
            self.stats["faults_applied"] -= 1


def parse_fault(entry):
    if not isinstance(entry, dict):
        raise BadRequest("each fault must be an object")
    unknown = set(entry) - {"kind", "times", "fail_every"}
    if unknown:
        raise BadRequest(f"unknown fault fields: {sorted(unknown)}")
    kind = entry.get("kind")
    if kind not in FAULT_KINDS:
        raise BadRequest(f"kind must be one of {FAULT_KINDS}, not {kind!r}")
    fault = {"kind": kind, "times": entry.get("times", 1)}
    if kind == "partial":
        fault["fail_every"] = entry.get("fail_every", 2)
    elif "fail_every" in entry:
        raise BadRequest("fail_every applies to partial faults only")
    for key in ("times", "fail_every"):
        value = fault.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadRequest(f"{key} must be an integer >= 1")
    return fault


def batch_is_valid(records):
    """Whether a PutRecords batch keeps within the limits moto (and Kinesis) check."""
    if not isinstance(records, list) or not 1 <= len(records) <= MAX_RECORDS:
        return False
    total = 0
    for record in records:
        try:
            size = len(base64.b64decode(record.get("Data", ""))) + len(record.get("PartitionKey", ""))
        except (AttributeError, ValueError, TypeError):
            return False
        if size > MAX_RECORD_BYTES:
            return False
        total += size
    return total <= MAX_BATCH_BYTES


# ---------------------------------------------------------------- the application

class SluiceAwsApp:
    def __init__(self, moto_app):
        self.moto = moto_app
        self.state = State()

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path.startswith("/_sluice/"):
            return self.control(method, path[len("/_sluice/"):], environ, start_response)
        if method == "POST" and path.startswith("/topics/"):
            return self.record_publish(environ, start_response)
        if method == "POST" and environ.get("HTTP_X_AMZ_TARGET") == PUT_RECORDS_TARGET:
            return self.put_records(environ, start_response)
        return self.moto(environ, start_response)

    # ---- /_sluice/ endpoints

    def control(self, method, name, environ, start_response):
        state = self.state
        try:
            if name == "health" and method == "GET":
                return respond(start_response, "200 OK", {"ok": True})
            if name == "published" and method in ("GET", "DELETE"):
                with state.lock:
                    answer = list(state.published)
                    if method == "DELETE":
                        state.published.clear()
                return respond(start_response, "200 OK", answer)
            if name == "faults" and method == "POST":
                try:
                    spec = json.loads(read_body(environ) or b"{}")
                except ValueError as err:
                    raise BadRequest(f"invalid JSON: {err}") from err
                return respond(start_response, "200 OK", {"put_records": state.add_faults(spec)})
            if name == "faults" and method in ("GET", "DELETE"):
                with state.lock:
                    answer = {"put_records": [dict(f) for f in state.faults]}
                    if method == "DELETE":
                        state.faults.clear()
                return respond(start_response, "200 OK", answer)
            if name == "hold" and method in ("POST", "DELETE", "GET"):
                if method == "POST":
                    state.released.clear()
                elif method == "DELETE":
                    state.released.set()
                with state.lock:
                    answer = {"holding": not state.released.is_set(), "waiting": state.waiting}
                return respond(start_response, "200 OK", answer)
            if name == "stats" and method in ("GET", "DELETE"):
                with state.lock:
                    answer = dict(state.stats)
                    if method == "DELETE":
                        state.reset_stats()
                return respond(start_response, "200 OK", answer)
        except BadRequest as err:
            return respond(start_response, "400 Bad Request", {"error": str(err)})
        return respond(start_response, "404 Not Found",
                       {"error": f"no {method} /_sluice/{name}"})

    # ---- IoT data plane

    def record_publish(self, environ, start_response):
        body = read_body(environ)
        query = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
        qos = query.get("qos")
        retain = query.get("retain")
        encoded_topic = raw_path(environ)[len("/topics/"):]
        topic = urllib.parse.unquote_to_bytes(encoded_topic.encode("latin-1")).decode("utf-8", "replace")
        entry = {
            "topic": topic,
            "qos": int(qos) if qos is not None and qos.isdigit() else qos,
            "retain": None if retain is None else retain.lower() == "true",
            "payload_b64": base64.b64encode(body).decode(),
            # The HTTP Content-Type header. The MQTT5 content type of the Publish API is a
            # query parameter (contentType), found in "query" with the others
            # (responseTopic, messageExpiry, ...).
            "content_type": environ.get("CONTENT_TYPE") or None,
            "query": query,
            # x-amz-mqtt5-user-properties, -payload-format-indicator, -correlation-data
            "mqtt5_headers": {
                key[len("HTTP_"):].replace("_", "-").lower(): value
                for key, value in environ.items() if key.startswith("HTTP_X_AMZ_MQTT5_")
            },
            "signing_service": signing_service(environ),
            "status": None,
        }
        with self.state.lock:
            self.state.published.append(entry)

        def recording_start_response(status, headers, exc_info=None):
            entry["status"] = int(status.split()[0])
            return start_response(status, headers, exc_info)

        return self.moto(environ, recording_start_response)

    # ---- Kinesis PutRecords

    def put_records(self, environ, start_response):
        body = read_body(environ)
        try:
            request = json.loads(body)
            records = request.get("Records")
        except (ValueError, AttributeError):
            request, records = None, None
        with self.state.lock:
            self.state.stats["put_records_calls"] += 1
            if isinstance(records, list):
                self.state.stats["put_records_records"] += len(records)
        self.wait_while_held()

        fault = self.state.next_fault(batch_is_valid(records))
        if fault is None:
            return self.moto(environ, start_response)
        log.info("PutRecords: injecting a %s fault (%d more of it queued)", fault["kind"], fault["times"])
        if fault["kind"] == "throttle":
            return aws_json_error(start_response, "400 Bad Request",
                                  "ProvisionedThroughputExceededException", THROTTLE_MESSAGE)
        if fault["kind"] == "error500":
            return aws_json_error(start_response, "500 Internal Server Error",
                                  "InternalFailure", "injected")
        return self.partial_failure(environ, start_response, request, fault)

    def wait_while_held(self):
        state = self.state
        if state.released.is_set():
            return
        with state.lock:
            state.waiting += 1
        try:
            # Bounded, so that a test that forgets to release cannot wedge the server.
            if not state.released.wait(timeout=300):
                log.warning("PutRecords: held for 300 s; going on")
        finally:
            with state.lock:
                state.waiting -= 1

    def partial_failure(self, environ, start_response, request, fault):
        records, fail_every = request["Records"], fault["fail_every"]
        failed = {i for i in range(len(records)) if i % fail_every == 0}
        forwarded = [r for i, r in enumerate(records) if i not in failed]
        replace_body(environ, json.dumps({**request, "Records": forwarded}).encode())
        status, headers, body = call_app(self.moto, environ)
        if not status.startswith("200"):
            # e.g. ResourceNotFoundException: the client sees moto's own error, as Kinesis
            # would answer it before throttling anything, and the fault stays queued.
            self.state.give_back(fault)
            start_response(status, headers)
            return [body]

        answer = json.loads(body)
        stored = iter(answer.get("Records", []))
        merged = []
        for i in range(len(records)):
            if i in failed:
                merged.append({"ErrorCode": "ProvisionedThroughputExceededException",
                               "ErrorMessage": f"{THROTTLE_MESSAGE} (injected partial failure)"})
            else:
                merged.append(next(stored))
        answer["Records"] = merged
        answer["FailedRecordCount"] = sum(1 for r in merged if "ErrorCode" in r)
        body = json.dumps(answer).encode()
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(body))))
        start_response(status, headers)
        return [body]


# ---------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--port-file", help="write the bound port here once listening")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from moto.core.config import default_user_config
    default_user_config["iot"] = {"use_valid_cert": True}
    app = SluiceAwsApp(DomainDispatcherApplication(create_backend_app))
    server = make_server(args.host, args.port, app, threaded=True,
                         request_handler=MotoRequestHandler)
    port = server.server_port
    # moto builds some URLs that point back at itself from MOTO_PORT, as moto_server does.
    os.environ["MOTO_PORT"] = str(port)
    if args.port_file:
        tmp = f"{args.port_file}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, args.port_file)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    log.info("listening on http://%s:%d", args.host, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
