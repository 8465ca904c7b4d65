"""The account's IoT registry, as an operator changes it: boto3's `iot` client against
moto's IoT control plane (`tests/servers/aws_server.py`, which gives certificates IoT
Core's ids). Each call prints one JSON line.

usage: iot_registry.py ENDPOINT JSON
  {"op": "device", "dir": DIR, "name": "…", "things": ["…"]}
      creates the things, a key pair and an ACTIVE certificate (CreateKeysAndCertificate,
      subject CN "AWS IoT Certificate", as AWS issues them) attached to every thing;
      writes the certificate and its private key to DIR/NAME.pem.
      prints {"certificate_id", "arn", "pem": PATH}
  {"op": "status", "certificate_id": "…", "status": "INACTIVE" | "REVOKED" | "ACTIVE"}
      prints {"status": …} as moto describes it afterwards
"""

import json
import os
import sys

import boto3


def main():
    endpoint, spec = sys.argv[1], json.loads(sys.argv[2])
    iot = boto3.client("iot", endpoint_url=endpoint, region_name="us-east-1")
    if spec["op"] == "device":
        made = iot.create_keys_and_certificate(setAsActive=True)
        for thing in spec["things"]:
            iot.create_thing(thingName=thing)
            iot.attach_thing_principal(thingName=thing, principal=made["certificateArn"])
        path = os.path.join(spec["dir"], f"{spec['name']}.pem")
        with open(path, "w") as file:
            file.write(made["certificatePem"])
            file.write(made["keyPair"]["PrivateKey"])
        print(json.dumps({"certificate_id": made["certificateId"],
                          "arn": made["certificateArn"], "pem": path}))
    elif spec["op"] == "status":
        iot.update_certificate(certificateId=spec["certificate_id"], newStatus=spec["status"])
        described = iot.describe_certificate(certificateId=spec["certificate_id"])
        print(json.dumps({"status": described["certificateDescription"]["status"]}))
    else:
        raise SystemExit(f"unknown op {spec['op']}")


if __name__ == "__main__":
    main()
