import json
from ipaddress import IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.errors import ConfigError
from overlay.model import (
    NetworkConfig,
    NodeRecord,
    key_role,
    parse_subnet_key,
    subnet_key,
    validate_network,
)


def cfg(**kw):
    return NetworkConfig(network=IPv4Network(kw.pop("network", "10.244.0.0/16")), **kw)


def test_defaults_match_flannel_and_the_brief():
    c = NetworkConfig.from_json('{"Network": "10.244.0.0/16"}')
    assert (c.subnet_len, c.vni, c.port, c.backend) == (24, 1, 8472, "vxlan")
    assert (c.enable_ipv4, c.enable_ipv6, c.direct_routing, c.mtu) == (True, False, False, None)
    # flannel's SubnetMin default: the second subnet (the first one's network
    # address is the cluster's); SubnetMax: the last.
    assert (str(c.primary.first), str(c.primary.last)) == ("10.244.1.0/24", "10.244.255.0/24")
    assert c.subnet_count == 255


def test_round_trip_uses_flannel_keys():
    c = cfg(subnet_len=26, vni=42, port=4789)
    doc = c.to_json()
    assert '"Network": "10.244.0.0/16"' in doc and '"VNI": 42' in doc
    assert NetworkConfig.from_json(doc) == c


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        ('{"Network": "10.244.0.0/30"}', "Network", "too small"),
        ('{"Network": "127.0.0.0/16"}', "Network", "loopback"),
        ('{"Network": "224.0.0.0/8"}', "Network", "multicast"),
        ('{"Network": "169.254.0.0/16"}', "Network", "link-local"),
        ('{"Network": "10.244.1.0/16"}', "Network", "did you mean 10.244.0.0/16"),
        ('{"Network": "fd00::/64"}', "Network", "IPv6Network"),
        ('{"Network": "banana"}', "Network", "not a CIDR"),
        ('{"Network": "10.244.0.0/24", "SubnetLen": 16}', "SubnetLen", "does not fit"),
        ('{"Network": "10.244.0.0/16", "SubnetLen": 31}', "SubnetLen", "no room for pods"),
        ('{"Network": "10.244.0.0/16", "Backend": {"VNI": 0}}', "Backend.VNI", "outside"),
        ('{"Network": "10.244.0.0/16", "Backend": {"VNI": 16777216}}', "Backend.VNI", "outside"),
        ('{"Network": "10.244.0.0/16", "Backend": {"Port": 70000}}', "Backend.Port", "outside"),
        ('{"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}', "Backend.Type", "udp"),
        ('{"Network": "10.244.0.0/16", "Backend": {"DirectRouting": 1}}',
         "Backend.DirectRouting", "true or false"),
        ('{"Network": "10.244.0.0/16", "Backend": {"Directrouting": true}}',
         "Backend.Directrouting", "unsupported key"),
        ('{"Network": "10.244.0.0/16", "Backend": {"GBP": true}}', "Backend.GBP",
         "Group Based Policy"),
        ('{"Network": "10.244.0.0/16", "Backend": {"Learning": true}}', "Backend.Learning",
         "programs every FDB entry"),
        ('{"Network": "10.244.0.0/16", "Backend": {"MacPrefix": "0E-2A"}}',
         "Backend.MacPrefix", "Windows"),
        ('{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}', "Backend.Type",
         "DirectRouting"),
        ('{"Network": "10.244.0.0/16", "Backend": {"MTU": 100}}', "Backend.MTU", "outside"),
        ('{"Network": "10.244.0.0/16", "Networks": ["10.1.0.0/16"]}', "Networks",
         "MultiClusterCIDR"),
        ('{"Network": "10.244.0.0/16", "EnableIPv6": true}', "IPv6Network", "missing"),
        ('{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "10.1.0.0/16"}',
         "IPv6Network", "IPv4"),
        ('{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fe80::/56"}',
         "IPv6Network", "link-local"),
        ('{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::1/56"}',
         "IPv6Network", "did you mean fd00::/56"),
        ('{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/64", '
         '"IPv6SubnetLen": 127}', "IPv6SubnetLen", "no room"),
        ('{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/125"}',
         "IPv6Network", "too small"),
        ('{"EnableIPv4": false}', "EnableIPv4", "at least one"),
        ('{"EnableIPv4": "no", "Network": "10.244.0.0/16"}', "EnableIPv4", "true or false"),
        ('{"Network": "10.244.0.0/16", "SubnetMin": "10.245.0.0"}', "SubnetMin",
         "not in Network"),
        ('{"Network": "10.244.0.0/16", "SubnetMin": "10.244.0.7"}', "SubnetMin",
         "boundary"),
        ('{"Network": "10.244.0.0/16", "SubnetMin": "10.244.9.0", "SubnetMax": "10.244.8.0"}',
         "SubnetMin", "above"),
        ('{"Network": "10.244.0.0/16", "SubnetMax": "fd00::"}', "SubnetMax", "IPv6"),
        ('{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00::/56", '
         '"IPv6SubnetMax": "fd00:0:0:100::"}', "IPv6SubnetMax", "not in IPv6Network"),
        ('{"Network": "10.244.0.0/16", "SubnetLen": "24"}', "SubnetLen", "integer"),
        ('{"SubnetLen": 24}', "Network", "missing"),
        ('{"Network": "10.244.0.0/16", "Typo": 1}', "Typo", "unsupported"),
        ("[1, 2]", "config", "object"),
        ("{not json", "config", "JSON"),
    ],
)
def test_invalid_configs_name_the_key(doc, field, words):
    with pytest.raises(ConfigError) as ei:
        NetworkConfig.from_json(doc)
    assert ei.value.field == field
    assert words in str(ei.value)


