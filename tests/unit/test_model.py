from ipaddress import IPv4Network

import pytest

from overlay.errors import ConfigError
from overlay.model import NetworkConfig, NodeRecord, parse_subnet_key, subnet_key, validate_network


def cfg(**kw):
    return NetworkConfig(network=IPv4Network(kw.pop("network", "10.244.0.0/16")), **kw)


def test_defaults_match_flannel_and_the_brief():
    c = NetworkConfig.from_json('{"Network": "10.244.0.0/16"}')
    assert (c.subnet_len, c.vni, c.port, c.backend) == (24, 1, 8472, "vxlan")
    assert c.subnet_count == 256


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
        ('{"Network": "fd00::/64"}', "Network", "IPv6"),
        ('{"Network": "banana"}', "Network", "not a CIDR"),
        ('{"Network": "10.244.0.0/24", "SubnetLen": 16}', "SubnetLen", "does not fit"),
        ('{"Network": "10.244.0.0/16", "SubnetLen": 31}', "SubnetLen", "no room for pods"),
        ('{"Network": "10.244.0.0/16", "Backend": {"VNI": 0}}', "Backend.VNI", "outside"),
        ('{"Network": "10.244.0.0/16", "Backend": {"VNI": 16777216}}', "Backend.VNI", "outside"),
        ('{"Network": "10.244.0.0/16", "Backend": {"Port": 70000}}', "Backend.Port", "outside"),
        ('{"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}', "Backend.Type", "udp"),
        ('{"Network": "10.244.0.0/16", "Backend": {"DirectRouting": true}}',
         "Backend.DirectRouting", "unsupported"),
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


def test_vni_bounds_are_inclusive():
    assert cfg(vni=1).vni == 1
    assert cfg(vni=16_777_215).vni == 16_777_215


def test_overlap_with_the_underlay_is_refused():
    c = cfg(network="10.0.0.0/8")
    with pytest.raises(ConfigError, match=r"overlaps 10\.1\.2\.0/24"):
        validate_network(c, (IPv4Network("10.1.2.0/24"),))
    validate_network(c, (IPv4Network("192.168.1.0/24"),))


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
    ]:
        with pytest.raises(ConfigError) as ei:
            NodeRecord.from_json(bad)
        assert ei.value.field == field


def test_subnet_keys():
    s = IPv4Network("10.244.3.0/24")
    assert subnet_key("/overlay/", s) == "/overlay/subnets/10.244.3.0-24"
    assert parse_subnet_key("/overlay/", "/overlay/subnets/10.244.3.0-24") == s
    assert parse_subnet_key("/overlay/", "/overlay/subnets/10.244.3.1-24") is None
    assert parse_subnet_key("/overlay/", "/overlay/network/config") is None
    assert parse_subnet_key("/overlay/", "/overlay/subnets/garbage") is None


def test_tls_failures_are_explained():
    from overlay.etcdstore import tls_hint

    assert "client certificate" in tls_hint(
        "UNAVAILABLE: ipv4:172.30.0.11:2379: Unwrap failed (TSI_DATA_CORRUPTED)")
    assert "--etcd-cafile" in tls_hint("Ssl handshake failed: CERTIFICATE_VERIFY_FAILED")
    assert tls_hint("connection refused") == ""
