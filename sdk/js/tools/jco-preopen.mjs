// `node --import jco-preopen.mjs jco …`: jco 1.35 reads WIT files through its WASI shim
// (@bytecodealliance/preview2-shim), which since 0.26 preopens no directory, so
// `jco types` fails with "failed to read path for WIT". This opens `/` in the copy of the
// shim that jco's transpiler loads, before jco starts.
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const TRANSPILER = "node_modules/@bytecodealliance/jco-transpile";
// The toolchain directory holds this file's copy; find jco-transpile as Node would from jco.
let dir = dirname(fileURLToPath(new URL(process.argv[1], "file:///")));
while (!existsSync(join(dir, TRANSPILER))) {
    if (dir === dirname(dir)) {
        throw new Error(`no ${TRANSPILER} above ${process.argv[1]}`);
    }
    dir = dirname(dir);
}
const shim = createRequire(join(dir, TRANSPILER, "package.json")).resolve(
    "@bytecodealliance/preview2-shim/filesystem",
);
const { _setPreopens } = await import(pathToFileURL(shim).href);
_setPreopens({ "/": "/" });