def test_flannel_dual_stack_example_works_unchanged():
    # flannel's own examples (commit c7a7aa88 and Documentation/configuration.md).
    c = NetworkConfig.from_json('{"EnableIPv4": true, "EnableIPv6": true, '
                                '"Network": "172.16.0.0/16", "IPv6Network": "fc00::/48", '
                                '"Backend": {"Type": "vxlan"}}')
    assert c.families == (4, 6)
    assert (str(c.ipv6_network), c.ipv6_subnet_len) == ("fc00::/48", 64)
    doc = json.loads('{"Network": "10.42.0.0/16", "EnableIPv6": true, '
                     '"IPv6Network": "2001:cafe:42:0::/56", "EnableNFTables": false, '
                     '"Backend": {"Type": "vxlan", "DirectRouting": true, "MTU": 1500, '
                     '"GBP": false, "Learning": false}}')
    c = NetworkConfig.from_dict(doc)
    assert str(c.ipv6_network) == "2001:cafe:42::/56" and c.direct_routing and c.mtu == 1500
    assert str(c.pool(6).first) == "2001:cafe:42:1::/64"  # flannel skips the first too
    assert NetworkConfig.from_json(c.to_json()) == c


def test_ipv6_only_like_flannel_documents_it():
    # "use the same configuration as dual-stack and add EnableIPv4: false"
    c = NetworkConfig.from_json('{"EnableIPv4": false, "EnableIPv6": true, '
                                '"Network": "10.42.0.0/16", "IPv6Network": "fd00:42::/56"}')
    assert c.network is None and c.families == (6,)
    assert c.notes == ('Network is ignored: "EnableIPv4" is false',)
    assert NetworkConfig.from_json(c.to_json()) == c
    assert '"EnableIPv4": false' in c.to_json()


@pytest.mark.parametrize(("net", "want"), [("10.0.0.0/8", 24), ("10.1.0.0/22", 24),
                                            ("10.1.0.0/23", 25), ("10.1.0.0/26", 28)])
def test_default_subnet_len_is_flannels(net, want):
    assert NetworkConfig.from_json(json.dumps({"Network": net})).subnet_len == want


@pytest.mark.parametrize(("net", "want"), [("fd00::/48", 64), ("fd00::/62", 64),
                                            ("fd00::/63", 65), ("fd00::/120", 122)])
def test_default_ipv6_subnet_len_is_flannels(net, want):
    c = NetworkConfig.from_json(json.dumps({"EnableIPv4": False, "EnableIPv6": True,
                                            "IPv6Network": net}))
    assert c.ipv6_subnet_len == want


