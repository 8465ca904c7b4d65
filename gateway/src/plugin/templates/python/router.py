"""{{name}}: a Sluice router plugin. Messages on `bulk/...` go to Kinesis; the others
keep the gateway's built-in decision. Change `route` to decide your way."""

import sluice_plugin as sluice


class Plugin(sluice.Router):
    def route(self, message):
        if message.topic.startswith("bulk/"):
            return sluice.kinesis(reason="bulk data goes to Kinesis")
        return None


Routing = sluice.router(Plugin)
