"""Pure parts of the benchmark scripts: parsers, batch files, statistics, the scale model."""

import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import common
import dataplane
import fakepeers
import footprint
import peer_programming
import report
import scale_model
import soak

from overlay.dataplane.desired import Entries, Fdb, Neigh, Op, Route, desired, plan
from overlay.model import NodeRecord


def test_fake_peers_are_valid_distinct_records_inside_the_bench_cluster():
    recs = fakepeers.fake_records(5000)
    assert len({r.subnet for r in recs}) == len({r.vtep_mac for r in recs}) == 5000
    assert len({r.underlay_ip for r in recs}) == 5000
    assert all(r.subnet.subnet_of(IPv4Network(fakepeers.CIDR)) for r in recs)
    assert all(NodeRecord.from_json(r.to_json()) == r for r in recs[::97])
    with pytest.raises(ValueError):
        fakepeers.fake_record(0)


def test_batch_lines_are_the_same_entries_in_the_same_order_for_ip_and_bridge():
    ops = plan(desired(fakepeers.fake_records(2), "me"), Entries())
    ip_lines, br_lines = peer_programming.batch_lines(ops, "overlay.1")
    r1 = fakepeers.fake_record(1)
    assert br_lines[0] == (f"fdb append {r1.vtep_mac} dev overlay.1 dst {r1.underlay_ip} "
                           "self permanent")
    assert ip_lines[0] == (f"neigh replace {r1.vtep_ip} lladdr {r1.vtep_mac} dev overlay.1 "
                           "nud permanent")
    assert ip_lines[2] == (f"route replace {r1.subnet} via {r1.vtep_ip} dev overlay.1 onlink "
                           "proto 159")
    assert len(br_lines) == 2 and len(ip_lines) == 4
    dels = [Op("del", Route(IPv4Network("10.1.0.0/24"), IPv4Address("10.1.0.0"))),
            Op("del", Neigh(IPv4Address("10.1.0.0"), "02:00:00:00:00:01")),
            Op("del", Fdb("02:00:00:00:00:01", IPv4Address("172.30.1.5")))]
    ip_lines, br_lines = peer_programming.batch_lines(dels, "overlay.1")
    assert ip_lines == ["route del 10.1.0.0/24 dev overlay.1 proto 159",
                        "neigh del 10.1.0.0 dev overlay.1"]
    assert br_lines == ["fdb del 02:00:00:00:00:01 dev overlay.1 dst 172.30.1.5 self permanent"]


PING = """PING 10.244.1.2 (10.244.1.2) 56(84) bytes of data.
64 bytes from 10.244.1.2: icmp_seq=1 ttl=62 time=0.105 ms
64 bytes from 10.244.1.2: icmp_seq=2 ttl=62 time=0.087 ms
64 bytes from 10.244.1.2: icmp_seq=3 ttl=62 time=1.20 ms

--- 10.244.1.2 ping statistics ---
3 packets transmitted, 3 received, 0% packet loss, time 20ms
rtt min/avg/max/mdev = 0.087/0.464/1.200/0.520 ms
"""


def test_ping_parser_takes_every_reply_and_not_the_summary():
    assert dataplane.parse_ping(PING) == [0.105, 0.087, 1.2]


def test_iperf_parser_reads_the_received_rate():
    doc = {"end": {"sum_received": {"bits_per_second": 12.5e9},
                   "sum_sent": {"bits_per_second": 12.6e9, "retransmits": 7},
                   "cpu_utilization_percent": {"host_total": 80.0, "remote_total": 60.0}}}
    r = dataplane.parse_iperf(doc)
    assert r == {"gbps": 12.5, "sent_gbps": 12.6, "retransmits": 7.0, "sender_cpu_pct": 80.0,
                 "receiver_cpu_pct": 60.0}


def test_device_differences_name_the_role_and_both_values():
    ours = {"pod eth0": {"mtu": 1450, "qdisc": "noqueue"}, "vxlan device": {"vxlan_udp_csum": 1}}
    ref = {"pod eth0": {"mtu": 1400, "qdisc": "noqueue"}, "vxlan device": {}}
    assert dataplane.differences(ours, ref) == [
        "pod eth0: mtu = 1450 (ours) vs 1400 (reference)",
        "vxlan device: vxlan_udp_csum = 1 (ours) vs None (reference)",
    ]
    assert dataplane.differences(ours, ours) == []


