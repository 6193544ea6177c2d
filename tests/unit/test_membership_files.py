"""Wire conversion, the state saved for a start without etcd, and TLS file checks."""

import json
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlay.agent import state
from overlay.errors import ConfigError
from overlay.membership import tls
from overlay.membership.signing import NodeKey
from overlay.membership.swim import Record, State, Update
from overlay.membership.wire import claims_from_pb, parse_statement, update_pb
from overlay.model import LeaseEntry, LeaseSnapshot, NetworkConfig, NodeRecord
from overlay.sandbox.pki import CertificateAuthority

REC = NodeRecord("n2", IPv4Network("10.244.2.0/24"), IPv4Address("172.30.1.12"),
                 "02:00:00:00:00:02", "172.30.1.12:7946")
KEY = NodeKey(NodeKey.generate())


def signed(state=State.ALIVE, inc=1234, rev=17, rec=REC):
    r = Record(rec, rev)
    return Record(rec, rev, KEY.sign(r, inc, State.LEFT if state == State.LEFT
                                     else State.ALIVE))


def test_signed_update_carries_only_the_statement_and_the_opinion():
    u = Update(signed(), State.SUSPECT, 1234, "n3")
    m = update_pb(u)
    assert not m.HasField("record") and m.incarnation == 0  # all in the statement
    assert m.state == 2 and m.reporter == "n3"
    [c], bad = claims_from_pb([m])
    assert bad == [] and c.state == State.SUSPECT and c.reporter == "n3"
    assert (c.statement, c.signature) == (u.record.proof.statement, u.record.proof.signature)
    st = parse_statement(c.statement)
    assert (st.record, st.incarnation, st.state) == (Record(REC, 17), 1234, State.ALIVE)


def test_unsigned_update_is_an_opinion_about_a_name():
    m = update_pb(Update(Record(REC, 0), State.DEAD, 0, "n3"))
    [c], _ = claims_from_pb([m])
    assert not c.signed and (c.name, c.incarnation, c.state) == ("n2", 0, State.DEAD)


@pytest.mark.parametrize("field,value", [
    ("name", "bad name!"), ("subnet", "10.244.2.1/24"), ("underlay_ip", "fe80::1"),
    ("underlay_ip", "127.0.0.1"), ("subnet6", "fd00::1/64"), ("subnet6", "10.1.0.0/24"),
    ("vtep_mac", "01:00:5e:00:00:01"), ("grpc_addr", "nohostport"), ("backend", "gre"),
])
def test_invalid_statements_are_refused_with_a_reason(field, value):
    from overlay.v1 import overlay_pb2 as pb

    st = pb.Statement.FromString(signed().proof.statement)
    setattr(st.record, field, value)
    with pytest.raises(ConfigError) as e:
        parse_statement(st.SerializeToString())
    assert e.value.field == field


def test_dual_stack_and_ipv6_records_round_trip_through_signed_statements():
    from ipaddress import IPv6Address, IPv6Network

    from overlay.v1 import overlay_pb2 as pb

    dual = REC.with_(subnet6=IPv6Network("fd00:0:0:2::/64"))
    v6only = REC.with_(subnet=None, subnet6=IPv6Network("fd00:0:0:2::/64"),
                       underlay_ip=IPv6Address("fd30::1:12"), grpc_addr="[fd30::1:12]:7946")
    for rec in (dual, v6only):
        st = parse_statement(signed(rec=rec).proof.statement)
        assert st.record == Record(rec, 17)  # the IPv6 subnet is part of what is signed
    m = pb.Statement.FromString(signed(rec=v6only).proof.statement)
    m.record.subnet6 = ""
    with pytest.raises(ConfigError, match="subnet"):
        parse_statement(m.SerializeToString())


def test_dual_stack_identity_and_peers_are_saved(tmp_path):
    from ipaddress import IPv6Network

    dual = REC.with_(subnet6=IPv6Network("fd00:0:0:2::/64"))
    state.save(tmp_path, state.Identity("n2", "02:00:00:00:00:02", dual.subnet, 7, 8,
                                        dual.subnet6))
    ident = state.load(tmp_path)
    assert ident is not None and ident.subnets == dual.subnets
    snap = LeaseSnapshot(9, {dual.subnet: LeaseEntry(dual, 4, 1)}, [],
                         {dual.subnet6: LeaseEntry(dual, 4, 1)})
    state.save_peers(tmp_path, snap)
    assert state.load_peers(tmp_path) == snap


def test_unknown_state_and_short_signatures_are_dropped():
    m = update_pb(Update(signed(), State.ALIVE, 1234, "n2"))
    m.state = 0
    assert claims_from_pb([m])[0] == []
    m = update_pb(Update(signed(), State.ALIVE, 1234, "n2"))
    m.signed.signature = b"x" * 63
    good, why = claims_from_pb([m])
    assert good == [] and "signature" in why[0]


