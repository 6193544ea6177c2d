"""Hostile input on the command line (issue 15): every overlayctl command and every
overlayd flag, fed values a user could type by mistake or on purpose. Usage errors exit 2,
runtime errors exit 1, and nothing prints a traceback, a gRPC debug string or a warning.

The commands and flags are enumerated from the argparse parsers themselves, so a
command added later is fuzzed without a change here. To keep the machine as it is:

- every overlayctl run happens inside a network namespace made for this module (only
  loopback, an eth0 (a veth) and a cni0 bridge), where the servers it may be pointed at live:
  a closed port, an HTTP/1 server, a gRPC server that is not etcd, one that never answers;
- a flag that names a file, a directory or a socket gets a path under a temp dir, a path
  that cannot exist (/nonexistent-..., /proc/nope/...) or an empty one, never anything
  else, and is always given when it has a default (defaults name the real /etc/cni, ...);
- the etcd flags, --name (sandbox; only names that are not up), the time bounds and
  --dry-run are always given, so `sandbox up` never builds and nothing waits long;
- overlayd runs with its Agent replaced by a stub: what is fuzzed is everything up to the
  start (flags and their checks), nothing that touches the kernel.
A command that changes the machine must take its targets from such flags or have
--dry-run; add other care here before it lands.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import RUN_ID, new_name, require_environment, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay import cli
from overlay.agent.main import build_parser as overlayd_parser
from overlay.ctl import flags
from overlay.ctl.main import build_parser as overlayctl_parser
from overlay.sandbox.sandbox import BASE, list_netns

BIN = Path(sys.executable).parent
OVERLAYCTL = str(BIN / "overlayctl")
# Command lines per run (more: OVERLAY_FUZZ_EXAMPLES=1000). overlayd's are cheap (one
# process runs them all), so it gets four times as many.
EXAMPLES = int(os.environ.get("OVERLAY_FUZZ_EXAMPLES", "60"))
RUN_TIMEOUT = 60  # seconds for one command; none of them should wait that long

# Servers inside the namespace: an HTTP/1 server, a gRPC server without etcd's services,
# and a TCP server that accepts and never answers. Prints their ports as JSON, serves
# until stdin closes.
SERVERS = """
import json, socket, sys, threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import grpc

class Quiet(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self): self.send_error(404)
    do_POST = do_GET

http = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
threading.Thread(target=http.serve_forever, daemon=True).start()
g = grpc.server(futures.ThreadPoolExecutor(2))
gport = g.add_insecure_port("127.0.0.1:0")
g.start()
# An etcd that hangs: it speaks HTTP/2 (server SETTINGS, and the ack of the client's), so
# gRPC's 20 s handshake deadline does not end the request, and then never answers.
silent = socket.socket()
silent.bind(("127.0.0.1", 0))
silent.listen(64)
held = []
SETTINGS, SETTINGS_ACK = bytes(9)[:3] + b"\x04" + bytes(5), bytes(3) + b"\x04\x01" + bytes(4)
def hold():
    while True:
        conn = silent.accept()[0]
        try:
            conn.sendall(SETTINGS + SETTINGS_ACK)
        except OSError:
            pass
        held.append(conn)
threading.Thread(target=hold, daemon=True).start()
print(json.dumps({"http": http.server_address[1], "grpc": gport,
                  "silent": silent.getsockname()[1]}), flush=True)
sys.stdin.read()
"""

# overlayd up to the start of its agent, the Agent being a stub: one process runs main()
# for each JSON argv on stdin and answers with its exit status and output (a process per
# command line would spend seconds importing the agent's libraries, for nothing).
OVERLAYD_DRIVER = """
import contextlib, io, json, sys, traceback, types

class Agent:
    def __init__(self, opts):
        self.opts = opts
    async def run(self):
        print("stub agent: would start", file=sys.stderr)
        return 0

stub = types.ModuleType("overlay.agent.agent")
stub.Agent = Agent
sys.modules["overlay.agent.agent"] = stub
from overlay.agent.main import main

for line in sys.stdin:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(json.loads(line))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            traceback.print_exc()
            code = -1
    print(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue()}), flush=True)
