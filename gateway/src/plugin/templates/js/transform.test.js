// `node --import ./testing/register.js --test`: the plugin under Node, the host stubbed.
import assert from "node:assert/strict";
import { test } from "node:test";

import { transformer } from "./app.js";

test("a message is tagged", () => {
    transformer.init([]);
    const message = {
        id: "m1", deviceId: "dev-1", topic: "sites/1/temp", contentType: "", qos: 0,
        attributes: [], receivedAtMs: 0n, payload: new Uint8Array([123, 125]),
    };
    const [outcome] = transformer.transform([message]);
    assert.equal(outcome.tag, "keep");
    assert.deepEqual(outcome.val.attributes, [["{{name}}.seen", "true"]]);
});
