// A JavaScript transform that misbehaves on request, for the gateway's failure-path tests.
// It exports the WIT bindings directly, without the SDK (which would turn a throw into a
// `fail` outcome): an exception that leaves `transform` is a WebAssembly trap.
//
// The payload says what to do: `throw` throws, `loop` spins forever, `alloc` allocates
// until memory runs out; anything else passes unchanged.

/** @type {any[]} */
const hoard = [];

export const transformer = {
    /** @param {Array<[string, string]>} _config */
    init(_config) {},

    /** @param {import("sluice:plugin/types@0.1.0").Message[]} batch */
    transform(batch) {
        return batch.map((message) => {
            const asked = new TextDecoder().decode(message.payload);
            if (asked === "throw") {
                throw new Error("asked to throw");
            }
            if (asked === "loop") {
                for (;;) {}
            }
            if (asked === "alloc") {
                for (;;) {
                    hoard.push(new Uint8Array(1 << 20).fill(1));
                }
            }
            return { tag: "pass" };
        });
    },
};
