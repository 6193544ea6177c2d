from ipaddress import IPv4Address

from overlay.agent.vxlanfilter import member_update, ruleset


def test_ruleset_drops_vxlan_from_non_members_only():
    text = ruleset(8472, [IPv4Address("172.30.1.12"), IPv4Address("172.30.1.11")])
    assert "udp dport 8472 ip saddr != @members counter drop" in text
    assert "elements = { 172.30.1.11, 172.30.1.12 }" in text
    assert "hook input" in text and "policy accept" in text
    # replaces an existing table instead of appending to it
    assert text.index("delete table ip overlay_vxlan") < text.index("set members")


def test_empty_member_set_is_valid_and_drops_everything():
    text = ruleset(4789, [])
    assert "elements" not in text and "udp dport 4789" in text


def test_member_update_is_one_flush_and_add():
    assert member_update([IPv4Address("10.0.0.2"), IPv4Address("10.0.0.1")]) == (
        "flush set ip overlay_vxlan members\n"
        "add element ip overlay_vxlan members { 10.0.0.1, 10.0.0.2 }\n")
    assert member_update([]) == "flush set ip overlay_vxlan members\n"


def test_fault_ruleset_partitions_and_loss():
    from overlay.sandbox.faults import Faults
    from overlay.sandbox.faults import ruleset as faults

    text = faults(Faults(20, frozenset({"n3"})))
    assert 'iifname "u-n3" counter drop' in text and 'oifname "u-n3" counter drop' in text
    assert "numgen random mod 100 < 20 counter drop" in text
    assert "hook forward" in text and "table bridge ovs_faults" in text
    clean = faults(Faults())
    assert "drop" not in clean


def test_parse_table_reads_back_what_the_kernel_shows():
    from overlay.agent.vxlanfilter import parse_table

    listing = """table ip overlay_vxlan {
    set members {
        type ipv4_addr
        elements = { 172.30.1.12, 172.30.1.13,
                 172.30.1.14 }
    }

    chain input {
        type filter hook input priority -150; policy accept;
        udp dport 8472 ip saddr != @members counter packets 5 bytes 400 drop
    }
}
"""
    port, members = parse_table(listing)
    assert port == 8472
    assert members == {str(IPv4Address(f"172.30.1.{i}")) for i in (12, 13, 14)}
    flushed = listing.replace("udp dport 8472 ip saddr != @members counter packets 5 bytes "
                              "400 drop", "")
    assert parse_table(flushed)[0] is None


def test_ipv6_underlay_filter_is_an_ip6_table():
    from ipaddress import IPv6Address

    from overlay.agent.vxlanfilter import parse_table

    text = ruleset(8472, [IPv6Address("fd30::1:12"), IPv4Address("172.30.1.11")], family=6)
    assert "table ip6 overlay_vxlan {\n  set members { type ipv6_addr; elements = " \
           "{ fd30::1:12 }; }" in text
    assert "udp dport 8472 ip6 saddr != @members counter drop" in text
    # the IPv4 table of an earlier run over an IPv4 underlay goes away
    assert "delete table ip overlay_vxlan" in text
    assert member_update([IPv6Address("fd30::1:12")], 6) == (
        "flush set ip6 overlay_vxlan members\n"
        "add element ip6 overlay_vxlan members { fd30::1:12 }\n")
    assert parse_table("table ip6 overlay_vxlan {\n set members {\n type ipv6_addr\n "
                       "elements = { fd30::1:12 }\n }\n chain input {\n udp dport 8472 ip6 "
                       "saddr != @members counter packets 0 bytes 0 drop\n }\n}") == (
        8472, frozenset({"fd30::1:12"}))