"""

SIGNS_OF_TROUBLE = ("Traceback", "internal error", "debug_error_string", "_InactiveRpcError",
                    "AioRpcError", "RuntimeWarning", "Exception ignored", "was never awaited",
                    "Warning:")


@dataclass
class Env:
    ns: str
    tmp: Path
    closed: int
    http: int
    grpc: int
    silent: int
    fresh: tuple[str, ...]  # sandbox names that are not up


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_environment()
    ns = f"ovs-{new_name()}-cli"
    tmp = tmp_path_factory.mktemp("cli")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    servers = None
    try:
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"],
                    ["addr", "add", "10.99.0.1/16", "dev", "eth0"],
                    ["link", "set", "eth0", "up"],
                    ["link", "add", "cni0", "type", "bridge"],
                    ["addr", "add", "10.244.0.1/24", "dev", "cni0"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        servers = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVERS],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert servers.stdout is not None
        ports = json.loads(servers.stdout.readline())
        _files(tmp)
        fresh = tuple(f"fz{RUN_ID}{i}" for i in range(2))
        assert not [n for n in list_netns() for f in fresh if n.startswith(f"ovs-{f}-")]
        assert not any((BASE / f).exists() for f in fresh)
        yield Env(ns, tmp, 2379, ports["http"], ports["grpc"], ports["silent"], fresh)
    finally:
        if servers is not None:
            servers.kill()
            servers.communicate()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def _files(tmp: Path) -> None:
    (tmp / "a-file").write_text("not what anyone expects\n")
    (tmp / "a-dir").mkdir()
    (tmp / "net-conf.json").write_text('{"Network": "10.244.0.0/16", "SubnetLen": 24}')
    (tmp / "bad-conf.json").write_text('{"Network": "10.244.0.0/16", "SubnetLen": 40}')
    (tmp / "conflist.json").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "overlay", "plugins": [{"type": "overlay"}]}))
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp / "dead.sock"))  # bound, never listening: connection refused
    dead.close()


def run_overlayctl(e: Env, argv: list[str], timeout: float = RUN_TIMEOUT
                   ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OVERLAYD_ETCD_ENDPOINTS": f"http://127.0.0.1:{e.closed}"}
    env.pop("OVERLAY_DEBUG", None)
    try:
        return subprocess.run(["ip", "netns", "exec", e.ns, OVERLAYCTL, *argv], cwd=e.tmp,
                              env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"overlayctl {argv} still running after {timeout}s")


def assert_clean(argv: list[str], p: subprocess.CompletedProcess[str], prog: str) -> None:
    out = p.stdout + p.stderr
    shown = f"{prog} {argv!r} exited {p.returncode}\nstdout: {p.stdout[-2000:]}\n" \
            f"stderr: {p.stderr[-3000:]}"
    assert p.returncode in (0, 1, 2), shown
    assert not [s for s in SIGNS_OF_TROUBLE if s in out], shown
    if p.returncode == 2:
        assert "error: argument" in p.stderr or "error:" in p.stderr \
            or f"{prog}: invalid " in p.stderr or "invalid configuration" in p.stderr, shown
    elif p.returncode == 1:
        assert p.stderr.strip(), shown  # a failure says why
    # No line runs on (a debug string), beyond quoting what was typed.
    room = 1000 + 4 * max((len(a) for a in argv), default=0)
    assert all(len(line) < room for line in p.stderr.splitlines()), shown


# --- values --------------------------------------------------------------------------


def kind(action: argparse.Action) -> str:
    """What a flag takes, from the parser: decides which values it is fuzzed with."""
    opt, dest, t = action.option_strings[-1], action.dest, action.type
    if action.nargs == 0:
        return "switch"
    if action.choices is not None:
        return "choice"
    if opt == "--etcd-endpoints":
        return "endpoints"
    if t is flags.sandbox_name:
        return "sandbox"
    if opt == "--cidr":
        return "cidr"
    if opt in ("--netns", "--iface", "--python"):
        return opt[2:]
    if "socket" in dest:
        return "socket"
    if t in (cli.path, Path) or isinstance(action.default, Path) \
            or (isinstance(action.default, str) and action.default.startswith("/")) \
            or action.metavar in ("FILE", "PATH", "DIR") \
            or dest.endswith(("_dir", "_file", "file", "_path")):
        return "path"
    if t is cli.seconds or t is float:
        return "seconds"
    if t is int or getattr(t, "__name__", "") == "integer":
        return "int"
    return "text"


def always(action: argparse.Action) -> bool:
    """Flags that are given on every run: their defaults point at real things (the
    machine's CNI dirs, the sandbox called demo, etcd on 127.0.0.1:2379) or wait long."""
    k = kind(action)
    if action.option_strings[-1] == "--dry-run":
        return True
    return k in ("endpoints", "sandbox", "path", "socket", "seconds") \
        and action.default is not None


def values(e: Env) -> dict[str, st.SearchStrategy[str]]:
    tmp = e.tmp
    hostile_text = st.one_of(
        st.sampled_from(["", " ", "-", "x", "/", "%", "%(default)s", "a" * 3000, "é",
                         "'\"", "$(id)", "\n", "\t", "0", "-1"]),
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                max_size=24))
    paths = [tmp / "new" / "dir", tmp / "a-file", tmp / "a-dir", tmp / "net-conf.json",
             tmp / "bad-conf.json", tmp / "conflist.json", tmp / "ü dir", "", " ",
             "relative/dir", f"/nonexistent-{RUN_ID}/x", "/proc/nope/x"]
    return {
        "switch": st.just(""),
        "endpoints": st.sampled_from([
            f"http://127.0.0.1:{e.closed}", f"127.0.0.1:{e.closed}",
            f"https://127.0.0.1:{e.closed}", f"localhost:{e.closed}",
            f"http://127.0.0.1:{e.http}", f"http://127.0.0.1:{e.grpc}",
            f"http://127.0.0.1:{e.silent}", "http://[::1]:2379", "[::1]:2379", "foo://x",
            "unix:///run/etcd.sock", "", ",", " ", "127.0.0.1:0", "127.0.0.1:99999",
            "127.0.0.1:-1", f"http://127.0.0.1:{e.closed}/v3", "http://u@127.0.0.1:1",
            "a" * 300, f"http://127.0.0.1:{e.closed},http://127.0.0.1:{e.http}"]),
        "sandbox": st.sampled_from([*e.fresh * 4, "", "Demo", "a" * 13, "../x", "a-b", "ü",
                                    " "]),
        "cidr": st.sampled_from(["10.244.0.0/16", "10.98.0.0/16", "10.99.0.0/16",
                                 "10.99.7.0/24", "192.0.2.0/24", "0.0.0.0/0", "10.0.0.0/33",
                                 "fd00::/64", "10.244.0.1/16", "127.0.0.0/16", "x", ""]),
        "netns": st.sampled_from([f"ovs-fz{RUN_ID}-none", "", "../..", "a/b", "-x", "."]),
        "iface": st.sampled_from(["lo", "eth0", "nosuch0", "", "a" * 20, "../x"]),
        "python": st.sampled_from([sys.executable, "/usr/bin/python3", "python3", "",
                                   str(tmp / "a-file"), "/bin/true", "/bin/false",
                                   f"/nonexistent-{RUN_ID}/python", str(tmp)]),
        "socket": st.sampled_from([str(tmp / "none.sock"), str(tmp / "dead.sock"),
                                   str(tmp / "a-file"), str(tmp), "", "rel.sock",
                                   "/proc/nope.sock"]),
        "path": st.sampled_from([str(p) for p in paths]),
        "seconds": st.sampled_from(["0.3"] * 6 + ["1"] * 2 + ["0", "-1", "nan", "inf", "abc",
                                                               "", "1e400", "0x10"]),
        "int": st.one_of(st.sampled_from(["0", "1", "2", "3", "-1", "24", "29", "33", "65536",
                                          "99999999999999999999", "1.5", "abc", "", " 7",
                                          "0x10", "٣"]),
                         st.integers(-5, 300).map(str)),
        "text": hostile_text,
        "positional": st.sampled_from(["10.244.1.2", "10.244.2.3", "x", "", "1.2.3.4.5",
                                       "::1", "-1", "10.244.1.2/24"]),
    }