def test_subnet_min_max_bound_new_leases_and_held_ones_only_when_explicit():
    c = NetworkConfig.from_json('{"Network": "10.0.0.0/8", "SubnetLen": 20, '
                                '"SubnetMin": "10.10.0.0", "SubnetMax": "10.99.0.0"}')
    p = c.primary
    assert str(p.first) == "10.10.0.0/20" and str(p.last) == "10.99.0.0/20"
    assert p.in_range(IPv4Network("10.10.0.0/20")) and not p.in_range(IPv4Network("10.9.240.0/20"))
    assert not p.keeps(IPv4Network("10.9.240.0/20"))  # explicit: the node moves (flannel)
    d = NetworkConfig.from_json('{"Network": "10.244.0.0/16"}').primary
    assert not d.in_range(IPv4Network("10.244.0.0/24"))  # never handed out any more...
    assert d.keeps(IPv4Network("10.244.0.0/24"))  # ...but a node that has it keeps it


def test_vni_bounds_are_inclusive():
    assert cfg(vni=1).vni == 1
    assert cfg(vni=16_777_215).vni == 16_777_215


def test_overlap_with_the_underlay_is_refused():
    c = cfg(network="10.0.0.0/8")
    with pytest.raises(ConfigError, match=r"overlaps 10\.1\.2\.0/24"):
        validate_network(c, (IPv4Network("10.1.2.0/24"),))
    validate_network(c, (IPv4Network("192.168.1.0/24"),))


def test_overlap_is_checked_per_family():
    c = NetworkConfig.from_json('{"Network": "10.244.0.0/16", "EnableIPv6": true, '
                                '"IPv6Network": "fd00:1::/56"}')
    with pytest.raises(ConfigError) as ei:
        validate_network(c, (IPv6Network("fd00:1:0:5::/64"),))
    assert ei.value.field == "IPv6Network"
    validate_network(c, (IPv6Network("fd30::/64"), IPv4Network("172.30.0.0/16")))


def test_dual_stack_record_round_trip_and_what_an_old_reader_sees():
    rec = NodeRecord("n1", IPv4Network("10.244.7.0/24"), IPv6Address("fd30::1:11"),
                     "02:aa:bb:cc:dd:ee", "[fd30::1:11]:7946",
                     subnet6=IPv6Network("fd00:0:0:7::/64"))
    doc = json.loads(rec.to_json())
    assert doc["subnet"] == "10.244.7.0/24" and doc["ipv6Subnet"] == "fd00:0:0:7::/64"
    assert NodeRecord.from_json(rec.to_json()) == rec
    assert rec.key_subnet == IPv4Network("10.244.7.0/24")
    assert [str(a) for a in rec.vtep_ips] == ["10.244.7.0", "fd00:0:0:7::"]
    assert [str(g) for g in rec.gateways] == ["10.244.7.1/24", "fd00:0:0:7::1/64"]
    assert [subnet_key("/o/", k) for k in rec.lease_keys] == [
        "/o/subnets/10.244.7.0-24", "/o/subnets/fd00:0:0:7::-64"]
    assert key_role(IPv6Network("fd00:0:0:7::/64"), rec) == "claim"
    assert key_role(IPv4Network("10.244.7.0/24"), rec) == "record"
    v6only = rec.with_(subnet=None)
    assert v6only.key_subnet == IPv6Network("fd00:0:0:7::/64")
    assert key_role(IPv6Network("fd00:0:0:7::/64"), v6only) == "record"
    assert "subnet" not in json.loads(v6only.to_json())
    with pytest.raises(ConfigError):
        rec.with_(subnet=None, subnet6=None)


def test_a_lease_written_before_ipv6_reads_unchanged():
    old = ('{"backend": "vxlan", "grpcAddr": "172.30.1.11:7946", "node": "n1", '
           '"subnet": "10.244.7.0/24", "underlayIP": "172.30.1.11", "vtepMAC": '
           '"02:aa:bb:cc:dd:ee"}')
    rec = NodeRecord.from_json(old)
    assert rec.subnet6 is None and rec.to_json() == old


