// `node --import ./testing/register.js --test`: the plugin under Node, the host stubbed.
import assert from "node:assert/strict";
import { test } from "node:test";

import { routing } from "./app.js";

test("bulk goes to Kinesis", () => {
    routing.init([]);
    const message = {
        id: "m1", deviceId: "dev-1", topic: "bulk/1/upload", contentType: "", qos: 0,
        attributes: [], receivedAtMs: 0n, payload: new Uint8Array([120]),
    };
    const [decision] = routing.route([message]);
    assert.equal(decision.destination.tag, "kinesis");
});
