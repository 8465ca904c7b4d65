// A router that chooses each message's destination from fields of its JSON payload:
// alarms go to IoT Core on `alarms/<device>`, bulk uploads to Kinesis partitioned by a
// payload field, and everything else keeps the gateway's built-in decision.

import { Decision, counter, exportRouter, payloadText } from "../../sdk/js/sluice.js";

/** @typedef {import("../../sdk/js/sluice.js").Config} Config */
/** @typedef {import("../../sdk/js/sluice.js").Message} Message */

/** The configuration keys and their defaults (see README.md). */
const DEFAULTS = {
    alarm_topic_prefix: "alarms/",
    qos: "1",
    bulk_readings: "100",
    readings_field: "readings",
    partition_key_field: "site_id",
    stream: "",
};

export class PayloadRouter {
    /** @param {Config} config */
    constructor(config) {
        const unknown = Object.keys(config).filter((key) => !(key in DEFAULTS));
        if (unknown.length > 0) {
            throw new Error(`unknown config keys: ${unknown.join(", ")}`);
        }
        const settings = { ...DEFAULTS, ...config };
        this.alarmTopicPrefix = settings.alarm_topic_prefix;
        this.qos = Number(settings.qos);
        if (this.qos !== 0 && this.qos !== 1) {
            throw new Error(`qos must be 0 or 1, not \`${settings.qos}\``);
        }
        this.bulkReadings = Number(settings.bulk_readings);
        if (!Number.isInteger(this.bulkReadings) || this.bulkReadings < 1) {
            throw new Error(
                `bulk_readings must be a whole number of at least 1, not \`${settings.bulk_readings}\``,
            );
        }
        this.readingsField = settings.readings_field;
        this.partitionKeyField = settings.partition_key_field;
        this.stream = settings.stream;
    }

    /** @param {Message} message */
    route(message) {
        const payload = jsonObject(payloadText(message));
        if (payload === undefined) {
            counter("not_json");
            return Decision.builtin("payload is not a JSON object");
        }
        if (payload.alarm === true) {
            counter("alarms");
            return Decision.iotCore(
                { topic: `${this.alarmTopicPrefix}${message.deviceId}`, qos: this.qos },
                "alarm",
            );
        }
        const readings = payload[this.readingsField];
        const count = Array.isArray(readings) ? readings.length : 0;
        if (payload.bulk === true || count >= this.bulkReadings) {
            counter("bulk");
            const key = payload[this.partitionKeyField];
            return Decision.kinesis(
                {
                    stream: this.stream,
                    // Empty: the gateway uses the device id.
                    partitionKey: typeof key === "string" || typeof key === "number" ? String(key) : "",
                },
                payload.bulk === true ? "bulk flag" : `bulk: ${count} readings`,
            );
        }
        return Decision.builtin("no payload rule");
    }
}

/**
 * The payload as a JSON object, or undefined when it is not JSON or not an object.
 * @param {string} text
 * @returns {Record<string, unknown> | undefined}
 */
function jsonObject(text) {
    try {
        const value = JSON.parse(text);
        return value !== null && typeof value === "object" && !Array.isArray(value) ? value : undefined;
    } catch {
        return undefined;
    }
}

export const routing = exportRouter(PayloadRouter);
