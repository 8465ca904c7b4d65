// The SDK's batching and error handling, under Node with the host import stubbed
// (`node --import ./testing/register.js --test`).
import assert from "node:assert/strict";
import { beforeEach, test } from "node:test";

import * as host from "./testing/host.js";
import {
    Decision,
    Outcome,
    counter,
    exportRouter,
    exportTransform,
    log,
    payloadJson,
    withJson,
} from "./sluice.js";

/** A message as the gateway passes it. */
function message(payload, id = "m1") {
    return {
        id,
        deviceId: "dev-1",
        topic: "a/b",
        contentType: "",
        qos: 0,
        attributes: [],
        receivedAtMs: 1_764_000_000_000n,
        payload: new TextEncoder().encode(payload),
    };
}

beforeEach(() => host.reset());

test("a transform gets its config as an object and one call per message, in order", () => {
    const seen = [];
    const bindings = exportTransform(
        class {
            constructor(config) {
                this.suffix = config.suffix;
            }
            transform(m) {
                seen.push(m.id);
                const value = payloadJson(m);
                return Outcome.keep(withJson(m, { ...value, suffix: this.suffix }));
            }
        },
    );
    bindings.init([["suffix", "!"]]);
    const outcomes = bindings.transform([message('{"n": 1}', "a"), message('{"n": 2}', "b")]);
    assert.deepEqual(seen, ["a", "b"]);
    assert.deepEqual(
        outcomes.map((o) => JSON.parse(new TextDecoder().decode(o.val.payload))),
        [{ n: 1, suffix: "!" }, { n: 2, suffix: "!" }],
    );
    assert.equal(outcomes[0].val.contentType, "application/json");
});

test("a throw or a non-outcome fails only its own message", () => {
    const bindings = exportTransform(
        class {
            transform(m) {
                const text = new TextDecoder().decode(m.payload);
                if (text === "throw") throw new Error("bad reading");
                if (text === "string") throw "just a string";
                if (text === "nothing") return undefined;
                return Outcome.pass();
            }
        },
    );
    bindings.init([]);
    const outcomes = bindings.transform(
        ["ok", "throw", "string", "nothing", "ok"].map((p) => message(p)),
    );
    assert.deepEqual(outcomes, [
        { tag: "pass" },
        { tag: "fail", val: "bad reading" },
        { tag: "fail", val: "just a string" },
        { tag: "fail", val: "transform returned undefined, not an Outcome" },
        { tag: "pass" },
    ]);
});

test("a constructor that throws refuses the plugin with the error's message as a string", () => {
    const bindings = exportTransform(
        class {
            constructor() {
                throw new Error("threshold must be a number");
            }
            transform() {
                return Outcome.pass();
            }
        },
    );
    // componentize-js turns a thrown value into `result::err`; the err type is `string`.
    assert.throws(() => bindings.init([]), (error) => error === "threshold must be a number");
});

test("a router's throw or bad answer keeps the built-in decision with the error as reason", () => {
    const bindings = exportRouter(
        class {
            route(m) {
                const text = new TextDecoder().decode(m.payload);
                if (text === "throw") throw new TypeError("no field");
                if (text === "bad") return { destination: { tag: "s3" }, reason: "?" };
                return Decision.kinesis({ partitionKey: "k" }, "rule");
            }
        },
    );
    bindings.init([]);
    const decisions = bindings.route(["ok", "throw", "bad"].map((p) => message(p)));
    assert.deepEqual(decisions[0], {
        destination: { tag: "kinesis", val: { stream: "", partitionKey: "k", explicitHashKey: undefined } },
        reason: "rule",
    });
    assert.deepEqual(decisions[1], { destination: undefined, reason: "route failed: no field" });
    assert.equal(decisions[2].destination, undefined);
    assert.match(decisions[2].reason, /^route failed: route returned .*"s3".*, not a Decision$/);
});

test("calling before init is an error, not a silent pass", () => {
    const bindings = exportRouter(class { route() { return Decision.builtin(); } });
    assert.throws(() => bindings.route([message("x")]), /before init/);
});

test("log and counter reach the host import with its types", () => {
    log("warn", "hot", { celsius: 91, site: "s7" });
    counter("alarms");
    counter("alarms", 2);
    assert.deepEqual(host.logs, [
        { level: "warn", message: "hot", fields: [["celsius", "91"], ["site", "s7"]] },
    ]);
    assert.equal(host.counters.get("alarms"), 3n);
});
