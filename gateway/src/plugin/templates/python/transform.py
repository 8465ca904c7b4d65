"""{{name}}: a Sluice transform plugin. It tags each message with the attribute
`{{name}}.seen` and passes it on; change `transform` to do your work."""

import sluice_plugin as sluice


class Plugin(sluice.Transform):
    def init(self, config):
        self.config = config

    def transform(self, message):
        message.attributes.append(("{{name}}.seen", "true"))
        return sluice.keep(message)


Transformer = sluice.transformer(Plugin)