def test_lease_record_round_trip_and_validation():
    rec = NodeRecord("n1", IPv4Network("10.244.7.0/24"), __import__("ipaddress").IPv4Address(
        "172.30.1.11"), "02:aa:bb:cc:dd:ee", "172.30.1.11:7946")
    assert NodeRecord.from_json(rec.to_json()) == rec
    assert str(rec.vtep_ip) == "10.244.7.0"
    assert str(rec.gateway) == "10.244.7.1/24"
    for bad, field in [
        ('{"node": "n1", "subnet": "10.244.7.0/24", "underlayIP": "x", "vtepMAC": '
         '"02:aa:bb:cc:dd:ee"}', "underlayIP"),
        ('{"node": "n1", "subnet": "10.244.7.0/24", "underlayIP": "1.2.3.4", "vtepMAC": '
         '"01:aa:bb:cc:dd:ee"}', "vtepMAC"),
        ('{"node": "-bad", "subnet": "10.244.7.0/24", "underlayIP": "1.2.3.4", "vtepMAC": '
         '"02:aa:bb:cc:dd:ee"}', "node"),
        ('{"node": "n1", "subnet": "fd00::/64", "underlayIP": "1.2.3.4", "vtepMAC": '
         '"02:aa:bb:cc:dd:ee"}', "subnet"),
        ('{"node": "n1", "ipv6Subnet": "10.1.0.0/24", "underlayIP": "1.2.3.4", "vtepMAC": '
         '"02:aa:bb:cc:dd:ee"}', "ipv6Subnet"),
        ('{"node": "n1", "underlayIP": "1.2.3.4", "vtepMAC": "02:aa:bb:cc:dd:ee"}', "subnet"),
    ]:
        with pytest.raises(ConfigError) as ei:
            NodeRecord.from_json(bad)
        assert ei.value.field == field


def test_subnet_keys():
    s = IPv4Network("10.244.3.0/24")
    assert subnet_key("/overlay/", s) == "/overlay/subnets/10.244.3.0-24"
    assert parse_subnet_key("/overlay/", "/overlay/subnets/10.244.3.0-24") == s
    s6 = IPv6Network("fd00:0:0:3::/64")
    assert subnet_key("/overlay/", s6) == "/overlay/subnets/fd00:0:0:3::-64"
    assert parse_subnet_key("/overlay/", "/overlay/subnets/fd00:0:0:3::-64") == s6
    assert parse_subnet_key("/overlay/", "/overlay/subnets/fd00:0:0:3:0::-64") is None
    assert parse_subnet_key("/overlay/", "/overlay/subnets/fd00:0:0:3::1-64") is None
    assert parse_subnet_key("/overlay/", "/overlay/subnets/10.244.3.1-24") is None
    assert parse_subnet_key("/overlay/", "/overlay/network/config") is None
    assert parse_subnet_key("/overlay/", "/overlay/subnets/garbage") is None


def test_tls_failures_are_explained():
    from overlay.etcdstore import tls_hint

    assert "client certificate" in tls_hint(
        "UNAVAILABLE: ipv4:172.30.0.11:2379: Unwrap failed (TSI_DATA_CORRUPTED)")
    assert "--etcd-cafile" in tls_hint("Ssl handshake failed: CERTIFICATE_VERIFY_FAILED")
    assert tls_hint("connection refused") == ""


@given(st.integers(0, 2**64 - 1), st.integers(40, 62), st.sampled_from([None, 64, 80, 120]))
def test_ipv6_configs_round_trip(prefix_bits, plen, slen):
    net = IPv6Network(((0xFD << 120) | (prefix_bits << 56), plen), strict=False)
    doc = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": str(net)}
    if slen is not None:
        doc["IPv6SubnetLen"] = slen
    c = NetworkConfig.from_dict(doc)
    assert NetworkConfig.from_json(c.to_json()) == c
    p = c.primary
    assert p.belongs(p.first) and p.belongs(p.last) and p.index(p.first) == 1
    assert p.at(p.index(p.last)) == p.last


@given(st.integers(0, 2**32 - 1), st.integers(8, 28), st.integers(0, 4))
def test_ipv4_keys_round_trip(addr, plen, extra):
    net = IPv4Network((addr, plen), strict=False)
    sub = IPv4Network((int(net.network_address), min(32, plen + extra)))
    assert parse_subnet_key("/p/", subnet_key("/p/", sub)) == sub


