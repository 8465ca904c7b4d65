// `node --import <this file> --test`: resolves the host import `sluice:plugin/host@0.1.0`
// to the recording stand-in `host.js`, so a plugin's module loads under Node unchanged.
import { register } from "node:module";

register("./hooks.js", import.meta.url);
