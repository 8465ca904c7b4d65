"""An identity provider for the tests, built on PyJWT and `cryptography` (libraries nobody
here wrote): it makes signing keys, publishes their public halves as a JWKS document, and
mints tokens. Keys live in DIR (one PEM per key id) and persist between calls, so that a
test can add a key later (a provider rotating its keys).

usage:
  idp.py keys DIR JSON      JSON: {"publish": [{"kid": "…", "alg": "RS256"|"ES256"|"EdDSA"}],
                                   "unpublished"?: [same]}
                            makes the keys that do not exist yet and writes DIR/jwks.json
                            with the published ones (the unpublished are kept for minting
                            tokens no JWKS knows). Prints {"jwks": PATH}.
  idp.py mint DIR JSON      JSON: {"tokens": {NAME: {"kid": "…", "claims": {…},
                                   "exp_in"?: SECONDS (3600; negative: expired),
                                   "nbf_in"?: SECONDS, "no_kid"?: bool}}}
                            prints {NAME: TOKEN, …}; "iat" and "exp" are added.
  idp.py serve DIR          serves DIR over HTTP on 127.0.0.1 (a free port); prints
                            {"port": N} once listening; GET /_requests answers how many
                            times /jwks.json was read.
"""

import http.server
import json
import os
import sys
import threading
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa


def key_path(directory, kid):
    return os.path.join(directory, f"{kid}.pem")


def make_key(alg):
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise SystemExit(f"unknown algorithm {alg}")


def load(directory, kid):
    with open(key_path(directory, kid), "rb") as file:
        text = file.read()
    alg, pem = text.split(b"\n", 1)
    return alg.decode(), serialization.load_pem_private_key(pem, password=None)


def public_jwk(alg, key, kid):
    algorithm = {
        "RS256": jwt.algorithms.RSAAlgorithm,
        "ES256": jwt.algorithms.ECAlgorithm,
        "EdDSA": jwt.algorithms.OKPAlgorithm,
    }[alg]
    jwk = json.loads(algorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "use": "sig", "alg": alg})
    return jwk


def keys(directory, spec):
    os.makedirs(directory, exist_ok=True)
    published = []
    for entry in spec["publish"] + spec.get("unpublished", []):
        path = key_path(directory, entry["kid"])
        if not os.path.exists(path):
            key = make_key(entry["alg"])
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            with open(path, "wb") as file:
                file.write(entry["alg"].encode() + b"\n" + pem)
    for entry in spec["publish"]:
        alg, key = load(directory, entry["kid"])
        published.append(public_jwk(alg, key, entry["kid"]))
    jwks = os.path.join(directory, "jwks.json")
    # Written aside and renamed: a reader never sees half a document.
    with open(jwks + ".new", "w") as file:
        json.dump({"keys": published}, file)
    os.replace(jwks + ".new", jwks)
    print(json.dumps({"jwks": jwks}))


def mint(directory, spec):
    now = int(time.time())
    out = {}
    for name, token in spec["tokens"].items():
        alg, key = load(directory, token["kid"])
        claims = dict(token["claims"])
        claims.setdefault("iat", now)
        claims["exp"] = now + token.get("exp_in", 3600)
        if "nbf_in" in token:
            claims["nbf"] = now + token["nbf_in"]
        headers = {} if token.get("no_kid") else {"kid": token["kid"]}
        out[name] = jwt.encode(claims, key, algorithm=alg, headers=headers)
    print(json.dumps(out))


def serve(directory):
    reads = {"count": 0}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=directory, **kwargs)

        def do_GET(self):
            if self.path == "/_requests":
                body = json.dumps(reads).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if self.path.startswith("/jwks.json"):
                reads["count"] += 1
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # Until the test closes stdin (or is gone).
    sys.stdin.read()
    server.shutdown()


def main():
    command, directory = sys.argv[1], sys.argv[2]
    if command == "keys":
        keys(directory, json.loads(sys.argv[3]))
    elif command == "mint":
        mint(directory, json.loads(sys.argv[3]))
    elif command == "serve":
        serve(directory)
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main()
