"""Unit tests of the vendor-csv plugin under CPython, on the bindings componentize-py
generates from wit/ (scripts/build-plugins runs them; see README.md)."""

import unittest

import sluice_plugin as sluice
from wit_world.imports import host

import app

counters = {}
host.counter_add = lambda name, delta: counters.__setitem__(name, counters.get(name, 0) + delta)
host.log = lambda level, message, fields: None


def message(text):
    return sluice.Message(
        id="m1", device_id="probe-1", topic="raw/vendor/t1", content_type="", qos=1,
        attributes=[], received_at_ms=0, payload=text.encode(),
    )


class VendorCsvTest(unittest.TestCase):
    def setUp(self):
        counters.clear()
        self.plugin = app.Transformer()
        self.plugin.init([])

    def test_one_line_is_converted_and_kept(self):
        [outcome] = self.plugin.transform([message("1700000000,212,14.7,40")])
        self.assertEqual(type(outcome).__name__, "Outcome_Keep")
        self.assertEqual(outcome.value.id, "m1")
        self.assertEqual(
            outcome.value.payload,
            b'{"ts":1700000000,"temp_c":100.0,"pressure_kpa":101.35,"humidity":40.0}',
        )
        self.assertEqual(counters, {"readings": 1})

    def test_several_lines_are_split(self):
        [outcome] = self.plugin.transform([message("1,32,0,1\n2,50,0,2\n")])
        self.assertEqual(type(outcome).__name__, "Outcome_Split")
        self.assertEqual([m.payload for m in outcome.value], [
            b'{"ts":1,"temp_c":0.0,"pressure_kpa":0.0,"humidity":1.0}',
            b'{"ts":2,"temp_c":10.0,"pressure_kpa":0.0,"humidity":2.0}',
        ])

    def test_a_bad_line_fails_only_its_message(self):
        outcomes = self.plugin.transform([message("1,hot,0,1"), message("1,2,3")])
        self.assertEqual([type(o).__name__ for o in outcomes], ["Outcome_Fail", "Outcome_Fail"])
        self.assertIn("`temp_f` is not a number", outcomes[0].value)
        self.assertIn("3 fields, expected 4", outcomes[1].value)
        self.assertEqual(counters, {"bad_lines": 2})

    def test_columns_are_configurable(self):
        plugin = app.Transformer()
        plugin.init([("columns", "ts,rain_in")])
        [outcome] = plugin.transform([message("5,1")])
        self.assertEqual(outcome.value.payload, b'{"ts":5,"rain_mm":25.4}')

    def test_an_empty_column_name_refuses_the_configuration(self):
        from componentize_py_types import Err
        with self.assertRaises(Err):
            app.Transformer().init([("columns", "ts,,x")])


if __name__ == "__main__":
    unittest.main()