def value_of(action: argparse.Action, vals: dict[str, st.SearchStrategy[str]]
             ) -> st.SearchStrategy[str]:
    if action.choices is not None and action.nargs != 0:
        return st.sampled_from([*(str(c) for c in action.choices), "", "x", "9"])
    return vals[kind(action)]


@st.composite
def command_lines(draw: st.DrawFn, leaves: list[tuple[tuple[str, ...], Any]],
                  vals: dict[str, st.SearchStrategy[str]],
                  must: Callable[[argparse.Action], bool] = always) -> list[str]:
    path, parser = draw(st.sampled_from(leaves))
    opts = cli.options(parser)
    chosen = draw(st.lists(st.sampled_from(opts), unique_by=id, max_size=6)) if opts else []
    chosen += [a for a in opts if must(a) and a not in chosen]
    draw(st.randoms()).shuffle(chosen)
    argv = list(path)
    for a in chosen:
        argv.append(a.option_strings[-1])
        if a.nargs != 0:
            argv.append(draw(value_of(a, vals)))
    for a in parser._actions:
        if not a.option_strings and not isinstance(a, argparse._SubParsersAction):
            argv.append(draw(vals["positional"]))
    mutation = draw(st.sampled_from(["none"] * 8 + ["drop", "unknown", "extra", "help",
                                                     "twice"]))
    if mutation == "drop" and len(path) > 0:
        del argv[draw(st.integers(0, len(path) - 1))]
    elif mutation == "unknown":
        argv.insert(draw(st.integers(0, len(argv))), "--no-such-flag")
    elif mutation == "extra":
        argv.append("extra")
    elif mutation == "help":
        argv.append("--help")
    elif mutation == "twice" and chosen and chosen[0].nargs != 0:
        argv += [chosen[0].option_strings[-1], draw(value_of(chosen[0], vals))]
    return argv


