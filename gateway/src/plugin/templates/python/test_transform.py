import unittest

import sluice_plugin as sluice

import app


class PluginTest(unittest.TestCase):
    def test_a_message_is_tagged(self):
        plugin = app.Transformer()
        plugin.init([])
        message = sluice.Message(id="m1", device_id="d", topic="t", content_type="", qos=0,
                                 attributes=[], received_at_ms=0, payload=b"x")
        [outcome] = plugin.transform([message])
        self.assertIn(("{{name}}.seen", "true"), outcome.value.attributes)


if __name__ == "__main__":
    unittest.main()
