"""sd_notify, JSON logs, the health/metrics HTTP server and the lease counters."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
import tempfile

import pytest
from test_lease import FakeStore, mgr

from overlay import metrics
from overlay.agent import sdnotify
from overlay.agent.http import HttpServer, json_route, metrics_route, split_hostport
from overlay.errors import ConfigError
from overlay.log import JsonFormatter, change_fields

# --- sd_notify ------------------------------------------------------------------


def _receiver(addr: str | bytes) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(addr)
    s.settimeout(2)
    return s


def test_notify_reaches_a_socket_path():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "notify")
        with _receiver(path) as rx:
            n = sdnotify.Notifier({"NOTIFY_SOCKET": path})
            assert n.ready("ready: node n1")
            msg = rx.recv(4096).decode()
    lines = msg.split("\n")
    assert lines[0] == "READY=1"
    assert "STATUS=ready: node n1" in lines
    assert f"MAINPID={os.getpid()}" in lines


def test_notify_reaches_an_abstract_socket():
    name = f"overlay-test-{os.getpid()}-{id(object())}"
    with _receiver(b"\0" + name.encode()) as rx:
        n = sdnotify.Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.stopping("stopping on SIGTERM")
        assert rx.recv(4096) == b"STOPPING=1\nSTATUS=stopping on SIGTERM"


def test_notify_without_systemd_does_nothing_and_a_dead_socket_is_not_fatal(caplog):
    assert not sdnotify.Notifier({}).status("x")
    with tempfile.TemporaryDirectory() as d:
        n = sdnotify.Notifier({"NOTIFY_SOCKET": os.path.join(d, "gone")})
        with caplog.at_level(logging.WARNING):
            assert not n.status("a")
            assert not n.status("b")
    assert caplog.text.count("cannot notify systemd") == 1


def test_status_values_stay_on_one_line():
    assert sdnotify.message(status="a\nb") == b"STATUS=a b"
    assert sdnotify.address("relative") is None


# --- logs -----------------------------------------------------------------------


def _json_line(logger: logging.Logger, *args: object, **kw: object) -> dict[str, object]:
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    h.setFormatter(JsonFormatter())
    logger.addHandler(h)
    logger.propagate = False
    try:
        logger.info(*args, **kw)  # type: ignore[arg-type]
    finally:
        logger.removeHandler(h)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_json_log_line_carries_the_change_as_fields():
    lg = logging.getLogger("test.json.change")
    lg.setLevel(logging.INFO)
    doc = _json_line(lg, "%s (%s)", "add fdb 02:00:00:00:00:01 dst 172.30.1.12", "peer n2",
                     extra=change_fields("fdb", "add", "peer n2", entry="fdb x"))
    assert doc["msg"] == "add fdb 02:00:00:00:00:01 dst 172.30.1.12 (peer n2)"
    assert (doc["event"], doc["kind"], doc["action"], doc["why"], doc["entry"]) == (
        "kernel-change", "fdb", "add", "peer n2", "fdb x")
    assert doc["level"] == "info" and doc["logger"] == "test.json.change"
    assert str(doc["ts"]).endswith("Z")


def test_json_log_line_without_extras_has_only_the_base_keys():
    lg = logging.getLogger("test.json.plain")
    lg.setLevel(logging.INFO)
    doc = _json_line(lg, "hello %d", 3)
    assert set(doc) == {"ts", "level", "logger", "msg"} and doc["msg"] == "hello 3"


# --- HTTP -----------------------------------------------------------------------


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await w.drain()
    data = await r.read()
    w.close()
    await w.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_http_routes_status_codes_and_prometheus_text():
    ready = {"ok": False}

    async def go() -> None:
        srv = HttpServer({
            "/healthz": json_route(lambda: (True, {"status": "alive"})),
            "/readyz": json_route(lambda: (ready["ok"], {"ready": ready["ok"]})),
            "/metrics": metrics_route,
        })
        await srv.start("127.0.0.1", 0)
        assert srv._server is not None
        port = srv._server.sockets[0].getsockname()[1]
        try:
            code, _, body = await _get(port, "/healthz")
            assert code == 200 and json.loads(body) == {"status": "alive"}
            code, _, body = await _get(port, "/readyz")
            assert code == 503 and json.loads(body) == {"ready": False}
            ready["ok"] = True
            assert (await _get(port, "/readyz?verbose"))[0] == 200
            metrics.LEASE_ACQUISITIONS.inc()
            code, headers, body = await _get(port, "/metrics")
            assert code == 200 and headers["Content-Type"].startswith("text/plain")
            assert b"overlay_lease_acquisitions_total " in body
            code, headers, body = await _get(port, "/metrics", "HEAD")
            assert code == 200 and body == b"" and int(headers["Content-Length"]) > 0
            assert (await _get(port, "/nope"))[0] == 404
            assert (await _get(port, "/healthz", "POST"))[0] == 405
        finally:
            await srv.close()

    asyncio.run(go())


@pytest.mark.parametrize("addr, want", [("127.0.0.1:9181", ("127.0.0.1", 9181)),
                                        (":9182", ("0.0.0.0", 9182)),
                                        ("[::1]:80", ("::1", 80))])
def test_split_hostport(addr, want):
    assert split_hostport(addr, "--health-addr") == want


@pytest.mark.parametrize("addr", ["9181", "host:", "host:70000", "host:x"])
def test_split_hostport_rejects(addr):
    with pytest.raises(ConfigError, match="--metrics-addr"):
        split_hostport(addr, "--metrics-addr")


# --- lease counters -----------------------------------------------------------


def _renewals(result: str) -> float:
    return metrics.REGISTRY.get_sample_value("overlay_lease_renewals_total",
                                             {"result": result}) or 0.0


def test_lease_renewals_and_failures_are_counted():
    store = FakeStore()
    m = mgr(store)
    ok0, err0 = _renewals("ok"), _renewals("error")

    async def go() -> None:
        await m.acquire()
        m.ttl = 4  # renew every second while healthy
        store.down = True
        task = asyncio.create_task(m.keep_alive())
        await asyncio.sleep(1.3)
        assert _renewals("error") > err0 and _renewals("ok") == ok0
        store.down = False
        await asyncio.sleep(1.3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(go())
    assert _renewals("ok") > ok0


# --- reconciler counters and change log lines ------------------------------------


def _sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_reconcile_passes_repairs_and_netlink_errors_are_counted(caplog):
    from test_reconciler import SPECS, rec

    from overlay.dataplane.desired import Entries, Neigh
    from overlay.dataplane.fake import FakeKernel
    from overlay.dataplane.reconciler import Reconciler
    from overlay.errors import OverlayError

    peers = [rec("n2", 2, 2)]
    k = FakeKernel()
    r = Reconciler(k, lambda: peers)
    r.set_specs(SPECS)
    ok0 = _sample("overlay_reconcile_passes_total", result="ok")
    assert asyncio.run(r.reconcile_once()).ok
    assert _sample("overlay_reconcile_passes_total", result="ok") == ok0 + 1

    # An entry removed behind the agent's back: one repair, one change line.
    vx = k.links["overlay.1"].index
    fdb = next(iter(k.entries[vx].fdbs))
    k.entries[vx] = Entries(k.entries[vx].routes, k.entries[vx].neighs, frozenset())
    rep0 = _sample("overlay_repairs_total", kind="fdb")
    with caplog.at_level(logging.INFO, logger="overlay.dataplane.reconciler"):
        assert asyncio.run(r.reconcile_once()).ok
    assert _sample("overlay_repairs_total", kind="fdb") == rep0 + 1
    lines = [x for x in caplog.records if getattr(x, "event", "") == "kernel-change"]
    assert len(lines) == 1
    fields = lines[0].__dict__
    assert (fields["kind"], fields["action"]) == ("fdb", "add")
    assert str(fdb) in lines[0].getMessage() and "repair" in fields["why"]

    # A failing entry op and a failing device op are netlink errors.
    peers.append(rec("n3", 3, 3))
    k.fail_always.add(f"add {Neigh(peers[1].subnet.network_address, peers[1].vtep_mac)}")
    nl0 = _sample("overlay_netlink_errors_total", kind="neigh")
    part0 = _sample("overlay_reconcile_passes_total", result="partial")
    assert not asyncio.run(r.reconcile_once()).ok
    assert _sample("overlay_netlink_errors_total", kind="neigh") == nl0 + 1
    assert _sample("overlay_reconcile_passes_total", result="partial") == part0 + 1
    k.fail_always.clear()
    del k.links["cni0"]
    k.fail_next["device"] = 1
    dev0 = _sample("overlay_netlink_errors_total", kind="device")
    err0 = _sample("overlay_reconcile_passes_total", result="error")
    with pytest.raises(OverlayError):
        asyncio.run(r.reconcile_once())
    assert _sample("overlay_netlink_errors_total", kind="device") == dev0 + 1
    assert _sample("overlay_reconcile_passes_total", result="error") == err0 + 1


def test_http_port_in_use_is_a_config_error_naming_the_flag():
    async def go() -> None:
        a = HttpServer({})
        await a.start("127.0.0.1", 0)
        assert a._server is not None
        port = a._server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(ConfigError, match=rf"--health-addr: cannot listen on "
                               rf"127.0.0.1:{port}: Address already in use"):
                await HttpServer({}).start("127.0.0.1", port, "--health-addr")
        finally:
            await a.close()

    asyncio.run(go())


def test_a_failing_route_is_a_500_not_a_dropped_connection(caplog):
    def broken() -> tuple[int, str, bytes]:
        raise RuntimeError("boom")

    async def go() -> int:
        srv = HttpServer({"/metrics": broken})
        await srv.start("127.0.0.1", 0)
        assert srv._server is not None
        try:
            return (await _get(srv._server.sockets[0].getsockname()[1], "/metrics"))[0]
        finally:
            await srv.close()

    with caplog.at_level(logging.ERROR):
        assert asyncio.run(go()) == 500
    assert "serving /metrics failed" in caplog.text
