"""A Python test guest that misbehaves on request (the payload says how): `trap` raises
out of the export (a trap), `loop` never returns (the time limit), `grow` allocates
without end (the memory limit), `sleep` sleeps 30 s on a WASI clock (the wall-clock
limit), `print` writes to stdout and stderr (the gateway's log); anything else passes.
The SDK is not used: it would turn the exception into a `fail` outcome."""

import sys
import time

from wit_world.exports import transformer


class Transformer:
    def init(self, config):
        pass

    def transform(self, batch):
        for message in batch:
            command = message.payload.decode("utf-8", "replace")
            if command == "trap":
                raise RuntimeError("asked to trap")
            if command == "loop":
                while True:
                    pass
            if command == "grow":
                hoard = []
                while True:
                    hoard.append(bytearray(1 << 20))
            if command == "sleep":
                time.sleep(30)
            if command == "print":
                print(f"hello from python at {time.time():.0f}")
                print("a warning", file=sys.stderr)
        return [transformer.Outcome_Pass() for _ in batch]
