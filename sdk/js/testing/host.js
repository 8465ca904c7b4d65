// A stand-in for the gateway's `sluice:plugin/host` import, for testing plugins under
// Node: it records what the plugin logged and counted. `register.js` maps the import to it.

/** @type {{level: string, message: string, fields: Array<[string, string]>}[]} */
export const logs = [];
/** @type {Map<string, bigint>} */
export const counters = new Map();

/** Forgets what was recorded (between tests). */
export function reset() {
    logs.length = 0;
    counters.clear();
}

/**
 * @param {string} level
 * @param {string} message
 * @param {Array<[string, string]>} fields
 */
export function log(level, message, fields) {
    logs.push({ level, message, fields });
}

/**
 * @param {string} name
 * @param {bigint} delta
 */
export function counterAdd(name, delta) {
    if (typeof delta !== "bigint") {
        throw new TypeError(`counter-add takes a u64 (a BigInt), not ${typeof delta}`);
    }
    counters.set(name, (counters.get(name) ?? 0n) + delta);
}
