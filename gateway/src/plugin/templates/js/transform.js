// {{name}}: a Sluice transform plugin. It tags each message with the attribute
// `{{name}}.seen` and passes it on; change `transform` to do your work.

import { Outcome, exportTransform } from "./sluice.js";

export class Plugin {
    /** @param {Record<string, string>} config the plugin's `config` table */
    constructor(config) {
        this.config = config;
    }

    /** @param {import("./sluice.js").Message} message */
    transform(message) {
        message.attributes.push(["{{name}}.seen", "true"]);
        return Outcome.keep(message);
    }
}

export const transformer = exportTransform(Plugin);
