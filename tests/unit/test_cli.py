"""The command line as a user meets it: one sentence and an exit status for every error
(overlay.cli), argument types that refuse in words, and a --help that explains every flag
of every command (enumerated from the parsers, so commands added later are held to it)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import io
import sys
from contextlib import redirect_stderr

import pytest

from overlay import cli
from overlay.agent.main import build_parser as overlayd_parser
from overlay.cni.install import InstallOptions, check, install
from overlay.ctl.main import build_parser as overlayctl_parser
from overlay.errors import ConfigError, NotFound, PermanentError, TemporaryError
from overlay.etcdstore import parse_endpoints, reach_hint, resolve_endpoints

PARSERS = {"overlayctl": overlayctl_parser, "overlayd": overlayd_parser}


def test_each_kind_of_error_is_one_sentence_and_its_exit_status():
    cases = [
        (ConfigError("--subnet-len", "/40 leaves no room"), 2, "invalid --subnet-len: /40"),
        (TemporaryError("etcd list failed: nothing listens"), 1, "etcd list failed"),
        (PermanentError("cannot install"), 1, "cannot install"),
        (NotFound("no network config"), 1, "no network config"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/proc/nope"), 1,
         "/proc/nope: no such file or directory"),
        (KeyboardInterrupt(), 130, "interrupted"),
        (ZeroDivisionError("division by zero"), 70, "internal error: ZeroDivisionError"),
    ]
    for exc, code, text in cases:
        failure = cli.explain(exc)
        assert failure.code == code and text in failure.message, (exc, failure)
        assert "\n" not in failure.message


def test_run_reports_on_stderr_and_never_a_traceback(monkeypatch):
    def boom() -> int:
        raise RuntimeError("a bug")

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    err = io.StringIO()
    with redirect_stderr(err):
        assert cli.run("overlayctl", boom) == 70
    assert err.getvalue().startswith("overlayctl: internal error: RuntimeError: a bug")
    assert "Traceback" not in err.getvalue()
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    err = io.StringIO()
    with redirect_stderr(err):
        assert cli.run("overlayctl", boom) == 70
    assert "Traceback" in err.getvalue()  # asked for
    with pytest.raises(SystemExit):
        cli.run("overlayctl", lambda: sys.exit(2))


def test_flag_names_turns_config_keys_into_the_flags_typed():
    with pytest.raises(ConfigError) as e, cli.flag_names({"SubnetLen": "--subnet-len"}):
        raise ConfigError("SubnetLen", "/40 leaves no room for pods")
    assert e.value.field == "--subnet-len" and e.value.message == "/40 leaves no room for pods"
    with pytest.raises(ConfigError) as e, cli.flag_names({"SubnetLen": "--subnet-len"}):
        raise ConfigError("Network", "overlaps")
    assert e.value.field == "Network"


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "-inf", "abc", "", "1e400"])
def test_seconds_refuses_what_is_no_duration(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cli.seconds(text)


def test_types_accept_what_works():
    assert cli.seconds("0.25") == 0.25
    assert cli.port("8472") == 8472
    assert cli.int_range(0, 32)("0") == 0
    assert str(cli.path("/x")) == "/x"
    for bad, fn in (("0", cli.port), ("65536", cli.port), ("1.5", cli.port),
                    ("33", cli.int_range(0, 32)), ("", cli.path), (" ", cli.path)):
        with pytest.raises(argparse.ArgumentTypeError):
            fn(bad)


@pytest.mark.parametrize("argv", [["--etcd-timeout", "0"], ["--etcd-timeout", "-1"],
                                  ["--etcd-timeout", "nan"], ["--vni", "0"],
                                  ["--port", "70000"], ["--subnet-len", "x"]])
def test_network_init_refuses_bad_numbers_as_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        overlayctl_parser().parse_args(["network", "init", *argv])
    assert e.value.code == 2
    assert f"argument {argv[0]}:" in capsys.readouterr().err


def test_etcd_endpoints_in_words_that_fit():
    assert parse_endpoints("http://[::1]:2379") == ((("::1", 2379),), False)
    with pytest.raises(ConfigError, match="mixes IPv4 and IPv6"):
        parse_endpoints("http://[::1]:2379,127.0.0.1:2379")
    for bad, words in (("127.0.0.1:0", "port 0"), ("127.0.0.1:99999", "between 1 and 65535"),
                       ("foo://x", "unsupported scheme"), ("unix:///run/etcd.sock",
                                                           "unsupported scheme"),
                       ("http://127.0.0.1:2379/v3", "only the scheme, host and port"),
                       ("", "no endpoint"), ("a" * 300, "cannot resolve")):
        with pytest.raises(ConfigError, match=words):
            parse_endpoints(bad)
    assert parse_endpoints("http://127.0.0.1:2379,https://127.0.0.2") == (
        (("127.0.0.1", 2379), ("127.0.0.2", 2379)), True)
    # A name is kept as given: resolving it is the connection's business (retried).
    assert parse_endpoints("etcd.example:2380") == ((("etcd.example", 2380),), False)


def test_endpoints_are_resolved_when_connecting_ipv4_first_and_one_family():
    hosts, _ = parse_endpoints("http://[::1]:2379")
    assert asyncio.run(resolve_endpoints(hosts, 5)) == ("[::1]:2379",)
    hosts, _ = parse_endpoints("localhost:2380,127.0.0.2")
    assert asyncio.run(resolve_endpoints(hosts, 5)) == ("127.0.0.1:2380", "127.0.0.2:2379")
    with pytest.raises(ConfigError, match="mixes IPv4 and IPv6"):
        asyncio.run(resolve_endpoints((("localhost", 1), ("::1", 1)), 5))
    with pytest.raises(TemporaryError, match=r"cannot resolve etcd host 'nosuch\.invalid'"):
        asyncio.run(resolve_endpoints((("nosuch.invalid", 1),), 5))


def test_a_server_that_is_not_etcd_is_called_so():
    http1 = ("KV.Range failed after 2 attempts: UNAVAILABLE (connections to all backends "
             "failing; last error: UNAVAILABLE: ipv4:127.0.0.1:80: Failed parsing HTTP/2 "
             "(Expected SETTINGS frame as the first frame, got frame type 79))")
    assert "it is not etcd" in reach_hint(http1, "127.0.0.1:80")
    assert "it is not etcd" in reach_hint("UNIMPLEMENTED Received http2 header with status: "
                                          "404", "10.0.0.1:2379")
    assert "nothing listens at 127.0.0.1:1" in reach_hint(
        "UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused",
        "127.0.0.1:1")
    assert reach_hint("something else", "x") == ""


def test_install_cni_refuses_what_cannot_work_before_writing(tmp_path):
    base = InstallOptions(bin_dir=tmp_path / "bin", conf_dir=tmp_path / "net.d")
    bad = [({"network_name": "my net"}, "--network-name"),
           ({"network_name": "-x"}, "--network-name"),
           ({"network_name": ""}, "--network-name"),
           ({"agent_socket": "run/cni.sock"}, "--agent-socket")]
    for change, flag in bad:
        opts = InstallOptions(**{**base.__dict__, **change})
        with pytest.raises(ConfigError) as e:
            install(opts)
        assert e.value.field == flag, (change, e.value)
    assert not (tmp_path / "bin").exists() and not (tmp_path / "net.d").exists()
    assert check(base)["name"] == "overlay"


def test_install_cni_into_an_unwritable_place_says_where(tmp_path):
    opts = InstallOptions(bin_dir=tmp_path / "file" / "bin", conf_dir=tmp_path / "net.d")
    (tmp_path / "file").write_text("")
    with pytest.raises(PermanentError, match=r"cannot install .*/file/bin/overlay \(--bin-dir"):
        install(opts)


def _leaves() -> list[tuple[str, tuple[str, ...], argparse.ArgumentParser]]:
    return [(prog, path, p) for prog, build in PARSERS.items()
            for path, p in cli.commands(build())]


def _id(leaf: tuple[str, tuple[str, ...], argparse.ArgumentParser]) -> str:
    return " ".join((leaf[0], *leaf[1]))


@pytest.mark.parametrize("leaf", _leaves(), ids=_id)
def test_every_flag_explains_itself_with_its_default(leaf):
    _prog, path, parser = leaf
    assert parser.description or path == (), f"{_id(leaf)} has no description"
    unexplained, no_default = [], []
    for action in cli.options(parser):
        flag = action.option_strings[-1]
        if action.help == argparse.SUPPRESS:
            continue  # hidden on purpose (accepted for old manifests)
        if not action.help:
            unexplained.append(flag)
            continue
        default = action.default
        if default in (None, False, True, argparse.SUPPRESS) or action.nargs == 0:
            continue
        if "%(default)" not in action.help and "default:" not in action.help:
            no_default.append(flag)
    assert not unexplained, f"{_id(leaf)}: flags without help: {unexplained}"
    assert not no_default, f"{_id(leaf)}: help does not show the default: {no_default}"
    parser.format_help()  # a stray % in a help text breaks --help; this finds it


def test_the_etcd_endpoints_variable_is_documented():
    for build in PARSERS.values():
        parser = build()
        texts = [parser.format_help(), *(p.format_help() for _, p in cli.commands(parser))]
        assert any("OVERLAYD_ETCD_ENDPOINTS" in t for t in texts), parser.prog
    init = dict(cli.commands(overlayctl_parser()))[("network", "init")]
    assert "OVERLAYD_ETCD_ENDPOINTS" in init.format_help()


def test_the_endpoints_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("OVERLAYD_ETCD_ENDPOINTS", "http://10.1.2.3:2379")
    args = overlayctl_parser().parse_args(["leases"])
    assert args.etcd_endpoints == "http://10.1.2.3:2379"


def test_the_sandbox_name_rule_is_said_and_enforced(capsys):
    for name in ("", "Demo", "a" * 13, "a-b", "../x"):
        with pytest.raises(SystemExit) as e:
            overlayctl_parser().parse_args(["sandbox", "down", "--name", name])
        assert e.value.code == 2
        assert "1 to 12 lowercase letters or digits" in capsys.readouterr().err
    up = dict(cli.commands(overlayctl_parser()))[("sandbox", "up")]
    assert "1 to 12 lowercase letters or digits" in up.format_help()


def test_overlayd_refuses_flags_that_cannot_work_before_starting(capsys):
    from overlay.agent.main import options_from_args

    parser = overlayd_parser()
    for argv, flag in ((["--grpc-listen", "7946"], "--grpc-listen"),
                       (["--health-addr", "x:0"], "--health-addr"),
                       (["--public-ip", "::1"], "--public-ip"),
                       (["--public-ip", "10.0.0"], "--public-ip"),
                       (["--public-ip", "fd30::11", "--underlay-family", "ipv4"], "--public-ip"),
                       (["--vtep-mac", "01:00:00:00:00:01"], "--vtep-mac"),
                       (["--node-name", "a b"], "--node-name"),
                       (["--iface", "a" * 16], "--iface"),
                       (["--iface-regex", "("], "--iface-regex"),
                       (["--probe-timeout", "5"], "--probe-timeout")):
        with pytest.raises(ConfigError) as e:
            options_from_args(parser.parse_args(argv))
        assert e.value.field == flag
    for argv in (["--lease-ttl", "1"], ["--etcd-timeout", "0"], ["--mtu", "100"],
                 ["--reconcile-interval", "inf"], ["--run-dir", ""]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert f"argument {argv[0]}:" in capsys.readouterr().err


def test_network_init_flags_name_the_flag_for_each_family():
    from overlay.ctl.main import config_from_flags

    def cfg(*argv: str):
        return config_from_flags(overlayctl_parser().parse_args(["network", "init", *argv]))

    with pytest.raises(ConfigError, match="give an IPv6 pod network with --ipv6-cidr") as e:
        cfg("--cidr", "fd00:1::/64")
    assert e.value.field == "--cidr"
    with pytest.raises(ConfigError) as e:
        cfg("--ipv6-subnet-len", "64")
    assert e.value.field == "--ipv6-subnet-len"
    dual = cfg("--ipv6-cidr", "fd00:10:244::/56")
    assert str(dual.network) == "10.244.0.0/16" and str(dual.ipv6_network) == "fd00:10:244::/56"
    v6only = cfg("--no-ipv4", "--ipv6-cidr", "fd00:10:244::/56")
    assert v6only.network is None and v6only.ipv6_subnet_len == 64