class _RefSandbox:
    """Enough of a Sandbox for dataplane.build_reference; its commands recorded."""

    def __init__(self, calls: list[tuple[str, ...]]) -> None:
        self.calls = calls

    def add_outside_host(self, name: str) -> object:
        return type("Host", (), {"netns": f"x-{name}", "underlay_ip": f"172.30.9.{name[-1]}"})

    def ns(self, name: str) -> str:
        return f"x-{name}"

    def run_in(self, ns: str, *cmd: str, **_kw: object) -> None:
        self.calls.append((ns, *cmd))


@pytest.mark.parametrize(("fam", "want"), [
    ("REF4", ["ip -n x-r1 addr add 10.250.1.0/32 dev flannel.1",
              "ip -n x-r1 addr add 10.250.1.1/24 dev cni0",
              "ip -n x-r1-p1 addr add 10.250.1.2/24 dev eth0",
              "ip -n x-r1-p1 route add default via 10.250.1.1",
              "x-r1 sysctl -qw net.ipv4.ip_forward=1",
              "ip -n x-r1 route add 10.250.2.0/24 via 10.250.2.0 dev flannel.1 onlink",
              "ip -n x-r1 neigh add 10.250.2.0 lladdr 02:bb:00:00:00:02 dev flannel.1 nud "
              "permanent"]),
    ("REF6", ["ip -n x-r1 addr add fd50:0:0:1::/128 dev flannel.1 nodad",
              "ip -n x-r1 addr add fd50:0:0:1::1/64 dev cni0 nodad",
              "ip -n x-r1-p1 addr add fd50:0:0:1::2/64 dev eth0 nodad",
              "ip -n x-r1-p1 -6 route add default via fd50:0:0:1::1",
              "x-r1 sysctl -qw net.ipv6.conf.all.forwarding=1",
              "ip -n x-r1 -6 route add fd50:0:0:2::/64 via fd50:0:0:2:: dev flannel.1 onlink",
              "ip -n x-r1 -6 neigh add fd50:0:0:2:: lladdr 02:bb:00:00:00:02 dev flannel.1 nud "
              "permanent"]),
])
def test_the_reference_overlay_is_flannels_layout_in_each_family(monkeypatch, fam, want):
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(dataplane, "sh", lambda *a, **_kw: calls.append(a))
    info = dataplane.build_reference(_RefSandbox(calls), 1450, getattr(dataplane, fam))
    lines = [" ".join(c) for c in calls]
    for line in want:
        assert line in lines, (line, lines)
    assert "bridge -n x-r1 fdb append 02:bb:00:00:00:02 dev flannel.1 dst 172.30.9.2 self " \
        "permanent" in lines
    assert info["r2"]["pod_ip"] == {"REF4": "10.250.2.2", "REF6": "fd50:0:0:2::2"}[fam]


def test_prometheus_parser_sums_matching_label_sets():
    text = """# HELP x
etcd_network_client_grpc_received_bytes_total 1200
grpc_server_msg_received_total{grpc_method="LeaseKeepAlive",grpc_service="etcdserverpb.Lease"} 4
grpc_server_msg_received_total{grpc_method="Range",grpc_service="etcdserverpb.KV"} 10
grpc_server_msg_received_total{grpc_method="Range",grpc_service="other"} 5
etcd_server_proposals_committed_total 9
"""
    m = footprint.parse_prometheus(text)
    assert m["client_rx_bytes"] == 1200 and m["keepalives"] == 4
    assert m["range_requests"] == 15 and m["proposals_committed"] == 9 and m["puts"] == 0


