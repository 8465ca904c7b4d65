// Module resolution hooks for Node (see register.js).
const HOST = "sluice:plugin/host@0.1.0";

/**
 * @param {string} specifier
 * @param {object} context
 * @param {(specifier: string, context: object) => Promise<object>} next
 */
export async function resolve(specifier, context, next) {
    if (specifier === HOST) {
        return { url: new URL("./host.js", import.meta.url).href, shortCircuit: true };
    }
    return next(specifier, context);
}
