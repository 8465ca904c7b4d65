// The Sluice plugin SDK for JavaScript: write a class with `transform(message)` or
// `route(message)`, export it with `exportTransform` or `exportRouter`; this file does the
// batching, turns exceptions into outcomes, and wraps the host's `log` and counters.
//
// The contract's types come from `wit/plugin.wit`, generated into `types/` by
// `scripts/build-js-plugins` (jco guest-types); nothing here restates them.

import { log as hostLog, counterAdd } from "sluice:plugin/host@0.1.0";

/** @typedef {import("sluice:plugin/types@0.1.0").Message} Message */
/** @typedef {import("sluice:plugin/transformer@0.1.0").Outcome} Outcome */
/** @typedef {import("sluice:plugin/routing@0.1.0").Decision} Decision */
/** @typedef {import("sluice:plugin/routing@0.1.0").Destination} Destination */
/** @typedef {import("sluice:plugin/host@0.1.0").Level} Level */
/** The plugin's `config` table from the gateway's configuration, all values strings. */
/** @typedef {Record<string, string>} Config */

/**
 * Writes a log record through the gateway's logging, tagged with the plugin's name.
 * @param {Level} level `"trace"`, `"debug"`, `"info"`, `"warn"` or `"error"`
 * @param {string} message
 * @param {Record<string, unknown>} [fields] extra key/value pairs (values made strings)
 */
export function log(level, message, fields = {}) {
    hostLog(
        level,
        String(message),
        Object.entries(fields).map(([key, value]) => [key, String(value)]),
    );
}

/**
 * Adds `delta` (default 1) to the plugin's counter `name`, reported with its statistics.
 * @param {string} name
 * @param {number | bigint} [delta]
 */
export function counter(name, delta = 1) {
    counterAdd(name, BigInt(delta));
}

/** The UTF-8 text of a message's payload (invalid bytes become U+FFFD). */
/** @param {Message} message */
export function payloadText(message) {
    return new TextDecoder().decode(message.payload);
}

/**
 * The payload parsed as JSON; throws a `SyntaxError` when it is not JSON.
 * @param {Message} message
 * @returns {any}
 */
export function payloadJson(message) {
    return JSON.parse(payloadText(message));
}

/**
 * A copy of `message` with `value` as its JSON payload (and `application/json` as its
 * content type).
 * @param {Message} message
 * @param {unknown} value
 * @returns {Message}
 */
export function withJson(message, value) {
    return {
        ...message,
        contentType: "application/json",
        payload: new TextEncoder().encode(JSON.stringify(value)),
    };
}

/** What a transform returns for one message. */
export const Outcome = Object.freeze({
    /** Pass the message on unchanged (nothing is copied back). */
    pass: () => /** @type {Outcome} */ ({ tag: "pass" }),
    /** Pass the message on, possibly modified. @param {Message} message */
    keep: (message) => /** @type {Outcome} */ ({ tag: "keep", val: message }),
    /** Discard the message on purpose. */
    drop: () => /** @type {Outcome} */ ({ tag: "drop" }),
    /** Replace the message by several (parts with an empty id get `<id>-<index>`). */
    split: (/** @type {Message[]} */ messages) =>
        /** @type {Outcome} */ ({ tag: "split", val: messages }),
    /** Refuse the message with a reason. @param {string} reason */
    fail: (reason) => /** @type {Outcome} */ ({ tag: "fail", val: String(reason) }),
});

/** What a router returns for one message; every decision carries a reason. */
export const Decision = Object.freeze({
    /** Keep the gateway's built-in decision. @param {string} [reason] */
    builtin: (reason = "") => decision(undefined, reason),
    /**
     * Publish to AWS IoT Core; an empty topic is the message's own.
     * @param {{topic?: string, qos?: number}} target
     * @param {string} reason
     */
    iotCore: ({ topic = "", qos = 1 }, reason) =>
        decision({ tag: "iot-core", val: { topic, qos } }, reason),
    /**
     * Put a record on Kinesis; empty stream and key are the gateway's default stream and
     * the device id.
     * @param {{stream?: string, partitionKey?: string, explicitHashKey?: string}} target
     * @param {string} reason
     */
    kinesis: ({ stream = "", partitionKey = "", explicitHashKey }, reason) =>
        decision({ tag: "kinesis", val: { stream, partitionKey, explicitHashKey } }, reason),
    /** The gateway's local sink. @param {string} reason */
    local: (reason) => decision({ tag: "local" }, reason),
    /** Discard the message. @param {string} reason */
    drop: (reason) => decision({ tag: "drop" }, reason),
    /** Put the message in the dead-letter store. @param {string} reason */
    deadLetter: (reason) => decision({ tag: "dead-letter" }, reason),
});

