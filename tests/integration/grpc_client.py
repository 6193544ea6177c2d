"""A Membership client for tests, run inside a sandbox namespace:

    python grpc_client.py ADDR SERVER_NAME SENDER [CERT KEY CA]

Sends one Probe to ADDR claiming to be SENDER (plaintext without CERT, else
mutual TLS verifying the server as SERVER_NAME) and prints one JSON line:
{"ok": true, "responder": ...} or {"ok": false, "code": ..., "details": ...}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc

from overlay.v1 import overlay_pb2 as pb
from overlay.v1 import overlay_pb2_grpc as pb_grpc


def main(argv: list[str]) -> int:
    addr, server_name, sender = argv[:3]
    opts = [("grpc.enable_http_proxy", 0)]
    if len(argv) > 3:
        cert, key, ca = (Path(a).read_bytes() for a in argv[3:6])
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                             certificate_chain=cert)
        ch = grpc.secure_channel(addr, creds,
                                 options=[*opts, ("grpc.ssl_target_name_override", server_name)])
    else:
        ch = grpc.insecure_channel(addr, options=opts)
    with ch:
        try:
            reply = pb_grpc.MembershipStub(ch).Probe(
                pb.ProbeRequest(sender=sender, seq=1, target=server_name), timeout=3)
        except grpc.RpcError as exc:
            print(json.dumps({"ok": False, "code": exc.code().name, "details": exc.details()}))
            return 0
    print(json.dumps({"ok": True, "responder": reply.responder}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
