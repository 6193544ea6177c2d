"""The wire format between the `overlay` CNI executable and the node agent.

It imports nothing at all: the executable (native/overlay-cni.c, which defines
the same constants; a test compares them) speaks it, and the agent
(`overlay.agent.cniserver`) and the protocol module (`overlay.cni.spec`) take
their constants from here. `request_bytes` is the reference encoder the
executable's output is checked against. cni/README.md describes the format
for other clients.

One request and one response per unix stream connection; every length is
an unsigned 32-bit big-endian integer and may not exceed MAX_FIELD:

  request : MAGIC | len | env block | len | stdin
            env block: KEY=VALUE items separated by NUL (no trailing NUL), the
            ENV_KEYS the plugin was given, plus NETNS_ERROR=<why> when
            CNI_NETNS could not be opened; the pod's network namespace travels
            as one file descriptor (SCM_RIGHTS) with the first bytes sent
  response: exit code | len | stdout bytes

A DEL or GC that cannot reach the agent is written, as the request bytes
(without NETNS_ERROR and without the descriptor), to
<dir of the socket>/PENDING_DIR/<time>-<pid>.req; the agent replays them.
"""

MAGIC = b"OVLCNI1\x00"
DEFAULT_SOCKET = "/run/overlay/cni.sock"
ENV_KEYS = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
ENV_KEYS_B = tuple(k.encode() for k in ENV_KEYS)
# Sent instead of a namespace fd when the plugin could not open CNI_NETNS.
NETNS_ERROR = "NETNS_ERROR"
MAX_FIELD = 4 << 20
# Next to the socket: the DELs and GCs recorded while the agent was unreachable.
PENDING_DIR = "cni-pending"
# The CNI versions the plugin speaks (overlay.cni.spec; native/overlay-cni.c lists the same).
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
DEFAULT_VERSION = "1.0.0"
E_INTERNAL = 100  # our first own CNI error code: "the plugin or the agent failed"


def u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def request_bytes(env: dict[bytes, bytes], stdin: bytes, extra: dict[str, str]) -> bytes:
    """A whole request: the CNI variables of `env` (nothing else of it), then `extra`."""
    pairs = [k + b"=" + env[k] for k in ENV_KEYS_B if k in env]
    pairs += [f"{k}={v}".encode("utf-8", "surrogateescape") for k, v in extra.items()]
    head = b"\x00".join(pairs)
    return MAGIC + u32(len(head)) + head + u32(len(stdin)) + stdin


def parse_env_block(head: bytes) -> dict[str, str]:
    """The env block as a dict; items without "=" are ignored."""
    env = {}
    for item in head.decode("utf-8", "surrogateescape").split("\x00"):
        k, sep, v = item.partition("=")
        if sep:
            env[k] = v
    return env


def response_bytes(code: int, stdout: bytes) -> bytes:
    return u32(code) + u32(len(stdout)) + stdout


def parse_request(data: bytes) -> tuple[dict[str, str], bytes]:
    """A whole request (a record the plugin wrote): its environment and stdin."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        raise ValueError("not an overlay CNI request")
    pos = len(MAGIC)
    hlen = int.from_bytes(data[pos:pos + 4], "big")
    pos += 4
    head = data[pos:pos + hlen]
    pos += hlen
    blen = int.from_bytes(data[pos:pos + 4], "big")
    pos += 4
    if len(head) != hlen or hlen > MAX_FIELD or blen > MAX_FIELD or len(data) != pos + blen:
        raise ValueError("a truncated overlay CNI request")
    return parse_env_block(head), data[pos:]
