"""The `overlay` CNI executable: a thin client of the node agent.

A pod start waits on this process, so it imports only built-in and C modules
of the standard library: `posix` rather than `os` (1.4 ms), `_json` rather
than `json` (8 ms through `re` and `enum`). It reads the environment and the
config, opens CNI_NETNS, and hands all three to overlayd over a unix socket
(the namespace as a file descriptor, so the agent needs no access to the
runtime's mount namespace). The agent does the work and returns the exact
stdout and exit code. VERSION is answered here, without the agent.

When the agent cannot be reached, `overlay.cni.offline` answers instead:
DEL still releases the address and removes the veth, STATUS reports 50,
anything else "try again later" (11). Whatever happens, stdout carries a
CNI result or a CNI error document, never a Python traceback.

The bytes on the socket are `overlay.cni.wire`'s (described in cni/README.md).
"""

import _socket
import posix
import sys

from overlay.cni.wire import (
    DEFAULT_SOCKET,
    DEFAULT_VERSION,
    E_INTERNAL,
    ENV_KEYS_B,
    NETNS_ERROR,
    SUPPORTED_VERSIONS,
    request_bytes,
)

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


def _conf(stdin: bytes) -> dict[str, object]:
    try:
        conf = parse_json(stdin)
    except Exception:
        return {}  # the agent (or offline) reports the decoding error properly
    return conf if isinstance(conf, dict) else {}


def socket_path(stdin: bytes) -> str:
    p = _conf(stdin).get("agentSocket")
    return p if isinstance(p, str) and p else DEFAULT_SOCKET


def _jstr(s: str) -> str:
    import _json

    return _json.encode_basestring_ascii(s)


def version_doc(stdin: bytes) -> bytes:
    """VERSION: the requested cniVersion echoed, with the versions we support."""
    v = _conf(stdin).get("cniVersion")
    requested = v if isinstance(v, str) and v else DEFAULT_VERSION
    supported = ", ".join(f'"{s}"' for s in SUPPORTED_VERSIONS)
    return f'{{"cniVersion": {_jstr(requested)}, "supportedVersions": [{supported}]}}\n'.encode()


def error_doc(stdin: bytes, code: int, msg: str, details: str = "") -> bytes:
    v = _conf(stdin).get("cniVersion")
    version = v if isinstance(v, str) and v in SUPPORTED_VERSIONS else DEFAULT_VERSION
    doc = f'{{"cniVersion": {_jstr(version)}, "code": {code}, "msg": {_jstr(msg)}'
    if details:
        doc += f', "details": {_jstr(details)}'
    return (doc + "}\n").encode()


def _recv_exact(sock: "_socket.socket", n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the agent closed the connection")
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


def _stdin() -> bytes:
    f = sys.stdin
    return f.buffer.read() if f is not None else b""


def _write(data: bytes) -> None:
    out = sys.stdout
    if out is not None:
        out.buffer.write(data)
        out.flush()


def run() -> int:
    environ: dict[bytes, bytes] = posix.environ
    stdin = _stdin()
    command = environ.get(b"CNI_COMMAND", b"")
    if command == b"VERSION":
        _write(version_doc(stdin))
        return 0
    extra: dict[str, str] = {}
    ns_fd = -1
    netns = environ.get(b"CNI_NETNS", b"")
    if netns:
        try:
            ns_fd = posix.open(netns, posix.O_RDONLY | posix.O_CLOEXEC)
        except OSError as exc:
            extra[NETNS_ERROR] = f"{exc.strerror} (errno {exc.errno})"
    path = socket_path(stdin)
    try:
        code, out = call_agent(path, request_bytes(environ, stdin, extra), ns_fd)
    except (OSError, ConnectionError) as exc:
        # Deliberately late: the offline answers need json and the IPAM files, which
        # the path through the agent (nearly every call) never pays for.
        from overlay.cni import offline

        env = {k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
               for k, v in environ.items() if k in ENV_KEYS_B}
        reason = f"cannot reach the overlay node agent at {path}: {exc}"
        return offline.run(env, stdin, sys.stdout.buffer, reason=reason)
    finally:
        if ns_fd >= 0:
            posix.close(ns_fd)
    _write(out)
    return code


def main() -> int:
    try:
        return run()
    except BaseException as exc:  # a runtime parses stdout: never a traceback there
        try:  # noqa: SIM105 (contextlib is an import this process avoids)
            _write(error_doc(b"", E_INTERNAL, "overlay CNI plugin failed",
                             f"{type(exc).__name__}: {exc}"))
        except BaseException:
            pass
        return E_INTERNAL


def exit_main() -> None:
    """main(), then exit at once: skipping the interpreter's teardown saves ~1.3 ms."""
    code = main()
    for f in (sys.stdout, sys.stderr):
        if f is not None:
            try:  # noqa: SIM105 (contextlib is an import this process avoids)
                f.flush()
            except BaseException:
                pass
    posix._exit(code if 0 <= code <= 255 else 1)


if __name__ == "__main__":
    exit_main()