def test_signing_key_is_made_once_and_kept_private(tmp_path):
    raw = state.signing_key(tmp_path)
    assert state.signing_key(tmp_path) == raw
    assert (tmp_path / state.KEY_FILE).stat().st_mode & 0o777 == 0o600
    (tmp_path / state.KEY_FILE).write_text("garbage")
    assert state.signing_key(tmp_path) != raw  # unreadable: a new one


def test_identity_keeps_lease_revision_and_incarnation(tmp_path):
    ident = state.Identity("n1", "02:00:00:00:00:01", IPv4Network("10.244.1.0/24"), 42, 99)
    state.save(tmp_path, ident)
    assert state.load(tmp_path) == ident
    assert state.resolve(tmp_path, "n1", None) == ident
    # another name does not inherit the subnet nor the revision
    other = state.resolve(tmp_path, "n9", None)
    assert other.subnet is None and other.lease_revision == 0 and other.incarnation == 0


def test_identity_from_before_these_fields_still_loads(tmp_path):
    (tmp_path / "node.json").write_text(json.dumps(
        {"node": "n1", "vtepMAC": "02:00:00:00:00:01", "subnet": "10.244.1.0/24"}))
    ident = state.load(tmp_path)
    assert ident is not None and ident.lease_revision == 0 and ident.incarnation == 0


def test_next_incarnation_is_above_the_last_and_time_based():
    assert state.next_incarnation(0, 1_000) == 1_000
    assert state.next_incarnation(5_000, 1_000) == 5_001  # the clock went back


def test_network_and_peers_are_saved_for_a_start_without_etcd(tmp_path):
    assert state.load_network(tmp_path) is None and state.load_peers(tmp_path) is None
    cfg = NetworkConfig(IPv4Network("10.244.0.0/16"), 24, 3, 4789)
    state.save_network(tmp_path, cfg)
    assert state.load_network(tmp_path) == cfg
    snap = LeaseSnapshot(77, {REC.subnet: LeaseEntry(REC, 40, 12345)})
    state.save_peers(tmp_path, snap)
    assert state.load_peers(tmp_path) == snap


def test_corrupt_saved_files_are_ignored(tmp_path):
    (tmp_path / state.NETWORK_FILE).write_text("{")
    (tmp_path / state.PEERS_FILE).write_text('{"revision": 1, "leases": [{"record": {}}]}')
    assert state.load_network(tmp_path) is None
    assert state.load_peers(tmp_path) is None


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(d / "ca")
    return ca, ca.issue("n1", ("172.30.1.11",)), CertificateAuthority(d / "other")


def test_tls_files_load_and_name_the_node(pki):
    _, issued, _ = pki
    files = tls.TlsFiles(issued.cert, issued.key, issued.ca)
    m = tls.load(files, "n1")
    assert m.cert.startswith(b"-----BEGIN CERTIFICATE")
    assert set(tls.cert_names(m.cert)) == {"n1", "172.30.1.11"}


def test_tls_refuses_a_certificate_that_does_not_name_the_node(pki):
    _, issued, _ = pki
    with pytest.raises(ConfigError, match="not this node 'n2'"):
        tls.load(tls.TlsFiles(issued.cert, issued.key, issued.ca), "n2")


def test_tls_refuses_a_certificate_from_another_ca(pki):
    _, issued, other = pki
    with pytest.raises(ConfigError, match="not signed by the CA"):
        tls.load(tls.TlsFiles(issued.cert, issued.key, other.cert_path), "n1")


def test_tls_refuses_a_key_of_another_certificate(pki):
    ca, issued, _ = pki
    n2 = ca.issue("n2")
    with pytest.raises(ConfigError, match="is not the key of"):
        tls.load(tls.TlsFiles(issued.cert, n2.key, issued.ca), "n1")


def test_tls_refuses_unreadable_files(pki, tmp_path):
    _, issued, _ = pki
    with pytest.raises(ConfigError) as e:
        tls.load(tls.TlsFiles(tmp_path / "missing.crt", issued.key, issued.ca), "n1")
    assert e.value.field == "--tls-cert"


def test_tls_flags_are_all_or_nothing():
    assert tls.tls_files(None, None, None) is None
    with pytest.raises(ConfigError) as e:
        tls.tls_files("a.crt", None, "ca.crt")
    assert e.value.field == "--tls-key"


def test_ca_is_reused_from_its_directory(tmp_path):
    a = CertificateAuthority(tmp_path)
    b = CertificateAuthority(tmp_path)
    assert a.cert == b.cert