def test_summary_and_nearest_rank_percentile():
    s = common.summary([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)
    assert common.percentile(list(range(1, 101)), 95) == 95
    assert common.percentile([5.0], 95) == 5.0
    assert common.summary([]) == {"n": 0}
    assert common.ratio(1.0, 0) is None and common.ratio(1.0, 4.0) == 0.25


def test_fit_line_and_flat_costs():
    assert scale_model.fit_line(((10, 1.0), (5000, 500.0))) == pytest.approx((0.0, 0.1), abs=0.02)
    # 154 and 150 B/s at 3 and 10 nodes: one constant cost, not a falling line.
    assert scale_model.at(((3, 154.0), (10, 150.0)), 5000) == pytest.approx(152.0)
    assert scale_model.at(((10, 0.004), (5000, 0.16)), 1000) == pytest.approx(
        0.004 + (0.156 / 4990) * 990)
    assert scale_model.at((), 100) == 0.0


def test_scale_model_arithmetic():
    inp = scale_model.Inputs(
        etcd_bytes_per_node_s=((3, 150.0), (10, 150.0)),
        gossip_bytes_per_node_s=((3, 0.0), (10, 0.0)),
        agent_cpu_idle=((10, 0.01), (5000, 0.2)),
        agent_rss_bytes=((10, 50e6), (5000, 80e6)),
        noop_pass_s=(5000, 0.2),
        first_pass_s=(5000, 1.0),
        record_bytes=200,
    )
    asm = scale_model.Assumptions(restarts_per_node_per_day=24.0)
    m = scale_model.model(inp, asm, 1000)
    e, p = m["etcd"], m["per_node"]
    assert e["keys"] == 1001 and e["leases"] == 1000
    assert e["keepalive_requests_per_s"] == pytest.approx(1000 / 15)
    assert e["writes_per_s"] == pytest.approx(1000 * 24 / 86400 * 2)
    assert e["watch_events_delivered_per_s"] == pytest.approx(1000 * 24 / 86400 * 1000)
    assert e["relist_all_nodes_bytes"] == 1000 * 1000 * 200
    assert e["idle_client_bytes_per_s"] == pytest.approx(150_000)
    assert p["kernel_entries"] == 2997
    assert p["noop_reconcile_s"] == pytest.approx(0.2 / 5000 * 999)
    assert p["gossip_bytes_per_s"] is None and m["cluster"]["gossip_bytes_per_s"] is None


def test_report_headline_shows_every_target_and_whether_it_is_met():
    docs = {
        "dataplane": {"targets": [{"id": "a", "what": "throughput", "ratio": 0.9, "op": ">=",
                                   "threshold": 0.97, "met": False}]},
        "cni_latency": {"targets": [{"what": "ADD median", "ratio": 1.5, "op": "<=",
                                     "threshold": 2.0, "met": True}],
                        "add_ms": {"median": 12.0}},
    }
    text = report.render(docs, {})
    assert "| throughput | ≥ 0.97 | 0.9 | **not met** |" in text
    assert "| ADD median | ≤ 2.0 | 1.5 | **met** |" in text
    assert "`add_ms.median`" in text  # figures of other scripts are listed
    assert "## 2. Peer programming\n\n_Not run._" in text


def test_cni_results_of_the_cni_script_join_the_headline_and_get_their_table():
    lat = {"ADD": {"overlay": {"median": 22.5, "p95": 59.1}, "reference": {"median": 16.8,
                                                                          "p95": 45.1},
                   "ratio_median": 1.339, "ratio_p95": 1.311, "target_ratio_max": 2.0,
                   "met": True},
           "DEL": {"overlay": {"median": 12.0, "p95": 20.0}, "reference": {"median": 10.0,
                                                                          "p95": 15.0},
                   "ratio_median": 1.2, "ratio_p95": 1.33, "target_ratio_max": 1.0,
                   "met": False},
           "VERSION": {"overlay": {"median": 9.0, "p95": 9.5}, "reference": {"median": 3.0,
                                                                            "p95": 3.2},
                       "ratio_median": 3.0, "ratio_p95": 2.97}}
    doc = {"benchmark": "cni", "latency_ms": lat,
           "throughput": {"overlay": {"pods": 100, "parallel": 4, "add_pods_per_s": 35.3,
                                      "del_pods_per_s": 50.1},
                          "reference": {"pods": 100, "parallel": 4, "add_pods_per_s": 71.6,
                                        "del_pods_per_s": 69.9},
                          "ratio_add_pods_per_s": 0.493, "ratio_del_pods_per_s": 0.717,
                          "target_ratio_add_min": 1.0, "met": False}}
    text = report.render({"cni": doc}, {})
    assert "| CNI ADD latency vs bridge + host-local (median) | ≤ 2.0 | 1.34 | **met** |" in text
    assert "| CNI DEL latency vs bridge + host-local (median) | ≤ 1.0 | 1.2 | **not met** |" in text
    assert "VERSION latency" not in text  # no target for it
    assert "| ADD | 22.5 | 59.1 | 16.8 | 45.1 | **1.34** | 1.31 |" in text
    assert "ours 35.3 pods/s, reference 71.6 pods/s (ratio 0.493)" in text
    assert "| CNI pod starts per second vs bridge + host-local | ≥ 1.0 | 0.493 | **not met** |" \
        in text


def _dist(median: float) -> dict[str, float]:
    return {"n": 5, "median": median, "min": median - 0.1, "max": median + 0.1}


def test_membership_times_are_targets_as_a_fraction_of_the_time_allowed():
    doc = {"nodes": 10, "timings": {"probe_interval": 0.4},
           "detection": {"all_peers_s": _dist(3.6), "first_peer_s": _dist(1.0), "target_s": 3.0},
           "new_mac_convergence": {"etcd_frozen_s": _dist(1.5), "reference_etcd_up_s": _dist(0.5),
                                   "target_s": 5.0, "ratio_frozen_to_etcd_up": 3.0},
           "traffic": {"payload_bytes_out_per_s_per_node": _dist(345.0),
                       "gossip_wire_bytes_per_s_per_node": 2138.0,
                       "reference_etcd_wire_bytes_per_s_per_node": 207.0,
                       "ratio_gossip_wire_to_etcd_wire": 10.3},
           "loss": {"loss_percent": 20, "seconds": 30.0, "false_dead": {"n3": 1},
                    "suspicion_episodes": 4, "longest_suspicion_s": 0.3}}
    targets = {t["id"]: t for t in report.targets_of({"membership": doc})}
    assert targets["membership.detection"]["ratio"] == pytest.approx(1.2)
    assert not targets["membership.detection"]["met"]
    assert targets["membership.new_mac_convergence"]["ratio"] == pytest.approx(0.3)
    assert targets["membership.new_mac_convergence"]["met"]
    text = report.membership_section(doc)
    assert "3.60 s" in text and "target 3 s" in text
    assert "peers wrongly marked dead | 1 |" in text
    assert "Other results" not in report.render({"membership": doc}, {})


def _scale_run(n, cpu, bad=0):
    return {"nodes": n, "up_s": 5.0, "settled_after_up_s": 0.2, "window_s": 30.0,
            "agent_cpu": {"mean": cpu, "median": cpu, "max": cpu * 1.2},
            "agent_cpu_by_thread": {"asyncio (main thread)": cpu * 0.7, "event_engine": cpu * 0.3},
            "etcd_cpu": 0.004, "machine_busy": 0.3, "non_alive_views_at_end": bad,
            "messages_per_agent_s": {"probe": 2.0, "gossip": 0.0}, "sandbox_timings": {}}


def test_real_agents_at_scale_are_targets_cpu_flatness_views_and_recovery():
    doc = {"runs": {"10": _scale_run(10, 0.008), "50": _scale_run(50, 0.009, bad=2)},
           "target_agent_cpu": 0.01,
           "overload": {"nodes": 50, "hogs": {"hogs": 16, "seconds": 20, "worst_during": {},
                                               "worst_after": {}, "recovered_after_s": 3.0},
                        "stops": {"stop_s": 2, "disturbance_s": 50, "worst_after":
                                  {"alive": 2440, "dead": 10}, "recovered_after_s": None}}}
    t = {x["id"]: x for x in report.targets_of({"scale": doc})}
    assert t["scale.agent_cpu"]["met"] and t["scale.agent_cpu"]["ratio"] == pytest.approx(0.9)
    assert t["scale.flat"]["met"] and t["scale.flat"]["ratio"] == pytest.approx(1.125)
    assert not t["scale.views"]["met"] and t["scale.views"]["ratio"] == 2
    assert t["scale.recovery.hogs"]["met"] and not t["scale.recovery.stops"]["met"]
    text = report.cluster_scale_section(doc, "scale.png")
    assert "| 50 | 5 s | 0.2 s | **0.90%** |" in text and "2440 alive, 10 dead" in text


def test_simulation_targets_detection_false_dead_and_flat_messages():
    def run(n, p99, msgs, fd=0):
        return {"detect_p50_s": 1.0, "detect_p99_s": p99, "detect_all_max_s": p99,
                "false_dead_per_member_hour": 0.0, "false_dead_views": fd,
                "suspicions_per_member_hour": 1.0, "msgs_per_member_s": msgs,
                "bytes_per_member_s": 900.0}
    doc = {"scenarios": {"loss": {"loss": 0.05}, "stalls": {"stalls_per_member_hour": 30},
                         "common": {"crash_every_s": 20}},
           "runs": {"loss": {"ours": {"100": run(100, 2.0, 8.0), "1000": run(1000, 4.0, 9.0),
                                      "10000": run(10000, 5.0, 13.0)},
                             "memberlist": {"100": run(100, 9.0, 4.0, fd=3)}},
                    "stalls": {"ours": {"1000": run(1000, 4.5, 20.0, fd=1)}}}}
    t = {x["id"]: x for x in report.targets_of({"swimsim": doc})}
    assert t["swimsim.detect_1000"]["met"] and t["swimsim.detect_1000"]["ratio"] == 0.8
    assert not t["swimsim.false_dead"]["met"]      # ours only: memberlist's are not ours
    assert t["swimsim.false_dead"]["ratio"] == 1
    assert not t["swimsim.flat"]["met"] and t["swimsim.flat"]["ratio"] == pytest.approx(1.625)
    text = report.swimsim_section(doc, None)
    assert "| 100 | memberlist | 1 | 9 | 9 |" in text and "Scenario 'stalls'" in text


def test_soak_growth_is_fitted_within_incarnations_with_an_interval():
    import random

    rng = random.Random(0)  # fixed: a 95% interval misses zero in 1 of 20 seeds
    # A process restarted twice (new PID, new level) that does not grow: the restarts'
    # steps must not pass for growth, and the interval must hold zero.
    flat = [{"t": t, "host": "n1", "role": "agent", "pid": 100 + t // 600,
             "rss_bytes": 60e6 + (t // 600) * 5e6 + rng.gauss(0, 2e5), "fds": 20}
            for t in range(0, 1800, 5)]
    g = {x["metric"]: x for x in soak.growth(flat, warmup=60)}
    lo, hi = g["rss_bytes"]["ci95"]
    assert lo < 0 < hi and not g["rss_bytes"]["beyond_noise"]
    assert g["rss_bytes"]["incarnations"] == 3 and g["fds"]["per_hour"] == 0
    # A steady 20 MiB/h leak with noise is found, and its interval holds the truth.
    rng = random.Random(0)
    leak = [{"t": t, "host": "etcd1", "role": "etcd", "pid": 7,
             "rss_bytes": 80e6 + t * 20 * 2**20 / 3600 + rng.gauss(0, 3e5), "fds": 30 + t // 900}
            for t in range(0, 1800, 5)]
    g = {x["metric"]: x for x in soak.growth(leak, warmup=60)}
    lo, hi = g["rss_bytes"]["ci95"]
    assert lo < 20 * 2**20 < hi and g["rss_bytes"]["beyond_noise"]
    assert g["fds"]["beyond_noise"] and 3 < g["fds"]["per_hour"] < 5
    assert soak.within_slope([[(0, 1), (1, 2)]]) is None  # too few samples to say
    # The settle window: a climb that flattens after 15 minutes is left out, and the
    # same leak is still found in the 30 minutes after it.
    rng = random.Random(0)
    warm = [{"t": t, "host": "n1", "role": "agent", "pid": 8, "fds": 20,
             "rss_bytes": 75e6 + min(t, 900) * 4e6 / 900 + rng.gauss(0, 2e5)}
            for t in range(0, 2700, 5)]
    assert soak.growth(warm, warmup=120)[0]["beyond_noise"]
    settled = soak.growth(warm, warmup=120, settle=900)[0]
    assert settled["metric"] == "rss_bytes" and settled["beyond_noise"] is False
    long_leak = [{**s, "t": s["t"] + 900} for s in leak]
    g = {x["metric"]: x for x in soak.growth(long_leak, warmup=60, settle=900)}
    lo, hi = g["rss_bytes"]["ci95"]
    assert lo < 20 * 2**20 < hi and g["rss_bytes"]["beyond_noise"]


def test_the_soak_section_names_the_verdicts_and_the_leaking_process():
    leak = [{"t": t, "host": "n1", "role": "agent", "pid": 9,
             "rss_bytes": 60e6 + t * 50 * 2**20 / 3600, "fds": 25} for t in range(0, 1800, 5)]
    doc = {"seconds": 1800, "seed": 16, "overlap": 2, "result": "pass", "faults": 300,
           "rounds": 180, "kinds_seen": ["agent-kill", "loss"], "violations": [],
           "heal": {"median_s": 1.1, "p90_s": 4.2, "max_s": 9.5}, "interval_s": 5,
           "warmup_s": 120, "min_life_s": 300, "spared": ["n1"],
           "floor_per_hour": soak.FLOOR, "growth": soak.growth(leak, 120, 300)}
    text = report.render({"soak": doc}, {})
    assert "## 9. Chaos soak" in text and "**0 violations**" in text
    assert "worst 9.5 s" in text and "30 minutes" in text
    row = next(line for line in text.splitlines() if line.startswith("| n1 (spared) | RSS"))
    assert "+50.00 MiB/h" in row and row.endswith("**yes** |")
    assert "_Not run._" in report.soak_section(None, None)
    doc["trend"] = soak.trend(leak, ["n1", "etcd1"])
    assert doc["trend"]["n1"]["fds"] == [25.0] * 6 and "etcd1" not in doc["trend"]
    rss = doc["trend"]["n1"]["rss_bytes"]
    assert rss == sorted(rss) and len(set(rss)) == 6
    assert "- n1: RSS 59.3, 63.4, 67.6," in report.soak_section(doc, None)
    doc.update(seconds=2700, settle_s=900)
    assert "over the soak's last 30 minutes (the first 15," in report.soak_section(doc, None)
