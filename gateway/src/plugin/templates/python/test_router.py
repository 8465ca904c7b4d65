import unittest

import sluice_plugin as sluice

import app


class PluginTest(unittest.TestCase):
    def test_bulk_goes_to_kinesis(self):
        plugin = app.Routing()
        plugin.init([])
        message = sluice.Message(id="m1", device_id="d", topic="bulk/1", content_type="", qos=0,
                                 attributes=[], received_at_ms=0, payload=b"x")
        [decision] = plugin.route([message])
        self.assertEqual(type(decision.destination).__name__, "Destination_Kinesis")


if __name__ == "__main__":
    unittest.main()
