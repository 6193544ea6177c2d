"""A raw Membership client for attack tests, run inside a sandbox namespace:

    python attacker.py ADDR [SERVER_NAME CERT KEY CA]

Plaintext without CERT, else mutual TLS verifying the server as SERVER_NAME.
Prints {"ready": true}, then for each JSON line on stdin
{"method": "/overlay.v1.Membership/Gossip", "hex": "..."} one line
{"code": "OK" | status name, "hex": reply bytes}; with "hexes": [...] instead
of "hex" it sends them all, one after the other, and prints {"codes": {name: count}}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc


def main(argv: list[str]) -> int:
    addr = argv[0]
    opts = [("grpc.enable_http_proxy", 0)]
    if len(argv) > 1:
        server_name = argv[1]
        cert, key, ca = (Path(a).read_bytes() for a in argv[2:5])
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                             certificate_chain=cert)
        ch = grpc.secure_channel(addr, creds,
                                 options=[*opts, ("grpc.ssl_target_name_override", server_name)])
    else:
        ch = grpc.insecure_channel(addr, options=opts)
    print(json.dumps({"ready": True}), flush=True)

    def send(method: str, payload: bytes) -> tuple[str, bytes]:
        call = ch.unary_unary(method, request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
        try:
            return "OK", call(payload, timeout=5)
        except grpc.RpcError as exc:
            return exc.code().name, b""

    for line in sys.stdin:
        req = json.loads(line)
        if "hexes" in req:
            codes: dict[str, int] = {}
            for h in req["hexes"]:
                code, _ = send(req["method"], bytes.fromhex(h))
                codes[code] = codes.get(code, 0) + 1
            print(json.dumps({"codes": codes}), flush=True)
            continue
        code, reply = send(req["method"], bytes.fromhex(req["hex"]))
        print(json.dumps({"code": code, "hex": reply.hex()}), flush=True)
    ch.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
