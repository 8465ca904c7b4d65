// The router's rules, under Node with the host import stubbed (`npm test`, or
// `node --import ../../sdk/js/testing/register.js --test`). The same module is what
// scripts/build-js-plugins builds into payload_router_js.wasm.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { beforeEach, test } from "node:test";

import * as host from "../../sdk/js/testing/host.js";
import { routing } from "./router.js";

/** A message as the gateway passes it, with a JSON (or raw text) payload. */
function message(payload, { deviceId = "dev-1", topic = "sites/7/x" } = {}) {
    const text = typeof payload === "string" ? payload : JSON.stringify(payload);
    return {
        id: "m",
        deviceId,
        topic,
        contentType: "application/json",
        qos: 0,
        attributes: [],
        receivedAtMs: 1_764_000_000_000n,
        payload: new TextEncoder().encode(text),
    };
}

/** Routes one message with the given config. */
function route(payload, config = {}, options) {
    routing.init(Object.entries(config));
    const [decision] = routing.route([message(payload, options)]);
    return decision;
}

beforeEach(() => host.reset());

test("an alarm goes to IoT Core on alarms/<device>", () => {
    const decision = route({ alarm: true, site_id: "s7" }, {}, { deviceId: "boiler-12" });
    assert.deepEqual(decision, {
        destination: { tag: "iot-core", val: { topic: "alarms/boiler-12", qos: 1 } },
        reason: "alarm",
    });
    assert.equal(host.counters.get("alarms"), 1n);
});

test("alarm must be the boolean true", () => {
    for (const alarm of ["true", 1, false, null]) {
        assert.equal(route({ alarm }).destination, undefined, `alarm: ${JSON.stringify(alarm)}`);
    }
});

test("an alarm wins over bulk, and the prefix and qos come from the config", () => {
    const decision = route(
        { alarm: true, bulk: true },
        { alarm_topic_prefix: "plant/alarms/", qos: "0" },
        { deviceId: "d9" },
    );
    assert.deepEqual(decision.destination, {
        tag: "iot-core",
        val: { topic: "plant/alarms/d9", qos: 0 },
    });
});

test("a bulk flag goes to Kinesis, partitioned by the site id", () => {
    const decision = route({ bulk: true, site_id: "north-7" }, { stream: "uploads" });
    assert.deepEqual(decision, {
        destination: {
            tag: "kinesis",
            val: { stream: "uploads", partitionKey: "north-7", explicitHashKey: undefined },
        },
        reason: "bulk flag",
    });
    assert.equal(host.counters.get("bulk"), 1n);
});

test("a readings array from bulk_readings entries on is bulk; one less is not", () => {
    const readings = (n) => Array.from({ length: n }, (_, i) => i);
    const config = { bulk_readings: "5", readings_field: "r" };
    const decision = route({ r: readings(5), site_id: 12 }, config);
    assert.equal(decision.destination.tag, "kinesis");
    assert.equal(decision.destination.val.partitionKey, "12", "a numeric site id, as text");
    assert.equal(decision.reason, "bulk: 5 readings");
    assert.equal(route({ r: readings(4) }, config).destination, undefined);
    assert.equal(
        route({ readings: readings(5) }, config).destination,
        undefined,
        "the configured field is read, not `readings`",
    );
});

test("without the partition key field the key is empty (the gateway uses the device id)", () => {
    for (const site_id of [undefined, { nested: 1 }, true]) {
        const decision = route({ bulk: true, site_id });
        assert.equal(decision.destination.val.partitionKey, "", JSON.stringify(site_id));
    }
    const byDevice = route({ bulk: true, plant: "p1" }, { partition_key_field: "plant" });
    assert.equal(byDevice.destination.val.partitionKey, "p1");
});

test("anything else keeps the built-in decision, and says why", () => {
    assert.deepEqual(route({ temp: 21.5 }), { destination: undefined, reason: "no payload rule" });
    for (const payload of ["not json", "[1, 2]", "null", "7"]) {
        assert.deepEqual(route(payload), {
            destination: undefined,
            reason: "payload is not a JSON object",
        });
    }
    assert.equal(host.counters.get("not_json"), 4n);
});

test("a bad config refuses the plugin with a reason", () => {
    for (const [config, reason] of [
        [{ qos: "2" }, "qos must be 0 or 1, not `2`"],
        [{ bulk_readings: "0" }, "bulk_readings must be a whole number of at least 1, not `0`"],
        [{ bulk_readings: "lots" }, "bulk_readings must be a whole number of at least 1, not `lots`"],
        [{ partition_key: "site" }, "unknown config keys: partition_key"],
    ]) {
        assert.throws(() => routing.init(Object.entries(config)), (error) => error === reason);
    }
});

test("every sample gets the decision its README promises", () => {
    const samples = readFileSync(new URL("./samples.jsonl", import.meta.url), "utf8")
        .trim()
        .split("\n")
        .map((line) => JSON.parse(line));
    routing.init([]);
    const decisions = routing.route(
        samples.map((s) => message(s.payload ?? s.payload_text, { deviceId: s.device_id })),
    );
    assert.deepEqual(
        decisions.map((d) => d.destination?.tag ?? "built-in"),
        ["iot-core", "kinesis", "kinesis", "built-in", "built-in"],
    );
});
