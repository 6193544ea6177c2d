"""The static CNI executable (native/overlay-cni.c), run as a runtime runs it.

No agent here: a fake one in a thread checks the wire format with the agent's
own decoder (overlay.cni.wire.parse_request), and without one the
offline answers are checked. Garbage on stdin and in the environment, from
hypothesis, always gives a well-formed CNI document and the right exit code,
never a crash or a hang.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.cni import wire
from overlay.cni.install import plugin_binary
from overlay.cni.spec import COMMANDS, SUPPORTED_VERSIONS
from overlay.cni.wire import parse_request

PLUGIN = plugin_binary()


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    if not PLUGIN.is_file():
        pytest.fail(f"{PLUGIN} is missing: `make install` builds it from native/", pytrace=False)


def run(stdin: bytes | dict[str, Any], env: dict[str, Any] | None = None,
        timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    data = json.dumps(stdin).encode() if isinstance(stdin, dict) else stdin
    return subprocess.run([str(PLUGIN)], input=data, env=env or {}, capture_output=True,
                          timeout=timeout, check=False)


def cni_env(command: str, **kw: str) -> dict[str, str]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_NETNS": "/proc/self/ns/net",
           "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin"}
    env.update(kw)
    return {k: v for k, v in env.items() if v is not None}


def conf(sock: Path | str, version: str = "1.0.0", **kw: Any) -> dict[str, Any]:
    return {"cniVersion": version, "name": "overlay", "type": "overlay",
            "agentSocket": str(sock), **kw}


def error(p: subprocess.CompletedProcess[bytes], code: int, *words: str) -> dict[str, Any]:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    doc = json.loads(p.stdout)
    assert set(doc) <= {"cniVersion", "code", "msg", "details"} and doc["code"] == code, doc
    assert doc["cniVersion"] in SUPPORTED_VERSIONS and doc["msg"], doc
    text = f"{doc['msg']} {doc.get('details', '')}"
    for w in words:
        assert w in text, doc
    return dict(doc)


# --- the file itself ---------------------------------------------------------------


def test_it_is_one_static_executable_without_an_interpreter():
    data = PLUGIN.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not a 64-bit ELF file"
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    kinds = {struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)}
    assert 3 not in kinds, "it has a PT_INTERP: it needs a dynamic loader and shared libc"
    assert 2 not in kinds, "it has a PT_DYNAMIC section: it is dynamically linked"
    assert len(data) < 1 << 20


# --- VERSION -------------------------------------------------------------------------


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_version_echoes_the_request_and_lists_what_the_agent_supports(version):
    p = run({"cniVersion": version}, {"CNI_COMMAND": "VERSION"})
    assert p.returncode == 0, p.stdout
    assert json.loads(p.stdout) == {"cniVersion": version,
                                    "supportedVersions": list(SUPPORTED_VERSIONS)}


@pytest.mark.parametrize(("stdin", "echo"), [
    (b"", "1.0.0"), (b"garbage", "1.0.0"), (b"[1]", "1.0.0"), (b'{"cniVersion": ""}', "1.0.0"),
    (b'{"cniVersion": 4}', "1.0.0"), (b'{"cniVersion": "0.3.\\u0031"}', "0.3.1"),
    (b'{"cniVersion": "0.4.0", "cniVersion": "9.9"}', "9.9"),
    (b'{"cniVersion": "0.4.0"} trailing', "1.0.0"), (b'{"x": [' * 600 + b"", "1.0.0"),
])
def test_version_of_an_odd_config(stdin, echo):
    p = run(stdin, {"CNI_COMMAND": "VERSION"})
    assert p.returncode == 0 and json.loads(p.stdout)["cniVersion"] == echo


# --- with an agent: the wire format ---------------------------------------------------


class FakeAgent:
    """Serves one request: records what arrived, answers with `reply`."""

    def __init__(self, path: Path, reply: bytes, close_early: bool = False) -> None:
        self.path, self.reply, self.close_early = path, reply, close_early
        self.env: dict[str, str] = {}
        self.stdin = self.raw = b""
        self.fd_stat: os.stat_result | None = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 4)
            for fd in fds:
                self.fd_stat = os.fstat(fd)
                os.close(fd)
            hlen = int.from_bytes(data[8:12], "big")
            while len(data) < 16 + hlen or len(data) < 16 + hlen + int.from_bytes(
                    data[12 + hlen:16 + hlen], "big"):
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
            self.raw = data
            self.env, self.stdin = parse_request(data)
            if self.close_early:
                conn.sendall(b"\x00\x00")
                return
            conn.sendall(self.reply)

    def close(self) -> None:
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Any]:
    made: list[FakeAgent] = []

    def start(reply: bytes, close_early: bool = False) -> FakeAgent:
        a = FakeAgent(tmp_path / "cni.sock", reply, close_early)
        made.append(a)
        return a

    yield start
    for a in made:
        a.close()


def response(code: int, body: bytes) -> bytes:
    return wire.response_bytes(code, body)


def test_the_request_carries_env_stdin_and_the_netns_and_the_answer_comes_back(agent, tmp_path):
    body = b'{"cniVersion": "1.0.0", "ips": []}\n'
    a = agent(response(0, body))
    netns = tmp_path / "netns"
    netns.write_text("")
    stdin = json.dumps(conf(a.path, mtu=1400)).encode()
    env = cni_env("ADD", CNI_NETNS=str(netns), CNI_ARGS="K8S_POD_NAME=web;IgnoreUnknown=1",
                  UNRELATED="not sent")
    p = run(stdin, env)
    a.close()
    assert (p.returncode, p.stdout) == (0, body)
    assert a.stdin == stdin
    assert a.env == {k: v for k, v in env.items() if k != "UNRELATED"}
    # Byte for byte what the reference encoder makes of the same environment.
    assert a.raw == wire.request_bytes({k.encode(): v.encode() for k, v in env.items()},
                                       stdin, {})
    assert a.fd_stat is not None
    assert (a.fd_stat.st_dev, a.fd_stat.st_ino) == (netns.stat().st_dev, netns.stat().st_ino)


def test_the_agents_exit_code_and_large_documents_pass_unchanged(agent):
    body = b'{"cniVersion": "1.0.0", "code": 7, "msg": "' + b"x" * (3 << 20) + b'"}\n'
    a = agent(response(7, body))
    stdin = json.dumps(conf(a.path, pad="y" * ((1 << 20) - 200))).encode()
    p = run(stdin, cni_env("DEL"))
    a.close()
    assert (p.returncode, p.stdout) == (7, body)
    assert a.stdin == stdin


def test_a_netns_that_cannot_be_opened_is_reported_to_the_agent(agent):
    a = agent(response(4, b"{}"))
    run(conf(a.path), cni_env("ADD", CNI_NETNS="/nonexistent/ns"))
    a.close()
    assert a.env["CNI_NETNS"] == "/nonexistent/ns"
    assert a.env["NETNS_ERROR"] == "No such file or directory (errno 2)"
    assert a.fd_stat is None


def test_an_agent_that_dies_mid_request_means_try_again_later(agent):
    a = agent(b"", close_early=True)
    p = run(conf(a.path), cni_env("ADD"))
    a.close()
    error(p, 11, "try again later", str(a.path), "closed the connection")


def test_config_larger_than_1_mib_is_refused_without_the_agent(tmp_path):
    p = run(json.dumps(conf(tmp_path / "s", pad="z" * (1 << 20))).encode(), cni_env("ADD"))
    error(p, 6, "larger than")


# --- without the agent ----------------------------------------------------------------


@pytest.mark.parametrize(("command", "version", "code", "words"), [
    ("ADD", "1.0.0", 11, ("try again later",)),
    ("CHECK", "0.4.0", 11, ("try again later",)),
    ("STATUS", "1.1.0", 50, ("not available",)),
    ("CHECK", "0.3.1", 1, ("0.4.0",)),
    ("STATUS", "1.0.0", 1, ("1.1.0",)),
    ("GC", "0.4.0", 1, ("1.1.0",)),
    ("ADD", "2.0.0", 1, ("incompatible", "2.0.0")),
])
def test_offline_answers(tmp_path, command, version, code, words):
    sock = tmp_path / "cni.sock"
    doc = error(run(conf(sock, version), cni_env(command)), code, *words)
    assert doc["cniVersion"] == (version if version in SUPPORTED_VERSIONS else "1.0.0")
    if code in (11, 50):
        assert str(sock) in doc["details"] and "No such file" in doc["details"]
    assert not (tmp_path / "cni-pending").exists()


@pytest.mark.parametrize(("env", "var"), [
    ({"CNI_COMMAND": None}, "CNI_COMMAND"), ({"CNI_COMMAND": "FROB"}, "CNI_COMMAND"),
    ({"CNI_CONTAINERID": None}, "CNI_CONTAINERID"), ({"CNI_IFNAME": ""}, "CNI_IFNAME"),
    ({"CNI_IFNAME": "eth0/1"}, "CNI_IFNAME"), ({"CNI_IFNAME": "x" * 16}, "CNI_IFNAME"),
    ({"CNI_IFNAME": ".."}, "CNI_IFNAME"), ({"CNI_CONTAINERID": "a b"}, "CNI_CONTAINERID"),
    ({"CNI_ARGS": "A=1;novalue"}, "CNI_ARGS"), ({"CNI_ARGS": "=1"}, "CNI_ARGS"),
])
def test_offline_bad_environment_is_code_4_naming_the_variable(tmp_path, env, var):
    error(run(conf(tmp_path / "cni.sock"), cni_env("DEL", **env)), 4, var)
    assert not (tmp_path / "cni-pending").exists()


@pytest.mark.parametrize(("stdin", "code"), [
    (b"", 6), (b"{", 6), (b"\xff{}", 6), (b"[1]", 6), (b'{"a": 1} x', 6),
    (b'{"name": "overlay"}', 7), (b'{"cniVersion": 1}', 7), (b'{"cniVersion": "0.2.0"}', 1),
    (b'{"cniVersion": "1.0.0", "agentSocket": "/a\\u0000b"}', 7),
    (b'{"cniVersion": "1.0.0", "agentSocket": 5}', 7),
])
def test_offline_undecodable_or_unversioned_config(stdin, code):
    error(run(stdin, cni_env("DEL")), code)


def records(tmp_path: Path) -> list[tuple[dict[str, str], bytes]]:
    return [parse_request(p.read_bytes())
            for p in sorted((tmp_path / "cni-pending").glob("*.req"))]


@pytest.mark.parametrize("netns", ["/proc/self/ns/net", "/gone", None])
def test_offline_del_is_recorded_for_the_agent_as_the_request_itself(tmp_path, netns):
    stdin = json.dumps(conf(tmp_path / "cni.sock", "0.4.0", mtu="broken")).encode()
    env = cni_env("DEL", CNI_NETNS=netns)
    p = run(stdin, env)
    assert (p.returncode, p.stdout) == (0, b""), p.stdout
    assert records(tmp_path) == [(env, stdin)]
    assert [f.name for f in (tmp_path / "cni-pending").iterdir() if not f.name.endswith(".req")
            ] == []
    assert run(stdin, env).returncode == 0 and len(records(tmp_path)) == 2


def test_offline_gc_is_recorded_and_a_malformed_list_refused(tmp_path):
    sock = tmp_path / "cni.sock"
    good = conf(sock, "1.1.0", **{"cni.dev/valid-attachments": [
        {"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "net1"}]})
    assert run(good, {"CNI_COMMAND": "GC"}).returncode == 0
    for bad in ([{"containerID": "a"}], [1], {"containerID": "a", "ifname": "e"}, None):
        error(run({**good, "cni.dev/valid-attachments": bad}, {"CNI_COMMAND": "GC"}), 7,
              "cni.dev/valid-attachments")
    assert [env["CNI_COMMAND"] for env, _ in records(tmp_path)] == ["GC"]


def test_offline_del_without_the_agents_directory_has_nothing_to_release(tmp_path):
    p = run(conf(tmp_path / "never" / "cni.sock"), cni_env("DEL"))
    assert (p.returncode, p.stdout) == (0, b"")
    assert not (tmp_path / "never").exists()


def test_offline_del_that_cannot_be_recorded_is_an_io_error(tmp_path):
    (tmp_path / "cni-pending").write_text("not a directory")
    error(run(conf(tmp_path / "cni.sock"), cni_env("DEL")), 5, "cni-pending")


# --- hostile input ----------------------------------------------------------------------

_env_text = st.one_of(st.text(max_size=40).map(lambda s: s.replace("\x00", "")),
                      st.binary(max_size=40).map(lambda b: b.replace(b"\x00", b"")))
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12)


@st.composite
def configs(draw: st.DrawFn, sock: str) -> bytes:
    doc: dict[str, Any] = draw(st.dictionaries(st.text(max_size=8), _json, max_size=4))
    if draw(st.booleans()):
        doc["cniVersion"] = draw(st.sampled_from(SUPPORTED_VERSIONS) | st.text(max_size=6)
                                 | _json)
    if draw(st.booleans()):
        doc["cni.dev/valid-attachments"] = draw(_json)
    doc["agentSocket"] = sock  # never a socket outside the test's directory
    data = json.dumps(doc, ensure_ascii=draw(st.booleans())).encode()
    cut = draw(st.integers(0, len(data)))
    return draw(st.sampled_from([data, data[:cut], data[:cut] + b"\xff" + data[cut:],
                                 data[:cut] + data[cut + 1:]]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_garbage_in_always_gives_a_cni_document_out(tmp_path, data):
    sock = str(tmp_path / "cni.sock")
    stdin = data.draw(st.one_of(configs(sock), st.binary(max_size=300)))
    if not stdin.lstrip().startswith(b"{") or sock.encode() not in stdin:
        stdin = b"[" + stdin  # without our agentSocket: never a document that asks for one
    env: dict[bytes, bytes] = {}
    for key in (b"CNI_COMMAND", b"CNI_CONTAINERID", b"CNI_NETNS", b"CNI_IFNAME", b"CNI_ARGS"):
        value = data.draw(st.one_of(st.none(), st.sampled_from(COMMANDS).map(str.encode),
                                    _env_text.map(lambda v: v if isinstance(v, bytes)
                                                  else v.encode())))
        if value is not None and (key != b"CNI_NETNS" or not value.startswith(b"/")):
            env[key] = value
    p = subprocess.run([str(PLUGIN)], input=stdin, env=env, capture_output=True, timeout=20,
                       check=False)
    assert p.returncode >= 0, f"killed by signal {-p.returncode}"
    command = env.get(b"CNI_COMMAND")
    if command == b"VERSION":
        assert p.returncode == 0 and json.loads(p.stdout)["supportedVersions"]
    elif p.returncode == 0:
        assert command in (b"DEL", b"GC") and p.stdout == b""
    else:
        error(p, p.returncode)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_json, version=st.text(max_size=6), cut=st.integers(0, 400), ascii_=st.booleans())
def test_the_json_scanner_agrees_with_pythons_on_what_is_a_config(doc, version, cut, ascii_):
    full = {"cniVersion": version, "x": doc} if version else {"x": doc}
    text = json.dumps(full, ensure_ascii=ascii_).encode()
    for stdin in (text, text[:cut] + text[cut + 1:]):
        try:
            parsed = json.loads(stdin.decode("utf-8"))
        except ValueError:
            parsed = None
        v = parsed.get("cniVersion") if isinstance(parsed, dict) else None
        want = v if isinstance(v, str) and v else "1.0.0"
        p = run(stdin, {"CNI_COMMAND": "VERSION"})
        assert p.returncode == 0 and json.loads(p.stdout)["cniVersion"] == want, stdin


def test_the_executable_and_the_agent_share_the_constants():
    source = (Path(__file__).resolve().parents[2] / "native" / "overlay-cni.c").read_text()
    magic = wire.MAGIC[:-1].decode()  # C adds the NUL
    assert wire.MAGIC.endswith(b"\0") and f'#define MAGIC "{magic}"' in source
    assert f'#define DEFAULT_SOCKET "{wire.DEFAULT_SOCKET}"' in source
    assert f'#define PENDING_DIR "{wire.PENDING_DIR}"' in source
    assert f"#define E_INTERNAL {wire.E_INTERNAL}" in source
    assert f'err_version[8] = "{wire.DEFAULT_VERSION}"' in source
    versions = ", ".join(f'"{v}"' for v in wire.SUPPORTED_VERSIONS)
    assert f"VERSIONS[] = {{{versions}}};" in source
    keys = " ".join(f'"{k}",' for k in wire.ENV_KEYS).rstrip(",")
    assert f"ENV_KEYS[] = {{{keys}}};" in " ".join(source.split())
    assert f'"{wire.NETNS_ERROR}=%s (errno %d)"' in source
