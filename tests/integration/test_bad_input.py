"""Hostile input to the CNI plugin (issue 5, scenario 7), property-based.

The real executable, run as a runtime runs it, gets malformed JSON, odd
environment variables, invalid interface names and huge values. Whatever it
gets: a well-formed CNI answer on stdout (never a traceback), the agent
stays up, and nothing is leaked (a runtime's DEL after every ADD).
"""

from __future__ import annotations

import json

import pytest
from conftest import sandbox_up
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.sandbox.runtime import exec_plugin, find_plugin
from overlay.sandbox.sandbox import pid_alive

env_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=40)
ifnames = st.one_of(st.sampled_from(["eth0", "net1", "", ".", "..", "a/b", "a:b", "a b",
                                     "x" * 15, "x" * 16, "é" * 8]), env_text)
commands = st.one_of(st.sampled_from(["ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS"]),
                     env_text)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=20)
conf_keys = ["cniVersion", "name", "type", "agentSocket", "mtu", "hairpinMode", "ipMasq", "dns",
             "prevResult", "runtimeConfig", "args", "ipam", "capabilities",
             "cni.dev/valid-attachments"]
versions = st.sampled_from(["1.0.0", "0.4.0", "0.3.1", "0.3.0", "1.1.0", "0.2.0", "", "9.9.9"])


@st.composite
def configs(draw, socket_path):
    kind = draw(st.sampled_from(["mutated", "random-json", "bytes", "huge"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "random-json":
        return json.dumps(draw(json_values)).encode()
    if kind == "huge":
        return json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "overlay",
                           "agentSocket": socket_path,
                           "x": "A" * draw(st.sampled_from([10_000, 2_000_000]))}).encode()
    conf = {"cniVersion": draw(versions), "name": "overlay", "type": "overlay",
            "agentSocket": socket_path}
    for key in draw(st.lists(st.sampled_from(conf_keys), max_size=3)):
        conf[key] = draw(json_values)
    if draw(st.booleans()):
        conf["agentSocket"] = socket_path
    return json.dumps(conf).encode()


@pytest.fixture(scope="module")
def node_sb():
    with sandbox_up(1, 0) as sb:
        pod_ns = sb.ns("fuzz")
        sb._new_ns(pod_ns)
        yield sb, f"/run/netns/{pod_ns}"


def test_cni_plugin_survives_hostile_input(node_sb):
    sb, pod_netns = node_sb
    plugin = find_plugin("overlay", sb.cni_path())
    prefix = sb.exec_prefix(sb.node("n1").netns)
    sock = str(sb.cni_socket("n1"))
    calls = {"n": 0, "ok": 0}

    hostile = st.fixed_dictionaries({
        "command": commands, "cid": env_text, "ifname": ifnames, "args": env_text,
        "netns": st.sampled_from([pod_netns, "/run/netns/does-not-exist", "", "relative"]),
        "conf": configs(sock)})
    # Valid requests with one hostile field: these reach the agent's deep paths.
    nearly_valid = st.fixed_dictionaries({
        "command": st.sampled_from(["ADD", "ADD", "CHECK", "DEL"]),
        "cid": st.sampled_from(["c1", "c2", "x" * 200]),
        "ifname": st.sampled_from(["eth0", "net1", "lo"]),
        "args": st.sampled_from(["", "IgnoreUnknown=1;K8S_POD_NAME=p"]),
        "netns": st.just(pod_netns),
        "conf": st.builds(
            lambda k, v: json.dumps({"cniVersion": "1.0.0", "name": "overlay",
                                     "type": "overlay", "agentSocket": sock, k: v}).encode(),
            st.sampled_from(["mtu", "hairpinMode", "ipMasq", "dns", "prevResult",
                             "runtimeConfig", "args", "capabilities", "extra"]),
            json_values | st.integers(min_value=500, max_value=2000) | st.just(True)),
    })

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(req=st.one_of(hostile, nearly_valid))
    def one(req):
        command, cid, ifname, args, netns, conf = (req[k] for k in (
            "command", "cid", "ifname", "args", "netns", "conf"))
        calls["n"] += 1
        call = exec_plugin(plugin, command, conf, container_id=cid, netns=netns, ifname=ifname,
                           cni_args=args, cni_path=sb.cni_path(), prefix=prefix, timeout=60)
        out = call.stdout.decode(errors="replace")
        assert "Traceback" not in out, out
        if call.rc == 0:
            calls["ok"] += 1
            if out.strip():
                assert isinstance(json.loads(out), dict)
        else:
            doc = json.loads(out)
            assert isinstance(doc.get("code"), int) and isinstance(doc.get("msg"), str), doc
            assert isinstance(doc.get("cniVersion"), str), doc
        if command == "ADD" and call.rc == 0:
            # As a runtime would on removal of the pod.
            done = exec_plugin(plugin, "DEL", conf, container_id=cid, netns=netns,
                               ifname=ifname, cni_path=sb.cni_path(), prefix=prefix)
            assert done.rc == 0, done.stdout

    one()
    assert pid_alive(sb.node("n1").pid), "the agent died"
    assert sb.status("n1").ready
    from pathlib import Path

    allocations = list((sb.node_dir("n1") / "run" / "ipam" / "ip").iterdir())
    assert allocations == [], allocations
    ports = sb.run_in(sb.node("n1").netns, "ip", "-o", "link", "show", "master", "cni0")
    assert ports.stdout.decode().strip() == ""
    pod_links = sb.run_in(sb.node("n1").netns.replace("-n1", "-fuzz"), "ip", "-o", "link")
    assert [line.split(":")[1].strip() for line in pod_links.stdout.decode().splitlines()] == ["lo"]
    log = Path(sb.node("n1").log).read_text()
    assert "failed unexpectedly" not in log, "the agent hit an internal error"
    print(f"\nSCENARIO | bad input | {calls['n']} hostile CNI calls (env, JSON, names, "
          f"sizes) | {calls['ok']} accepted, the rest well-formed errors; agent alive; "
          "0 leaked allocations, 0 leaked veths")
