"""De-aggregates KPL aggregated Kinesis records with the `aws-kinesis-agg` package, the
library KCL-based consumers (and Lambda functions) use: an independent check of Sluice's
aggregation.

stdin:  one JSON object per line, a raw Kinesis record:
        {"partition_key": "...", "sequence_number": "...", "data_b64": "..."}
stdout: one JSON object per line, a user record:
        {"partition_key": "...", "data_b64": "...", "aggregated": true|false}
"""
import json
import sys

from aws_kinesis_agg.deaggregator import iter_deaggregate_records


def main():
    for line in sys.stdin:
        if not line.strip():
            continue
        raw = json.loads(line)
        event = {
            "kinesis": {
                "kinesisSchemaVersion": "1.0",
                "partitionKey": raw["partition_key"],
                "sequenceNumber": raw["sequence_number"],
                "data": raw["data_b64"],
                "approximateArrivalTimestamp": 0,
            }
        }
        for user in iter_deaggregate_records([event]):
            kinesis = user["kinesis"]
            data = kinesis["data"]
            if isinstance(data, bytes):  # the library re-encodes user data as bytes
                data = data.decode("ascii")
            print(json.dumps({
                "partition_key": kinesis["partitionKey"],
                "data_b64": data,
                "aggregated": "subSequenceNumber" in kinesis,
            }))


if __name__ == "__main__":
    main()
