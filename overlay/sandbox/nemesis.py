"""Runs a chaos plan on a sandbox and proves it heals (`overlayctl sandbox chaos`).

For each round of the plan (overlay/sandbox/chaos.py): inject its faults at
their offsets, undo each when its time is up, then poll the invariants
(overlay/sandbox/invariants.py, observed without the agent) until they all
hold, ping matrix included, or the heal bound passes. A round that does not
heal ends the run with its violations and their evidence. Every fault still
in effect is undone in a `finally`, on Ctrl-C and SIGTERM too; faults act
only on the sandbox's own namespaces and on processes it started, by PID.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from overlay.sandbox import lab
from overlay.sandbox.chaos import KINDS, NODE_KINDS, Fault, Topology, heal_summary, plan
from overlay.sandbox.invariants import INVARIANTS, Violation, violations
from overlay.sandbox.observe import agent_state, node_view, observe
from overlay.sandbox.sandbox import Sandbox, SandboxError, pid_alive, sh

INVARIANTS_RUN = {**INVARIANTS,
                  "cni": "every ADD and DEL the runtime makes once the faults are undone "
                         "succeeds (pods attached again after a reboot, replaced after churn)"}
POLL_PAUSE = 0.3


def lease_ttl(args: list[str]) -> float:
    """The --lease-ttl the sandbox's agents run with (the agent's default otherwise)."""
    for i, a in enumerate(args):
        if a == "--lease-ttl" and i + 1 < len(args):
            return float(args[i + 1])
        if a.startswith("--lease-ttl="):
            return float(a.split("=", 1)[1])
    return 60.0


@dataclass
class Applied:
    """One fault of the run, as it happened."""

    round: int
    fault: Fault
    injected_at: float = 0.0
    undone_at: float | None = None
    healed_at: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        heal = None if self.healed_at is None or self.undone_at is None else \
            round(self.healed_at - self.undone_at, 2)
        return {"round": self.round, **self.fault.to_json(), "what": self.fault.describe(),
                "injected_at": round(self.injected_at, 2),
                "undone_at": None if self.undone_at is None else round(self.undone_at, 2),
                "healed_at": None if self.healed_at is None else round(self.healed_at, 2),
                "heal_s": heal, "note": "; ".join(self.notes)}


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done (undoing faults must not stop
    half-way); the interruption is raised afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    olds = {s: signal.signal(s, lambda signum, frame: got.append(signum))
            for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, old in olds.items():
            signal.signal(s, old)
    if got:
        raise KeyboardInterrupt(signal.Signals(got[0]).name)


class Nemesis:
    def __init__(self, sb: Sandbox, seed: int, seconds: float, overlap: int = 1,
                 heal_bound: float = 60.0, progress: Callable[[str], None] = lambda m: None,
                 spared: Sequence[str] = ()) -> None:
        st = sb.st
        if not st.nodes:
            raise SandboxError("chaos", "the sandbox has no nodes")
        if st.powered_off:
            raise SandboxError("chaos", f"nodes {', '.join(st.powered_off)} are powered off; "
                               "reboot them first")
        self.sb, self.seed, self.seconds, self.overlap = sb, seed, seconds, overlap
        self.heal_bound, self.progress = heal_bound, progress
        unknown = set(spared) - {h.name for h in (*st.nodes, *st.etcd)}
        if unknown:
            raise SandboxError("chaos", f"cannot spare {', '.join(sorted(unknown))}: no such "
                               "node or etcd member")
        self.topo = Topology(tuple(h.name for h in st.nodes), tuple(h.name for h in st.etcd),
                             lease_ttl(st.agent_args), tuple(spared))
        self.plan = plan(seed, self.topo, overlap, rounds=int(seconds) + 10)
        self.rng = random.Random(seed * 7919 + 1)  # which pod churn replaces, and the like
        self.pods = {n: sum(1 for p in st.pods if p.node == n) for n in self.topo.nodes}
        self.applied: list[Applied] = []
        self.active: list[Applied] = []
        self.rounds: list[dict[str, Any]] = []
        self.violations: list[dict[str, Any]] = []
        self.polls: list[float] = []
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, msg: str) -> None:
        self.progress(f"{self.now():7.1f}s  {msg}")

    # --- the run ---------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.t0 = time.monotonic()
        started = time.time()
        interrupted, stopped = False, ""
        try:
            with sigterm_interrupts():
                self.say(f"checking the invariants before any fault (bound "
                         f"{self.heal_bound:g}s)")
                heal, bad = self.wait_healed(self.now(), 0)
                if bad:
                    stopped = "the invariants did not hold before any fault"
                else:
                    self.say(f"the cluster is whole ({heal:.2f}s); {self.seconds:g}s of chaos, "
                             f"seed {self.seed}, up to {self.overlap} faults at once")
                    for i, faults in enumerate(self.plan, 1):
                        if self.now() >= self.seconds:
                            break
                        if not self.round(i, faults):
                            stopped = f"round {i} did not heal within {self.heal_bound:g}s"
                            break
        except KeyboardInterrupt:
            interrupted = True
            self.say("interrupted: undoing every fault in effect")
        finally:
            with shielded():
                self.undo_all()
        return self.report(started, interrupted, stopped)

    def round(self, index: int, faults: tuple[Fault, ...]) -> bool:
        events: list[tuple[float, int, str, Fault]] = []
        for f in faults:
            events.append((f.start, 0, "inject", f))
            if f.kind == "pod-churn":
                n = int(f.param)
                events += [(f.start + f.seconds * k / n, 1, "churn", f) for k in range(1, n)]
            if f.seconds > 0:
                events.append((f.start + f.seconds, 2, "undo", f))
        events.sort(key=lambda e: (e[0], e[1]))
        t_round = time.monotonic()
        mine: dict[Fault, Applied] = {}
        for at, _, action, f in events:
            time.sleep(max(0.0, t_round + at - time.monotonic()))
            if action == "inject":
                mine[f] = self.inject(index, f)
            elif action == "churn":
                self.churn_once(mine[f])
            else:
                self.undo(mine[f])
        last = max(a.undone_at or a.injected_at for a in mine.values())
        heal, bad = self.wait_healed(last, index)
        for a in mine.values():
            a.healed_at = None if heal is None else last + heal
        self.rounds.append({"index": index, "faults": [f.describe() for f in faults],
                            "last_undo_at": round(last, 2),
                            "heal_s": None if heal is None else round(heal, 2)})
        if heal is not None:
            self.say(f"round {index} healed {heal:.2f}s after its last undo")
        return not bad and heal is not None and not any(
            v["round"] == index for v in self.violations)

    def wait_healed(self, since: float, index: int) -> tuple[float | None, list[Violation]]:
        """Seconds from `since` until every invariant held, or (None, what failed last)."""
        deadline = since + self.heal_bound
        bad: list[Violation] = []
        families = self.sb.st.pod_families
        while True:
            t = time.monotonic()
            bad = violations(observe(self.sb, probe=False), families)
            if not bad:
                bad = violations(observe(self.sb, probe=True), families)
            self.polls.append(time.monotonic() - t)
            if not bad:
                return max(0.0, self.now() - since), []
            if self.now() > deadline:
                for v in bad:
                    self.violation(index, v)
                return None, bad
            time.sleep(POLL_PAUSE)

    def violation(self, index: int, v: Violation) -> None:
        self.violations.append({"round": index, "at": round(self.now(), 2), **v.to_json()})
        self.say(f"VIOLATION round {index}: {v.invariant} ({v.subject}): {v.message}")

    # --- faults ----------------------------------------------------------------------

    def inject(self, index: int, f: Fault) -> Applied:
        a = Applied(index, f, self.now())
        self.applied.append(a)
        if f.seconds > 0:
            self.active.append(a)  # before acting: an interruption mid-way still undoes it
        self.say(f"round {index}: {f.describe()}")
        sb, node = self.sb, f.target
        try:
            if f.kind in ("agent-kill", "agent-term"):
                pid = lab.kill_agent(sb, node, signal.SIGKILL if f.kind == "agent-kill"
                                     else signal.SIGTERM)
                a.notes.append(f"pid {pid}")
            elif f.kind == "agent-stop":
                a.notes.append(f"pid {lab.pause_agent(sb, node)}")
            elif f.kind == "node-reboot":
                lab.power_off(sb, node)
            elif f.kind == "partition":
                lab.partition(sb, node)
            elif f.kind == "loss":
                lab.set_loss(sb, int(f.param.rstrip("%")))
            elif f.kind == "bandwidth":
                lab.limit(sb, node, f.param)
            elif f.kind in ("etcd-member", "etcd-quorum"):
                for m in f.target.split(","):
                    lab.etcd_kill(sb, m)
            elif f.kind == "pod-churn":
                self.churn_once(a)
            elif f.kind == "kernel-entries":
                a.notes.append(self.delete_entries(node, f.param))
            elif f.kind == "device-delete":
                dev = sb.vxlan_device if f.param == "vxlan" else "cni0"
                sh("ip", "-n", sb.node(node).netns, "link", "del", dev, check=False)
                a.notes.append(dev)
            else:
                raise AssertionError(f.kind)
        except SandboxError as exc:
            a.notes.append(f"could not inject: {exc}")
            self.say(f"  could not inject: {exc}")
        if f.seconds == 0:
            a.undone_at = a.injected_at
        return a

    def undo(self, a: Applied) -> None:
        f, sb, node = a.fault, self.sb, a.fault.target
        self.say(f"round {a.round}: undo {f.kind} {f.target}")
        a.undone_at = self.now()
        if a in self.active:
            self.active.remove(a)
        try:
            # Each undo checks the state first: an interruption may have come mid-inject.
            state = agent_state(sb, node) if f.kind in NODE_KINDS else ""
            if f.kind in ("agent-kill", "agent-term") or (
                    f.kind == "node-reboot" and state == "not running"):
                if state == "not running":
                    lab.start_agent(sb, node, wait=None)
            elif f.kind == "agent-stop":
                if state == "stopped":
                    lab.pause_agent(sb, node, pause=False)
            elif f.kind == "node-reboot":
                if state == "powered off":
                    lab.power_on(sb, node, wait=self.heal_bound)
            elif f.kind == "partition":
                lab.partition(sb, node, on=False)
            elif f.kind == "loss":
                lab.set_loss(sb, 0)
            elif f.kind == "bandwidth":
                sb.unlimit_bandwidth(node)
            elif f.kind in ("etcd-member", "etcd-quorum"):
                for m in f.target.split(","):
                    if pid_alive(sb.etcd_host(m).pid):
                        continue
                    lab.etcd_restart(sb, m, wait=False)
            elif f.kind == "pod-churn":
                self.top_up(a)
        except SandboxError as exc:
            a.notes.append(f"undo failed: {exc}")
            kind = "cni" if f.kind in ("pod-churn", "node-reboot") and "pod" in exc.step \
                else "agents"
            self.violation(a.round, Violation(kind, node, f"undoing {f.describe()} failed: "
                                              f"{exc.message}", {"log": exc.log[-2000:]}))

    def undo_all(self) -> None:
        for a in reversed(list(self.active)):
            try:
                self.undo(a)
            except Exception as exc:  # the others must still be undone
                self.say(f"undo of {a.fault.describe()} failed: {exc}")

    # --- pod churn, as a runtime does it ---------------------------------------------

    def churn_once(self, a: Applied) -> None:
        node = a.fault.target
        pods = sorted(p.name for p in self.sb.st.pods if p.node == node)
        if pods:
            victim = self.rng.choice(pods)
            try:
                lab.del_pod(self.sb, victim)
                a.notes.append(f"del {victim}")
            except SandboxError as exc:
                a.notes.append(f"DEL {victim} failed: {exc.message[:120]}")
        try:
            a.notes.append(f"add {lab.add_pod(self.sb, node).name}")
        except SandboxError as exc:
            a.notes.append(f"ADD failed (DEL done): {exc.message[:120]}")

    def top_up(self, a: Applied) -> None:
        """The node gets back the number of pods it had (a runtime retries failed ADDs)."""
        node = a.fault.target
        deadline = time.monotonic() + self.heal_bound
        while True:
            have = sum(1 for p in self.sb.st.pods if p.node == node)
            if have >= self.pods[node]:
                return
            try:
                a.notes.append(f"add {lab.add_pod(self.sb, node).name}")
            except SandboxError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    # --- kernel entries deleted by hand ----------------------------------------------

    def delete_entries(self, node: str, which: str) -> str:
        sb = self.sb
        h = sb.node(node)
        view = node_view(sb, h)
        dev = sb.vxlan_device
        cmds = []
        if which in ("fdb", "all"):
            cmds += [f"bridge fdb del {mac} dev {dev} dst {dst}" for mac, dst in view.fdb]
        if which in ("neigh", "all"):
            cmds += [f"ip neigh del {ip} dev {dev}" for ip, _ in view.neighs]
        if which in ("route", "all"):
            cmds += [f"ip route del {dst} dev {dev}" for dst in view.routes]
        if cmds:
            sb.run_in(h.netns, "sh", "-c", "; ".join(cmds), check=False)
        return f"{len(cmds)} entries"

    # --- the report --------------------------------------------------------------------

    def report(self, started: float, interrupted: bool, stopped: str) -> dict[str, Any]:
        st = self.sb.st
        heals = [r["heal_s"] for r in self.rounds if r["heal_s"] is not None]
        faults = [a.to_json() for a in self.applied]
        worst = max(self.rounds, key=lambda r: r["heal_s"] or 0, default=None)
        return {
            "tool": "overlayctl sandbox chaos", "sandbox": st.name, "seed": self.seed,
            "seconds": self.seconds, "overlap": self.overlap, "heal_bound_s": self.heal_bound,
            "lease_ttl_s": self.topo.lease_ttl,
            "topology": {"nodes": list(self.topo.nodes), "etcd": list(self.topo.etcd),
                         "pods": len(st.pods), "spared": list(self.topo.spared)},
            "started_unix": round(started, 3), "duration_s": round(self.now(), 1),
            "interrupted": interrupted, "stopped": stopped,
            "rounds": self.rounds, "faults": faults, "violations": self.violations,
            "heal": {**heal_summary(heals), "worst_round": worst},
            "poll_s": heal_summary(self.polls),
            "kinds_seen": sorted({a.fault.kind for a in self.applied}),
            "invariants": INVARIANTS_RUN, "kinds": KINDS,
            "result": "interrupted" if interrupted else
            "pass" if not self.violations and not stopped else "fail",
        }
