// The json-enricher's work in JavaScript, for comparing the languages' per-message cost
// (scripts/bench-js-plugins): parse the JSON payload, add the device id and the receive
// time (a non-object is wrapped as `{"value": …}`), write it back; not JSON fails.

import { Outcome, exportTransform, payloadJson, withJson } from "../../sdk/js/sluice.js";

class Enricher {
    /** @param {import("../../sdk/js/sluice.js").Message} message */
    transform(message) {
        let value;
        try {
            value = payloadJson(message);
        } catch {
            return Outcome.fail("payload is not valid JSON");
        }
        const object =
            value !== null && typeof value === "object" && !Array.isArray(value) ? value : { value };
        object.device_id = message.deviceId;
        object.received_at_ms = Number(message.receivedAtMs);
        return Outcome.keep(withJson(message, object));
    }
}

export const transformer = exportTransform(Enricher);
