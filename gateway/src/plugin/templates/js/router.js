// {{name}}: a Sluice router plugin. Messages on `bulk/…` go to Kinesis; the others keep
// the gateway's built-in decision. Change `route` to decide your way.

import { Decision, exportRouter } from "./sluice.js";

export class Plugin {
    /** @param {Record<string, string>} config the plugin's `config` table */
    constructor(config) {
        this.config = config;
    }

    /** @param {import("./sluice.js").Message} message */
    route(message) {
        if (message.topic.startsWith("bulk/")) {
            return Decision.kinesis({}, "bulk data goes to Kinesis");
        }
        return Decision.builtin();
    }
}

export const routing = exportRouter(Plugin);