def leaves_of(parser: argparse.ArgumentParser) -> list[tuple[tuple[str, ...], Any]]:
    return list(cli.commands(parser))


# --- overlayctl ------------------------------------------------------------------------


def test_the_fuzz_finds_every_command():
    paths = {" ".join(p) for p, _ in leaves_of(overlayctl_parser())}
    assert {"network init", "network show", "leases", "status", "leave", "install-cni",
            "trace", "sandbox up", "sandbox down"} <= paths
    for path, parser in leaves_of(overlayctl_parser()):
        for a in cli.options(parser):
            if kind(a) == "text" and a.default is not None:
                # a text flag with a default that looks like a place must be a path kind
                assert not str(a.default).startswith("/"), (path, a.option_strings)


@pytest.mark.parametrize("path", [p for p, _ in leaves_of(overlayctl_parser())],
                         ids=lambda p: " ".join(p) or "overlayctl")
def test_every_command_with_its_defaults_pointed_at_nothing(env, path):
    """Each command once with only the flags that must be pointed away from the machine
    (their first value: a closed port, a temp dir, a sandbox that is not up)."""
    parser = dict(leaves_of(overlayctl_parser()))[path]
    argv = list(path)
    for a in cli.options(parser):
        if always(a):
            argv.append(a.option_strings[-1])
            if a.nargs != 0:
                argv.append(_first(a))
    argv += ["10.244.1.2" for a in parser._actions
             if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]
    p = run_overlayctl(env, argv)
    assert_clean(argv, p, "overlayctl")


def _first(action: argparse.Action) -> str:
    """A sensible, harmless value of each kind that must be given."""
    return {"seconds": "0.3", "sandbox": f"fz{RUN_ID}0", "endpoints": "http://127.0.0.1:2379",
            "socket": "none.sock", "path": "new-dir"}.get(kind(action), "x")


