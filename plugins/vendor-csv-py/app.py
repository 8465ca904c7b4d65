"""vendor-csv: decodes a vendor's CSV telemetry into JSON, converting units.

Each line of the payload is one reading, its fields in the order of the `columns`
setting (default `ts,temp_f,pressure_psi,humidity`). Columns named with a unit suffix
are converted to SI-style units: `_f` (Fahrenheit) to `_c`, `_psi` to `_kpa`, `_in`
(inches) to `_mm`; the rest are numbers as they are. A payload of several lines is split
into one message per line. A line that does not parse fails that message, with the
line number and why; the counters `readings` and `bad_lines` count both.
"""

import json

import sluice_plugin as sluice

CONVERSIONS = {
    "_f": ("_c", lambda f: round((f - 32.0) * 5.0 / 9.0, 2)),
    "_psi": ("_kpa", lambda psi: round(psi * 6.894757, 2)),
    "_in": ("_mm", lambda inches: round(inches * 25.4, 1)),
}


def convert(column, value):
    """The output name and value of one field."""
    for suffix, (target, function) in CONVERSIONS.items():
        if column.endswith(suffix):
            return column[: -len(suffix)] + target, function(value)
    return column, value


def decode_line(columns, line):
    """One CSV line as a dict; raises ValueError saying why it cannot."""
    fields = [field.strip() for field in line.split(",")]
    if len(fields) != len(columns):
        raise ValueError(f"{len(fields)} fields, expected {len(columns)} ({','.join(columns)})")
    reading = {}
    for column, field in zip(columns, fields):
        try:
            value = float(field)
        except ValueError:
            raise ValueError(f"`{column}` is not a number: {field!r}") from None
        if value.is_integer() and column == "ts":
            value = int(value)
        name, converted = convert(column, value)
        reading[name] = converted
    return reading


class VendorCsv(sluice.Transform):
    def init(self, config):
        self.columns = [c.strip() for c in config.get("columns", "ts,temp_f,pressure_psi,humidity").split(",")]
        if not all(self.columns):
            raise ValueError("`columns` has an empty name")

    def transform(self, message):
        text = message.payload.decode("utf-8")
        lines = [line for line in text.splitlines() if line.strip()]
        readings = []
        for number, line in enumerate(lines, start=1):
            try:
                readings.append(decode_line(self.columns, line))
            except ValueError as error:
                sluice.counter("bad_lines")
                return sluice.fail(f"line {number}: {error}")
        sluice.counter("readings", len(readings))
        parts = []
        for reading in readings:
            part = sluice.Message(
                id="",
                device_id=message.device_id,
                topic=message.topic,
                content_type="application/json",
                qos=message.qos,
                attributes=message.attributes + [("vendor-csv.converted", "true")],
                received_at_ms=message.received_at_ms,
                payload=json.dumps(reading, separators=(",", ":")).encode(),
            )
            parts.append(part)
        if len(parts) == 1:
            parts[0].id = message.id
            return sluice.keep(parts[0])
        return sluice.split(parts)


Transformer = sluice.transformer(VendorCsv)
