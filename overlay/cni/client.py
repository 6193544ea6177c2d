"""The `overlay` CNI executable: a thin client of the node agent.

A pod start waits on this process, so it imports only C modules of the
standard library (`json` alone costs 8 ms through `re` and `enum`). It reads
the environment and the config, opens CNI_NETNS, and hands all three to
overlayd over a unix socket (the namespace as a file descriptor, so the
agent needs no access to the runtime's mount namespace). The agent does the
work and returns the exact stdout and exit code.

When the agent cannot be reached, `overlay.cni.offline` answers instead:
VERSION always works, DEL still releases the address and removes the veth,
STATUS reports 50, anything else "try again later" (11).

Wire format (both directions are length-prefixed, big-endian u32):
  request : b"OVLCNI1\\0" | len | NUL-separated KEY=VALUE env | len | stdin
            (+ the netns fd as SCM_RIGHTS on the first send)
  response: u32 exit code | len | stdout bytes
"""

import _socket
import os
import sys

MAGIC = b"OVLCNI1\x00"
DEFAULT_SOCKET = "/run/overlay/cni.sock"
ENV_KEYS = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
TIMEOUT = 120.0


class _Ctx:
    # The attributes _json.make_scanner expects of a JSONDecoder.
    strict = False
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = None
    memo: dict[str, object] = {}


def parse_json(data: bytes) -> object:
    import _json

    text = data.decode("utf-8")
    n = len(text)
    i = 0
    while i < n and text[i] in " \t\r\n":
        i += 1
    scanner = _json.make_scanner(_Ctx())  # type: ignore[arg-type]
    obj, end = scanner(text, i)  # raises StopIteration / ValueError
    while end < n and text[end] in " \t\r\n":
        end += 1
    if end != n:
        raise ValueError("extra data after the JSON value")
    return obj


def socket_path(stdin: bytes) -> str:
    try:
        conf = parse_json(stdin)
    except Exception:
        return DEFAULT_SOCKET  # the agent reports the decoding error properly
    if isinstance(conf, dict):
        p = conf.get("agentSocket")
        if isinstance(p, str) and p:
            return p
    return DEFAULT_SOCKET


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def request_bytes(env: dict[str, str], stdin: bytes, extra: dict[str, str]) -> bytes:
    pairs = [f"{k}={env[k]}" for k in ENV_KEYS if k in env]
    pairs += [f"{k}={v}" for k, v in extra.items()]
    head = "\x00".join(pairs).encode("utf-8", "surrogateescape")
    return MAGIC + _u32(len(head)) + head + _u32(len(stdin)) + stdin


def _recv_exact(sock: "_socket.socket", n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("agent closed the connection")
        buf += chunk
    return bytes(buf)


def call_agent(path: str, payload: bytes, ns_fd: int) -> tuple[int, bytes]:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        if ns_fd >= 0:
            anc = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, ns_fd.to_bytes(4, sys.byteorder))]
            sent = sock.sendmsg([payload], anc)
        else:
            sent = sock.send(payload)
        if sent < len(payload):
            sock.sendall(payload[sent:])
        code = int.from_bytes(_recv_exact(sock, 4), "big")
        size = int.from_bytes(_recv_exact(sock, 4), "big")
        return code, _recv_exact(sock, size)
    finally:
        sock.close()


def main() -> int:
    env = dict(os.environ)
    stdin = sys.stdin.buffer.read()
    command = env.get("CNI_COMMAND", "")
    if command == "VERSION":
        from overlay.cni import offline

        return offline.run(env, stdin, sys.stdout.buffer, reason="")
    extra: dict[str, str] = {}
    ns_fd = -1
    netns = env.get("CNI_NETNS", "")
    if netns:
        try:
            ns_fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            extra["NETNS_ERROR"] = f"{exc.strerror} ({exc.errno})"
    path = socket_path(stdin)
    try:
        code, out = call_agent(path, request_bytes(env, stdin, extra), ns_fd)
    except (OSError, ConnectionError) as exc:
        from overlay.cni import offline

        reason = f"cannot reach the overlay node agent at {path}: {exc}"
        return offline.run(env, stdin, sys.stdout.buffer, reason=reason)
    finally:
        if ns_fd >= 0:
            os.close(ns_fd)
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
