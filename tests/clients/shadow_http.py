"""boto3's `iot-data` client making Device Shadow calls over HTTPS, as device or back-end
code does against IoT Core's data plane: pointed at Sluice, authenticated by a client
certificate (botocore's `client_cert`, as at IoT Core's port 8443). It reports each call
as one JSON line on stdout.

usage: shadow_http.py JSON
  {"endpoint": "https://localhost:PORT", "ca": PATH (the server's certificate),
   "cert": PATH (the device's certificate and key in one PEM file),
   "registry": "http://…" (moto: each of "things" is created there first),
   "things": ["…"],
   "calls": [{"op": "update", "thing": "…", "shadow"?: "…", "document": {…}},
             {"op": "get" | "delete", "thing": "…", "shadow"?: "…"},
             {"op": "list", "thing": "…", "page_size"?: N}]}
  a call with "via": "registry" is made at moto itself rather than through Sluice (to
  read back what a call through Sluice did)
each call prints
  {"op", "ok": true, "result": <the parsed payload; for list the SDK's response fields>}
  {"op", "ok": false, "status": HTTP status, "code": the SDK's error code, "message"}
"""

import json
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError


def main():
    spec = json.loads(sys.argv[1])
    registry = boto3.client("iot", endpoint_url=spec["registry"], region_name="us-east-1")
    for thing in spec.get("things", []):
        registry.create_thing(thingName=thing)
    data = boto3.client(
        "iot-data",
        endpoint_url=spec["endpoint"],
        region_name="us-east-1",
        verify=spec["ca"],
        config=Config(client_cert=spec["cert"], retries={"max_attempts": 1}),
    )
    direct = boto3.client("iot-data", endpoint_url=spec["registry"], region_name="us-east-1")
    for call in spec["calls"]:
        op = call["op"]
        client = direct if call.get("via") == "registry" else data
        named = {"shadowName": call["shadow"]} if "shadow" in call else {}
        try:
            if op == "list":
                paging = {"pageSize": call["page_size"]} if "page_size" in call else {}
                answer = client.list_named_shadows_for_thing(thingName=call["thing"], **paging)
                result = {k: answer[k] for k in ("results", "nextToken", "timestamp") if k in answer}
            else:
                method = {
                    "get": client.get_thing_shadow,
                    "update": client.update_thing_shadow,
                    "delete": client.delete_thing_shadow,
                }[op]
                if op == "update":
                    named["payload"] = json.dumps(call["document"]).encode()
                answer = method(thingName=call["thing"], **named)
                result = json.loads(answer["payload"].read())
            print(json.dumps({"op": op, "ok": True, "result": result}), flush=True)
        except ClientError as error:
            print(
                json.dumps(
                    {
                        "op": op,
                        "ok": False,
                        "status": error.response["ResponseMetadata"]["HTTPStatusCode"],
                        "code": error.response["Error"]["Code"],
                        "message": error.response["Error"].get("Message", ""),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
