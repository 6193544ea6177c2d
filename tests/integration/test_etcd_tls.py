"""TLS to etcd with client-certificate auth (issue 5, scenario 8).

The sandbox runs etcd on https with --client-cert-auth and its own CA; every
agent gets a client certificate. An agent without a valid certificate gets
nothing from etcd (no config, no lease) and says why in words.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from conftest import wait_until

from overlay.sandbox.pki import CertificateAuthority


def _strip_etcd_tls(cmd: list[str]) -> list[str]:
    out, skip = [], 0
    for a in cmd:
        if skip:
            skip -= 1
            continue
        if a in ("--etcd-cafile", "--etcd-certfile", "--etcd-keyfile"):
            skip = 1
            continue
        out.append(a)
    return out


def test_etcd_requires_a_client_certificate_from_its_ca(make_sandbox):
    sb = make_sandbox(2, 1, etcd_tls=True)
    assert sb.etcd_endpoints().startswith("https://")
    _, ok, total = sb.check()
    assert ok == total == 2
    leases_before = sb.etcdctl("get", "--prefix", "--keys-only",
                               "/overlay/subnets/").stdout.decode().split()

    h = sb.add_node("n3", wait=False)
    sb.stop_agent("n3")
    ca = str(sb.dir / "pki-etcd" / "ca.crt")
    other = CertificateAuthority(sb.dir / "stranger-ca", "stranger CA").issue("n3")
    strangers = {
        "no client certificate": ["--etcd-cafile", ca],
        "certificate from another CA": ["--etcd-cafile", ca, "--etcd-certfile", str(other.cert),
                                        "--etcd-keyfile", str(other.key)],
    }
    seen = {}
    for label, extra in strangers.items():
        cmd = [*sb.exec_prefix(h.netns), *_strip_etcd_tls(sb.agent_cmd("n3")), *extra]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            def refused() -> bool:
                try:
                    st = sb.status("n3")
                except Exception:
                    return False
                return any("client certificate" in c.message for c in st.conditions)

            wait_until(refused, 20, 0.3)
            assert not sb.status("n3").ready
        finally:
            p.terminate()
            out, _ = p.communicate(timeout=20)
        assert "did not accept our client certificate" in out, out[-1500:]
        assert "Corruption detected" not in out and "TSI_DATA_CORRUPTED" not in out, out
        seen[label] = next(line for line in out.splitlines() if "client certificate" in line)

    # Plain http against the https etcd: refused too, never a lease.
    cmd = _strip_etcd_tls(sb.agent_cmd("n3"))
    at = cmd.index("--etcd-endpoints") + 1
    cmd[at] = cmd[at].replace("https://", "http://")
    cmd = [*sb.exec_prefix(h.netns), *cmd]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(6)
    p.terminate()
    out, _ = p.communicate(timeout=20)
    assert "waiting for the network config" in out, out[-1500:]
    assert " ready: subnet" not in out

    leases_after = sb.etcdctl("get", "--prefix", "--keys-only",
                              "/overlay/subnets/").stdout.decode().split()
    assert leases_after == leases_before, "a stranger got a lease"
    log = Path(sb.st.etcd[0].log).read_text()
    assert "rejected connection" in log or "bad certificate" in log or "tls" in log.lower()
    print("\nSCENARIO | TLS to etcd | etcd on https with --client-cert-auth; agents without "
          "a certificate, with one from another CA, and over plain http | all refused, no "
          "config read and no lease taken; the agent says: "
          + seen["certificate from another CA"].split(": ", 1)[-1][:140])