def test_hostile_argv_never_gets_a_traceback(env):
    leaves = leaves_of(overlayctl_parser())
    vals = values(env)
    seen: dict[str, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(command_lines(leaves, vals))
    def fuzz(argv: list[str]) -> None:
        p = run_overlayctl(env, argv)
        assert_clean(argv, p, "overlayctl")
        seen[str(p.returncode)] = seen.get(str(p.returncode), 0) + 1

    fuzz()
    print(f"overlayctl: {EXAMPLES} command lines, exit statuses {seen}")
    # Nothing outside the temp dir was made, and no sandbox.
    assert not [n for n in list_netns() for f in env.fresh if n.startswith(f"ovs-{f}-")]
    assert not any((BASE / f).exists() for f in env.fresh)


# --- overlayd --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overlayd(env: Env) -> Iterator[subprocess.Popen[str]]:
    p = subprocess.Popen([sys.executable, "-c", OVERLAYD_DRIVER], cwd=env.tmp, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        yield p
    finally:
        p.kill()
        p.communicate()


def run_overlayd(driver: subprocess.Popen[str], argv: list[str]
                 ) -> subprocess.CompletedProcess[str]:
    assert driver.stdin is not None and driver.stdout is not None
    driver.stdin.write(json.dumps(argv) + "\n")
    driver.stdin.flush()
    line = driver.stdout.readline()
    assert line, f"the overlayd driver died on {argv}"
    r = json.loads(line)
    return subprocess.CompletedProcess(argv, r["code"], r["out"], r["err"])


def test_overlayd_flags_never_get_a_traceback(env, overlayd):
    leaves = leaves_of(overlayd_parser())
    vals = values(env)
    seen: dict[str, int] = {}

    @settings(max_examples=4 * EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(command_lines(leaves, vals, must=lambda _: False))  # the agent is a stub
    def fuzz(argv: list[str]) -> None:
        p = run_overlayd(overlayd, argv)
        assert_clean(argv, p, "overlayd")
        if p.returncode == 0 and "--help" not in argv:
            assert "stub agent: would start" in p.stderr, p.stderr
        seen[str(p.returncode)] = seen.get(str(p.returncode), 0) + 1

    fuzz()
    print(f"overlayd: exit statuses {seen}")
    # the driver itself reports what it is asked about
    p = run_overlayd(overlayd, ["--etcd-timeout", "0"])
    assert p.returncode == 2 and "argument --etcd-timeout" in p.stderr


# --- what the issue found, one by one ---------------------------------------------------


@pytest.mark.parametrize("argv, code, words", [
    (["leave", "--socket", "/nonexistent"], 1, "no such socket; is overlayd running"),
    (["status", "--socket", "/nonexistent"], 1, "no such socket; is overlayd running"),
    (["status", "--socket", "dead.sock"], 1, "nothing listens on the socket"),
    (["status", "--socket", "a-file"], 1, "it is not a socket"),
    (["install-cni", "--bin-dir", "/proc/nope", "--conf-dir", "net.d"], 1,
     "cannot install /proc/nope/overlay (--bin-dir /proc/nope)"),
    (["install-cni", "--bin-dir", "b", "--conf-dir", "c", "--network-name", "my net"], 2,
     "invalid --network-name"),
    (["trace", "10.244.1.2", "10.244.2.3", "--name", f"fz{RUN_ID}1"], 2,
     "no sandbox named"),
    (["trace", "10.244.1.2", "10.244.2.3", "--netns", "../.."], 2, "no network namespace"),
    (["network", "init", "--etcd-timeout", "0"], 2, "must be a positive number of seconds"),
    (["network", "init", "--etcd-timeout", "-1"], 2, "must be a positive number of seconds"),
    (["network", "init", "--subnet-len", "40"], 2, "argument --subnet-len"),
    (["network", "init", "--subnet-len", "8"], 2, "invalid --subnet-len: a /8 per node"),
    (["leases", "--etcd-endpoints", "http://[::1]:2379,127.0.0.1"], 2,
     "mixes IPv4 and IPv6 endpoints"),
    (["leases", "--etcd-endpoints", "http://[::1]:2379"], 1, "nothing listens at [::1]:2379"),
    (["leases", "--etcd-endpoints", "http://127.0.0.1:2379"], 1,
     "nothing listens at 127.0.0.1:2379"),
    (["sandbox", "down", "--name", "Demo"], 2, "1 to 12 lowercase letters or digits"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_known_cases_say_what_is_wrong(env, argv, code, words):
    p = run_overlayctl(env, argv)
    assert_clean(argv, p, "overlayctl")
    assert p.returncode == code and words in p.stderr, (p.returncode, p.stderr)


@pytest.mark.parametrize("server", ["http", "grpc"])
def test_a_server_that_is_not_etcd_is_called_so(env, server):
    port = getattr(env, server)
    argv = ["leases", "--etcd-endpoints", f"http://127.0.0.1:{port}"]
    p = run_overlayctl(env, argv)
    assert_clean(argv, p, "overlayctl")
    assert p.returncode == 1 and f"127.0.0.1:{port} answered, but it is not etcd" in p.stderr, \
        p.stderr


def test_an_etcd_that_never_answers_times_out_within_the_timeout(env):
    argv = ["leases", "--etcd-endpoints", f"http://127.0.0.1:{env.silent}", "--etcd-timeout",
            "0.5"]
    t0 = time.monotonic()
    p = run_overlayctl(env, argv)
    took = time.monotonic() - t0
    assert_clean(argv, p, "overlayctl")
    assert p.returncode == 1 and "timed out" in p.stderr, p.stderr
    assert took < 30, took


def test_network_init_refuses_a_cidr_that_overlaps_this_hosts_networks(env):
    """In the module's namespace eth0 holds 10.99.0.1/16 and cni0 (ours) 10.244.0.1/24."""
    for cidr in ("10.99.0.0/16", "10.99.7.0/24", "10.0.0.0/8"):
        argv = ["network", "init", "--cidr", cidr, "--subnet-len", "26"]
        p = run_overlayctl(env, argv)
        assert_clean(argv, p, "overlayctl")
        assert p.returncode == 2, p.stderr
        assert f"invalid --cidr: {cidr} overlaps 10.99.0.0/16, which is in use on this " \
               "host" in p.stderr, p.stderr
    # Not a blanket refusal: a free CIDR, and one on our own bridge, get to etcd (closed).
    for cidr in ("10.98.0.0/16", "10.244.0.0/16"):
        argv = ["network", "init", "--cidr", cidr]
        p = run_overlayctl(env, argv)
        assert_clean(argv, p, "overlayctl")
        assert p.returncode == 1 and "nothing listens at 127.0.0.1:2379" in p.stderr, p.stderr


def test_sandbox_up_dry_run_checks_and_makes_nothing(env):
    name = env.fresh[0]
    argv = ["sandbox", "up", "--name", name, "--nodes", "4", "--dry-run"]
    p = run_overlayctl(env, argv)
    assert_clean(argv, p, "overlayctl")
    assert p.returncode == 0 and f"ovs-{name}-n4" in p.stdout and "dry run" in p.stdout
    assert not (BASE / name).exists()
    assert not [n for n in list_netns() if n.startswith(f"ovs-{name}-")]
    for bad, words in ((["--pods-per-node", "20", "--subnet-len", "28"],
                        "invalid --pods-per-node"),
                       (["--cidr", "10.0.0.0/33"], "invalid --cidr"),
                       (["--cidr", "10.0.0.0/24", "--subnet-len", "16"],
                        "invalid --subnet-len")):
        argv = ["sandbox", "up", "--name", name, "--dry-run", *bad]
        p = run_overlayctl(env, argv)
        assert_clean(argv, p, "overlayctl")
        assert p.returncode == 2 and words in p.stderr, p.stderr


# --- Ctrl-C ----------------------------------------------------------------------------


def _interrupt(e: Env, argv: list[str], started: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OVERLAYD_ETCD_ENDPOINTS": f"http://127.0.0.1:{e.closed}"}
    # As at a terminal: SIGINT delivered. A test run started in the background by a
    # non-interactive shell (`make test &`, a CI runner) has SIGINT ignored, the children
    # inherit that, and Python then installs no KeyboardInterrupt handler.
    p = subprocess.Popen(["ip", "netns", "exec", e.ns, OVERLAYCTL, *argv], cwd=e.tmp, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        if started:
            assert p.stderr is not None
            line = p.stderr.readline()
            assert started in line, line
        else:  # wait until it is inside the etcd request: connected to the silent server
            wait_until(lambda: _connections(e, e.silent) > 0, 30, 0.1)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def _connections(e: Env, port: int) -> int:
    out = subprocess.run(["ip", "netns", "exec", e.ns, "ss", "-Htn", "state", "established",
                          "dport", "=", f":{port}"], capture_output=True, text=True,
                         check=False).stdout
    return len(out.splitlines())


@pytest.mark.parametrize("argv, started", [
    (["trace", "10.244.1.2", "10.244.2.3", "--iface", "lo", "--timeout", "60"], "capturing"),
    (["leases", "--etcd-endpoints", "SILENT", "--etcd-timeout", "60"], ""),
])
def test_ctrl_c_ends_quietly_with_130(env, argv, started):
    argv = [a.replace("SILENT", f"http://127.0.0.1:{env.silent}") for a in argv]
    p = _interrupt(env, argv, started)
    out = p.stdout + p.stderr
    assert p.returncode == 130, (p.returncode, out)
    assert "overlayctl: interrupted" in p.stderr
    assert not [s for s in SIGNS_OF_TROUBLE if s in out], out


def test_the_closed_port_is_closed(env):
    """The fuzz relies on it: nothing listens on the etcd port inside the namespace."""
    probe = ("import socket,sys; s=socket.socket(); s.settimeout(5); "
             "sys.exit(s.connect_ex(('127.0.0.1', int(sys.argv[1]))) == 0)")
    p = subprocess.run(["ip", "netns", "exec", env.ns, sys.executable, "-c", probe,
                        str(env.closed)], check=False, timeout=30)
    assert p.returncode == 0