/**
 * @param {Destination | undefined} destination
 * @param {string} reason
 * @returns {Decision}
 */
function decision(destination, reason) {
    return { destination, reason: String(reason) };
}

/**
 * The bindings a transform plugin exports: `export const transformer =
 * exportTransform(MyTransform);`. `new MyTransform(config)` runs once at load (a throw
 * refuses the plugin with its message); `transform(message)` runs per message and
 * returns an `Outcome`. A throw, or a value that is not an outcome, fails that message
 * only (`fail` with the error's message); the rest of the batch goes on.
 * @param {new (config: Config) => {transform(message: Message): Outcome}} Plugin
 */
export function exportTransform(Plugin) {
    /** @type {{transform(message: Message): Outcome} | undefined} */
    let plugin;
    return {
        /** @param {Array<[string, string]>} config */
        init(config) {
            plugin = construct(Plugin, config);
        },
        /** @param {Message[]} batch @returns {Outcome[]} */
        transform(batch) {
            const instance = loaded(plugin);
            return batch.map((message) => {
                try {
                    return checkOutcome(instance.transform(message));
                } catch (error) {
                    return Outcome.fail(describe(error));
                }
            });
        },
    };
}

/**
 * The bindings a router plugin exports: `export const routing = exportRouter(MyRouter);`.
 * `route(message)` returns a `Decision`. A throw, or a value that is not a decision,
 * keeps the gateway's built-in decision for that message, with the error as the reason
 * (recorded with the message), so one odd payload never stops a batch.
 * @param {new (config: Config) => {route(message: Message): Decision}} Plugin
 */
export function exportRouter(Plugin) {
    /** @type {{route(message: Message): Decision} | undefined} */
    let plugin;
    return {
        /** @param {Array<[string, string]>} config */
        init(config) {
            plugin = construct(Plugin, config);
        },
        /** @param {Message[]} batch @returns {Decision[]} */
        route(batch) {
            const instance = loaded(plugin);
            return batch.map((message) => {
                try {
                    return checkDecision(instance.route(message));
                } catch (error) {
                    return Decision.builtin(`route failed: ${describe(error)}`);
                }
            });
        },
    };
}

/**
 * Builds the plugin from its config. The WIT `result<_, string>` is an error when the
 * export throws; the thrown value must be the string.
 * @template T
 * @param {new (config: Config) => T} Plugin
 * @param {Array<[string, string]>} config
 * @returns {T}
 */
function construct(Plugin, config) {
    try {
        return new Plugin(Object.fromEntries(config));
    } catch (error) {
        throw describe(error);
    }
}

/**
 * @template T
 * @param {T | undefined} plugin
 * @returns {T}
 */
function loaded(plugin) {
    if (plugin === undefined) {
        throw new Error("the plugin was called before init");
    }
    return plugin;
}

const OUTCOME_TAGS = new Set(["pass", "keep", "drop", "split", "fail"]);
const DESTINATION_TAGS = new Set(["iot-core", "kinesis", "local", "drop", "dead-letter"]);

/** @param {unknown} value @returns {Outcome} */
function checkOutcome(value) {
    const tag = /** @type {{tag?: unknown}} */ (value)?.tag;
    if (typeof tag !== "string" || !OUTCOME_TAGS.has(tag)) {
        throw new TypeError(`transform returned ${shown(value)}, not an Outcome`);
    }
    return /** @type {Outcome} */ (value);
}

/** @param {unknown} value @returns {Decision} */
function checkDecision(value) {
    const { destination, reason } = /** @type {Partial<Decision>} */ (value ?? {});
    const known =
        destination === undefined ||
        (typeof destination?.tag === "string" && DESTINATION_TAGS.has(destination.tag));
    if (value === null || typeof value !== "object" || typeof reason !== "string" || !known) {
        throw new TypeError(`route returned ${shown(value)}, not a Decision`);
    }
    return /** @type {Decision} */ (value);
}

/** @param {unknown} value */
function shown(value) {
    try {
        return JSON.stringify(value) ?? String(value);
    } catch {
        return String(value);
    }
}

/** @param {unknown} error */
function describe(error) {
    return error instanceof Error ? error.message : String(error);
}
