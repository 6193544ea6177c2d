import json
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface

import pytest

from overlay.cni import spec

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "/run/netns/x",
       "CNI_IFNAME": "eth0"}


def conf(**kw):
    d = {"cniVersion": "1.0.0", "name": "overlay", "type": "overlay"}
    d.update(kw)
    return json.dumps(d).encode()


@pytest.mark.parametrize("missing", ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])
def test_add_requires_each_env_var_and_names_it(missing):
    env = {k: v for k, v in ENV.items() if k != missing}
    with pytest.raises(spec.CniError) as ei:
        spec.parse_env(env)
    assert ei.value.code == spec.E_INVALID_ENV and missing in ei.value.msg


def test_del_does_not_need_netns():
    e = spec.parse_env({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "a", "CNI_IFNAME": "eth0"})
    assert e.netns == ""


@pytest.mark.parametrize("name", ["", "a" * 16, ".", "..", "a/b", "a:b", "a b", "a\tb", "é\x00"])
def test_bad_interface_names(name):
    with pytest.raises(spec.CniError) as ei:
        spec.parse_env({**ENV, "CNI_IFNAME": name})
    assert ei.value.code == spec.E_INVALID_ENV


def test_cni_args_parsed_and_malformed_refused():
    e = spec.parse_env({**ENV, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=x"})
    assert dict(e.args) == {"IgnoreUnknown": "1", "K8S_POD_NAME": "x"}
    with pytest.raises(spec.CniError, match="CNI_ARGS"):
        spec.parse_env({**ENV, "CNI_ARGS": "novalue"})


def test_unknown_command():
    with pytest.raises(spec.CniError) as ei:
        spec.parse_env({**ENV, "CNI_COMMAND": "FROB"})
    assert ei.value.code == spec.E_INVALID_ENV


@pytest.mark.parametrize("version", spec.SUPPORTED_VERSIONS)
def test_supported_versions_parse(version):
    assert spec.parse_conf(conf(cniVersion=version), "ADD").cni_version == version


@pytest.mark.parametrize(("doc", "code", "words"), [
    (b"{", spec.E_DECODE, "decode"),
    (b"[]", spec.E_DECODE, "object"),
    (conf(cniVersion="0.2.0"), spec.E_INCOMPATIBLE_VERSION, "incompatible"),
    (conf(cniVersion="2.0.0"), spec.E_INCOMPATIBLE_VERSION, "incompatible"),
    (conf(cniVersion=None), spec.E_INVALID_CONFIG, "cniVersion"),
    (conf(name="bad name"), spec.E_INVALID_CONFIG, "name"),
    (conf(mtu=70000), spec.E_INVALID_CONFIG, "mtu"),
    (conf(mtu=True), spec.E_INVALID_CONFIG, "mtu"),
    (conf(hairpinMode="yes"), spec.E_INVALID_CONFIG, "hairpinMode"),
    (conf(ipMasq=1), spec.E_INVALID_CONFIG, "ipMasq"),
    (conf(dns=[]), spec.E_INVALID_CONFIG, "dns"),
    (conf(dns={"nameservers": "1.1.1.1"}), spec.E_INVALID_CONFIG, "dns.nameservers"),
    (conf(ipam={"type": "host-local"}), spec.E_INVALID_CONFIG, "ipam"),
    (conf(prevResult=[]), spec.E_INVALID_CONFIG, "prevResult"),
])
def test_config_errors_have_the_right_code_and_name_the_key(doc, code, words):
    with pytest.raises(spec.CniError) as ei:
        spec.parse_conf(doc, "ADD")
    assert ei.value.code == code
    assert words in ei.value.msg + ei.value.details


def test_tolerates_runtime_injected_keys():
    c = spec.parse_conf(conf(runtimeConfig={"portMappings": []}, capabilities={"x": True},
                             args={"cni": {"labels": []}}, somethingNew=1), "ADD")
    assert c.runtime_config == {"portMappings": []}


def test_check_gc_status_need_recent_versions():
    with pytest.raises(spec.CniError) as ei:
        spec.parse_conf(conf(cniVersion="0.3.1"), "CHECK")
    assert ei.value.code == spec.E_INCOMPATIBLE_VERSION
    with pytest.raises(spec.CniError):
        spec.parse_conf(conf(cniVersion="1.0.0"), "GC")
    c = spec.parse_conf(conf(cniVersion="1.1.0", **{"cni.dev/valid-attachments": [
        {"containerID": "a", "ifname": "eth0"}]}), "GC")
    assert c.valid_attachments == (("a", "eth0"),)


RESULT = spec.Result(
    interfaces=(spec.Interface("cni0", "02:00:00:00:00:aa"), spec.Interface("veth1", "02:01"),
                spec.Interface("eth0", "02:02", "/run/netns/x")),
    ips=(spec.IPConfig(IPv4Interface("10.244.1.5/24"), IPv4Address("10.244.1.1"), 2),),
    routes=(spec.RouteR("0.0.0.0/0", "10.244.1.1"),),
    dns=spec.Dns(("10.96.0.10",)),
)


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_legacy_results_carry_ip_version(version):
    doc = json.loads(spec.render(RESULT, version))
    assert doc["cniVersion"] == version
    assert doc["ips"][0] == {"version": "4", "address": "10.244.1.5/24",
                             "gateway": "10.244.1.1", "interface": 2}


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
def test_current_results_have_no_ip_version(version):
    doc = json.loads(spec.render(RESULT, version))
    assert "version" not in doc["ips"][0]
    assert doc["interfaces"][2]["sandbox"] == "/run/netns/x"
    assert doc["dns"] == {"nameservers": ["10.96.0.10"]}


def test_result_round_trips_through_prev_result():
    for v in spec.SUPPORTED_VERSIONS:
        assert spec.parse_result(json.loads(spec.render(RESULT, v))) == RESULT


DUAL = spec.Result(
    interfaces=RESULT.interfaces,
    ips=(spec.IPConfig(IPv4Interface("10.244.1.5/24"), IPv4Address("10.244.1.1"), 2),
         spec.IPConfig(IPv6Interface("fd00:0:0:1::5/64"), IPv6Address("fd00:0:0:1::1"), 2)),
    routes=(spec.RouteR("0.0.0.0/0", "10.244.1.1"), spec.RouteR("::/0", "fd00:0:0:1::1")),
)


@pytest.mark.parametrize("version", spec.SUPPORTED_VERSIONS)
def test_dual_stack_results_in_every_version(version):
    doc = json.loads(spec.render(DUAL, version))
    legacy = version < "1.0.0"
    assert [ip.get("version") for ip in doc["ips"]] == (["4", "6"] if legacy else [None, None])
    assert [ip["interface"] for ip in doc["ips"]] == [2, 2]
    assert doc["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"},
                             {"dst": "::/0", "gw": "fd00:0:0:1::1"}]
    assert spec.parse_result(doc) == DUAL


def test_prev_result_with_a_gateway_of_the_other_family_is_refused():
    doc = json.loads(spec.render(DUAL, "1.0.0"))
    doc["ips"][1]["gateway"] = "10.244.1.1"
    with pytest.raises(spec.CniError, match="not of the family"):
        spec.parse_result(doc)


def test_error_document_shape():
    doc = json.loads(spec.error_doc("0.4.0", spec.CniError(7, "bad", "why")))
    assert doc == {"cniVersion": "0.4.0", "code": 7, "msg": "bad", "details": "why"}


LOOPBACK = {"cniVersion": "1.0.0", "interfaces": [{"name": "lo", "mac": "00:00:00:00:00:00",
                                                   "sandbox": "/run/netns/x"}],
            "ips": [{"interface": 0, "address": "127.0.0.1/8"},
                    {"interface": 0, "address": "::1/128"}],
            "routes": [{"dst": "::/0", "gw": "fe80::1", "mtu": 1280}],
            "dns": {"nameservers": ["1.1.1.1"]}, "custom": {"kept": True}}


@pytest.mark.parametrize("version", spec.SUPPORTED_VERSIONS)
def test_chained_result_passes_the_previous_one_through(version):
    doc = spec.chain_result(LOOPBACK, RESULT, version)
    legacy = version in ("0.3.0", "0.3.1", "0.4.0")
    assert doc["cniVersion"] == version
    assert doc["interfaces"][0] == LOOPBACK["interfaces"][0]
    assert [i["name"] for i in doc["interfaces"]] == ["lo", "cni0", "veth1", "eth0"]
    # The previous plugin's IPv6 address, unknown route fields and own keys survive.
    assert [ip["address"] for ip in doc["ips"]] == ["127.0.0.1/8", "::1/128", "10.244.1.5/24"]
    assert [ip.get("version") for ip in doc["ips"]] == (["4", "6", "4"] if legacy
                                                        else [None, None, None])
    assert doc["ips"][2]["interface"] == 3  # our index, shifted past the previous ones
    assert doc["routes"][0] == {"dst": "::/0", "gw": "fe80::1", "mtu": 1280}
    assert doc["routes"][1] == {"dst": "0.0.0.0/0", "gw": "10.244.1.1"}
    assert doc["dns"] == {"nameservers": ["10.96.0.10"]}  # ours, from our config
    assert doc["custom"] == {"kept": True}
    assert LOOPBACK["ips"][0] == {"interface": 0, "address": "127.0.0.1/8"}  # not mutated


def test_chained_result_keeps_previous_dns_when_we_have_none():
    ours = spec.Result(RESULT.interfaces, RESULT.ips, RESULT.routes)
    assert spec.chain_result(LOOPBACK, ours, "1.0.0")["dns"] == {"nameservers": ["1.1.1.1"]}


@pytest.mark.parametrize("prev", [{"ips": "x"}, {"interfaces": [1]}, {"routes": {}},
                                  {"ips": [{"address": "nonsense"}]}, {"ips": [{"address": 5}]}])
def test_chained_result_refuses_a_malformed_previous_one(prev):
    with pytest.raises(spec.CniError) as ei:
        spec.chain_result(prev, RESULT, "0.4.0")
    assert ei.value.code == spec.E_INVALID_CONFIG and "prevResult" in ei.value.msg


def test_wire_request_carries_only_cni_variables_and_parses_back():
    from overlay.cni.wire import MAGIC, parse_request, request_bytes

    env = {b"CNI_COMMAND": b"ADD", b"CNI_IFNAME": b"eth0", b"HOME": b"/root",
           b"CNI_ARGS": b"K=\xff"}
    raw = request_bytes(env, b"{}", {"NETNS_ERROR": "gone"})
    assert raw.startswith(MAGIC)
    hlen = int.from_bytes(raw[len(MAGIC):len(MAGIC) + 4], "big")
    head = raw[len(MAGIC) + 4:len(MAGIC) + 4 + hlen].split(b"\0")
    assert head == [b"CNI_COMMAND=ADD", b"CNI_IFNAME=eth0", b"CNI_ARGS=K=\xff",
                    b"NETNS_ERROR=gone"]
    assert raw.endswith(b"\0\0\0\x02{}")
    assert parse_request(raw) == ({"CNI_COMMAND": "ADD", "CNI_IFNAME": "eth0",
                                   "CNI_ARGS": "K=\udcff", "NETNS_ERROR": "gone"}, b"{}")
    for bad in (raw[:-1], raw + b"x", b"OVLCNI2" + raw[7:], raw[:10]):
        with pytest.raises(ValueError):
            parse_request(bad)


def test_deleted_link_notifications_are_parsed():
    import socket
    import struct

    from overlay.cni.wiring import RTM_DELLINK, _dellink_message, deleted_links

    def notification(mtype: int, family: int, name: str) -> bytes:
        nm = name.encode() + b"\0"
        rta = struct.pack("=HH", 4 + len(nm), 3) + nm
        rta += b"\0" * (-len(rta) % 4)
        mtu = struct.pack("=HHI", 8, 4, 1500)  # an attribute before the name
        body = struct.pack("=BxHiII", family, 1, 7, 0, 0) + mtu + rta
        return struct.pack("=IHHII", 16 + len(body), mtype, 0, 0, 0) + body

    batch = (notification(RTM_DELLINK, socket.AF_UNSPEC, "vethabc")
             + notification(RTM_DELLINK, socket.AF_BRIDGE, "vethbridged")  # left a bridge only
             + notification(16, socket.AF_UNSPEC, "vethnew")  # RTM_NEWLINK
             + notification(RTM_DELLINK, socket.AF_UNSPEC, "eth0"))
    assert deleted_links(batch) == ["vethabc", "eth0"]
    assert deleted_links(b"\x03\x00") == []
    msg = _dellink_message("vethabc", seq=7)
    length, mtype, _flags, seq = struct.unpack_from("=IHHI", msg)
    assert (length, mtype, seq) == (len(msg), RTM_DELLINK, 7) and len(msg) % 4 == 0
    assert deleted_links(msg) == ["vethabc"]


def test_del_goes_ahead_despite_a_broken_optional_field():
    bad = conf(mtu="large", agentSocket="/run/x.sock")
    with pytest.raises(spec.CniError):
        spec.parse_conf(bad, "ADD")
    c = spec.parse_conf(bad, "DEL")
    assert c.agent_socket == "/run/x.sock" and "mtu" in c.lenient
    # but an unsupported version is still refused before anything happens
    with pytest.raises(spec.CniError) as ei:
        spec.parse_conf(conf(cniVersion="0.2.0", mtu="large"), "DEL")
    assert ei.value.code == spec.E_INCOMPATIBLE_VERSION