V6 = '"EnableIPv6": true, "IPv6Network": "fd00::/56"'


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ('{"SubnetLen": 24}', 'Network: missing; set the cluster CIDR, e.g. 10.244.0.0/16 '
         '(or "EnableIPv4": false for an IPv6-only cluster)'),
        ('{"Network": "10.244.0.0/16", "EnableIPv6": true}', 'IPv6Network: missing; '
         '"EnableIPv6": true needs the IPv6 pod network, e.g. fd00:10:244::/56'),
        ('{"Network": "fd00::/64"}', 'Network: fd00::/64 is IPv6; put an IPv6 pod network in '
         'IPv6Network (with "EnableIPv6": true)'),
        ('{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "10.1.0.0/16"}',
         "IPv6Network: 10.1.0.0/16 is IPv4; expected an IPv6 network"),
        ('{"Network": "10.244.0.0/16", "SubnetLen": "24"}',
         "SubnetLen: expected an integer, got '24'"),
        ('{"Network": "10.244.0.0/16", "SubnetLen": 33}', "SubnetLen: 33 is outside 0..32"),
        ('{"Network": "10.244.0.0/16", ' + V6 + ', "IPv6SubnetLen": true}',
         "IPv6SubnetLen: expected an integer, got True"),
        ('{"Network": "10.244.0.0/16", ' + V6 + ', "IPv6SubnetLen": 129}',
         "IPv6SubnetLen: 129 is outside 0..128"),
        ('{"Network": "10.244.0.0/16", "SubnetMin": "fd00::"}',
         "SubnetMin: fd00:: is IPv6; SubnetMin is an address of Network"),
        ('{"Network": "10.244.0.0/16", "SubnetMax": "fd00::"}',
         "SubnetMax: fd00:: is IPv6; SubnetMax is an address of Network"),
        ('{"Network": "10.244.0.0/16", ' + V6 + ', "IPv6SubnetMin": "10.244.1.0"}',
         "IPv6SubnetMin: 10.244.1.0 is IPv4; IPv6SubnetMin is an address of IPv6Network"),
        ('{"Network": "10.244.0.0/16", ' + V6 + ', "IPv6SubnetMax": "10.244.1.0"}',
         "IPv6SubnetMax: 10.244.1.0 is IPv4; IPv6SubnetMax is an address of IPv6Network"),
        ('{"Network": "10.244.0.0/16", "SubnetMax": "banana"}',
         "SubnetMax: 'banana' is not an IP address"),
        ('{"Network": "10.244.0.0/16", "SubnetMin": "10.245.0.0"}',
         "SubnetMin: 10.245.0.0 is not in Network 10.244.0.0/16"),
        ('{"Network": "10.244.0.0/16", "SubnetMax": "10.244.0.7"}',
         "SubnetMax: 10.244.0.7 is not on a /24 boundary (SubnetLen); did you mean 10.244.0.0?"),
        ('{"Network": "10.244.0.0/16", ' + V6 + ', "IPv6SubnetMin": "fd01::"}',
         "IPv6SubnetMin: fd01:: is not in IPv6Network fd00::/56"),
        ('{"Network": "10.244.0.0/16", ' + V6 + ', "IPv6SubnetMax": "fd00:0:0:1::1"}',
         "IPv6SubnetMax: fd00:0:0:1::1 is not on a /64 boundary (IPv6SubnetLen); did you mean "
         "fd00:0:0:1::?"),
        ('{"Network": "10.244.0.0/16", "SubnetMin": "10.244.9.0", "SubnetMax": "10.244.8.0"}',
         "SubnetMin: 10.244.9.0 is above the subnet range's end 10.244.8.0"),
        ('{"Network": "10.244.0.0/16", ' + V6 + ', "IPv6SubnetMin": "fd00:0:0:9::", '
         '"IPv6SubnetMax": "fd00:0:0:8::"}',
         "IPv6SubnetMin: fd00:0:0:9:: is above the subnet range's end fd00:0:0:8::"),
    ],
)
def test_each_familys_key_errors_word_for_word(doc, message):
    """The IPv4 keys and their IPv6 counterparts go through one parser; each says its own
    key and family (pinned whole: users and scripts read these)."""
    with pytest.raises(ConfigError) as ei:
        NetworkConfig.from_json(doc)
    assert str(ei.value) == message


def test_keys_of_a_disabled_family_are_noted_not_parsed():
    c = NetworkConfig.from_json('{"Network": "10.244.0.0/16", "IPv6Network": "banana", '
                                '"IPv6SubnetLen": 1, "IPv6SubnetMin": 2, "IPv6SubnetMax": 3}')
    assert c.ipv6_network is None and c.notes == tuple(
        f'{k} is ignored: "EnableIPv6" is not true'
        for k in ("IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax"))
    c = NetworkConfig.from_json('{"EnableIPv4": false, ' + V6 + ', "Network": 1, '
                                '"SubnetLen": 1, "SubnetMin": 2, "SubnetMax": 3}')
    assert c.network is None and c.notes == tuple(
        f'{k} is ignored: "EnableIPv4" is false'
        for k in ("Network", "SubnetLen", "SubnetMin", "SubnetMax"))
