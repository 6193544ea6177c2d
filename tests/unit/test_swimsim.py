"""The membership simulator (bench/swimsim.py): deterministic, and it measures what
it says on small clusters where the answer is known."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import swimsim
from swimsim import MEMBERLIST, OURS, Scenario, simulate


def small(seed: int = 1, **kw: float) -> Scenario:
    args = {"seconds": 25.0, "loss": 0.05, "stalls_per_hour": 60.0, "crash_every": 10.0,
            "warmup": 3.0, **kw}
    return Scenario(20, seed=seed, **args)  # type: ignore[arg-type]


def test_the_same_seed_gives_the_same_figures():
    a, b = simulate(small(), OURS), simulate(small(), OURS)
    a.pop("cpu_s"), b.pop("cpu_s")
    assert a == b
    c = simulate(small(seed=2), OURS)
    c.pop("cpu_s")
    assert c != a


def test_crashes_are_seen_by_every_member_and_live_ones_are_not_declared_dead():
    r = simulate(small(), OURS)
    assert r["crashes"] == 2 and r["undetected_views"] == 0
    assert len(r["detect_all_s"]) == 2
    assert 0.5 < r["detect_p50_s"] <= r["detect_p99_s"] <= r["detect_all_max_s"] < 6
    assert r["false_dead_views"] == 0
    assert r["msgs_per_member_s"] > 2 / OURS.probe_interval  # a probe and its ack per round


def test_memberlist_lan_defaults_detect_later_with_fewer_probes():
    ours, ml = simulate(small(loss=0.0), OURS), simulate(small(loss=0.0), MEMBERLIST)
    # suspicion 4 * log10(20) s without confirmations, after 1 s probe rounds
    assert ml["detect_p50_s"] > 4 * 1.3 > ours["detect_p50_s"]
    assert ml["msgs_by_kind_per_member_s"]["probe"] < ours["msgs_by_kind_per_member_s"]["probe"]


def test_sizes_of_messages_follow_the_protobuf_encoding():
    from overlay.membership.swim import State, Update
    from overlay.membership.wire import update_pb

    u = Update(swimsim.record(1234), State.SUSPECT, 1_796_086_707_863, "m77")
    msg = update_pb(u)
    assert msg.HasField("signed") and len(msg.signed.signature) == 64  # sized as signed
    assert swimsim.update_size(u) == msg.ByteSize() + 3
    assert 160 < swimsim.update_size(u) < 256
    # memberlist's (the reference) carry the record itself, unsigned
    assert 100 < swimsim.update_size(u, signed=False) < 128
