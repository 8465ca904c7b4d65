"""The json-enricher's work in Python, for comparing the languages' per-message cost
(scripts/bench-js-plugins): parse the JSON payload, add the device id and the receive
time (a non-object is wrapped as `{"value": ...}`), write it back; not JSON fails."""

import json

import sluice_plugin as sluice


class Enricher(sluice.Transform):
    def transform(self, message):
        try:
            value = json.loads(message.payload)
        except ValueError:
            return sluice.fail("payload is not valid JSON")
        if not isinstance(value, dict):
            value = {"value": value}
        value["device_id"] = message.device_id
        value["received_at_ms"] = message.received_at_ms
        message.payload = json.dumps(value, separators=(",", ":")).encode()
        message.content_type = "application/json"
        return sluice.keep(message)


Transformer = sluice.transformer(Enricher)
