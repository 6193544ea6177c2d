"""etcd access for the agent and the CLI, through etcd3aio.

Every etcd3aio / grpc exception is translated here: unreachable, timed out or
leaderless -> TemporaryError; refused credentials -> PermanentError. Nothing
above this module imports etcd3aio or grpc for etcd.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from overlay import cli
from overlay.errors import ConfigError, NotFound, PermanentError, TemporaryError
from overlay.model import (
    IPNet,
    LeaseEntry,
    LeaseEvent,
    LeaseSnapshot,
    NetworkConfig,
    NodeRecord,
    config_key,
    key_role,
    normalize_prefix,
    parse_subnet_key,
    subnet_key,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EtcdOptions:
    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    prefix: str = "/overlay/"
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    server_name: str | None = None
    timeout: float = 5.0
    # ca.crt, tls.crt, tls.key, each used if present (a Kubernetes Secret volume,
    # optional: empty or absent means plain http); the *file options win.
    tls_dir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", normalize_prefix(self.prefix))


ENDPOINTS_ENV = "OVERLAYD_ETCD_ENDPOINTS"


def add_arguments(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The etcd flags of overlayd and of overlayctl's etcd commands, in a group of their own."""
    g = p.add_argument_group("etcd")
    g.add_argument("--etcd-endpoints", metavar="URLS",
                   default=os.environ.get(ENDPOINTS_ENV, "http://127.0.0.1:2379"),
                   help="comma-separated etcd client URLs, http://HOST:PORT or "
                   "https://HOST:PORT, HOST an IPv4 address or a name; the environment "
                   f"variable {ENDPOINTS_ENV} supplies the default (default: %(default)s)")
    g.add_argument("--etcd-prefix", default="/overlay/",
                   help="key prefix of the network config and leases (default: %(default)s)")
    g.add_argument("--etcd-cafile", metavar="FILE",
                   help="CA bundle (PEM) to verify etcd's certificate; needed for https:// "
                   "endpoints (default: none, plain http)")
    g.add_argument("--etcd-certfile", metavar="FILE",
                   help="client certificate (PEM) for etcd, with --etcd-keyfile (default: none)")
    g.add_argument("--etcd-keyfile", metavar="FILE",
                   help="the client certificate's private key (PEM) (default: none)")
    g.add_argument("--etcd-server-name", metavar="NAME",
                   help="name to verify in etcd's certificate (default: the endpoint host; "
                   "localhost with several endpoints)")
    g.add_argument("--etcd-tls-dir", metavar="DIR",
                   help="use ca.crt, tls.crt and tls.key from DIR where present (a Kubernetes "
                   "Secret, optional: none there means plain http); the three flags above "
                   "win (default: none)")
    g.add_argument("--etcd-timeout", type=cli.seconds, default=5.0, metavar="SECONDS",
                   help="timeout of one etcd request, more than 0 (default: %(default)s)")
    return g


def options_from_args(args: argparse.Namespace) -> EtcdOptions:
    return EtcdOptions(endpoints=(args.etcd_endpoints,), prefix=args.etcd_prefix,
                       cafile=args.etcd_cafile, certfile=args.etcd_certfile,
                       keyfile=args.etcd_keyfile, server_name=args.etcd_server_name,
                       timeout=args.etcd_timeout, tls_dir=args.etcd_tls_dir)


def parse_endpoints(raw: str | list[str] | tuple[str, ...]
                    ) -> tuple[tuple[tuple[str, int], ...], bool]:
    """'http://10.0.0.1:2379,https://h:2379' -> ((('10.0.0.1', 2379), ('h', 2379)), tls?).

    Syntax only: a malformed endpoint is invalid configuration, but a host
    name that does not resolve (yet) is not, see `resolve_endpoints`.
    Literal addresses of both families in one list are refused (one resolver).
    """
    items = [raw] if isinstance(raw, str) else list(raw)
    parts = [p.strip() for item in items for p in item.split(",") if p.strip()]
    if not parts:
        raise ConfigError("--etcd-endpoints", "no endpoint given")
    out = []
    tls = False
    for p in parts:
        u = urlsplit(p if "://" in p else f"//{p}")
        if u.scheme == "https":
            tls = True
        elif u.scheme not in ("", "http"):
            raise ConfigError("--etcd-endpoints", f"{p!r}: unsupported scheme {u.scheme!r} "
                              "(use http:// or https://)")
        if u.path not in ("", "/") or u.query or u.fragment or u.username is not None:
            raise ConfigError("--etcd-endpoints", f"{p!r}: give only the scheme, host and "
                              "port, such as http://10.0.0.1:2379")
        try:
            host, port = u.hostname, u.port
        except ValueError:
            raise ConfigError("--etcd-endpoints", f"{p!r} is not HOST:PORT with a port "
                              "between 1 and 65535") from None
        if port == 0:
            raise ConfigError("--etcd-endpoints", f"{p!r}: port 0 cannot be connected to")
        if not host:
            raise ConfigError("--etcd-endpoints", f"{p!r} is not HOST:PORT")
        if _literal(host) is None:
            try:
                host.encode("idna")
            except UnicodeError:
                raise ConfigError("--etcd-endpoints", f"cannot resolve {host!r}: not a valid "
                                  "host name") from None
        out.append((host, port or 2379))
    _one_family(_literal(h) for h, _ in out)
    return tuple(out), tls


def _literal(host: str) -> int | None:
    """4 or 6 for an address literal, None for a name."""
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def _one_family(versions: Iterable[int | None]) -> None:
    if len({v for v in versions if v is not None}) > 1:
        raise ConfigError("--etcd-endpoints", "mixes IPv4 and IPv6 endpoints; list the "
                          "members by addresses of one family")


async def resolve_endpoints(hosts: tuple[tuple[str, int], ...], timeout: float
                            ) -> tuple[str, ...]:
    """('a.b.c.d:port', ...) or ('[fd30::11]:port', ...) for grpc's ipv4:/ipv6:
    resolvers, which want literal addresses; a name gets its IPv4 address if it has
    one, else its IPv6 address.

    A name that does not resolve is a TemporaryError: at boot, DNS or the
    /etc/hosts entry often comes after the agent starts (it is retried).
    """
    loop = asyncio.get_running_loop()
    out: list[tuple[int, str]] = []
    for host, port in hosts:
        version = _literal(host)
        if version is not None:
            out.append((version, f"[{host}]:{port}" if version == 6 else f"{host}:{port}"))
            continue
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
        except (OSError, UnicodeError, TimeoutError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else \
                (getattr(exc, "strerror", None) or str(exc))
            raise TemporaryError(f"cannot resolve etcd host {host!r}: {why}") from None
        v4 = [i[4][0] for i in infos if i[0] == socket.AF_INET]
        v6 = [i[4][0] for i in infos if i[0] == socket.AF_INET6]
        if v4:
            out.append((4, f"{v4[0]}:{port}"))
        elif v6:
            out.append((6, f"[{v6[0]}]:{port}"))
        else:
            raise TemporaryError(f"cannot resolve etcd host {host!r}: no IPv4 or IPv6 "
                                 "address")
    _one_family(v for v, _ in out)
    return tuple(e for _, e in out)


class WatchLost(TemporaryError):
    """The watch cannot continue from where it was (compacted, cancelled): relist."""


def tls_hint(details: str) -> str:
    """A plain-words reason for a TLS failure hidden in a gRPC error, or ''."""
    d = details.lower()
    if "tsi_data_corrupted" in d or "unwrap failed" in d or "bad_certificate" in d \
            or "certificate required" in d:
        return ("etcd closed the TLS connection: it did not accept our client certificate "
                "(missing, expired, or not signed by the CA etcd trusts; see --etcd-certfile "
                "and --etcd-keyfile)")
    if "certificate_verify_failed" in d or "handshake failed" in d \
            or "ssl_transport_security" in d:
        return ("cannot verify etcd's certificate with --etcd-cafile (wrong CA, or the "
                "certificate does not name this endpoint; see --etcd-server-name)")
    return ""


def reach_hint(details: str, where: str) -> str:
    """A plain-words reason why etcd at `where` could not be asked, from gRPC's details
    (a TLS failure, nothing listening, something that is not etcd), or ''."""
    d = details.lower()
    hint = tls_hint(details)
    if hint:
        return hint
    if "connection refused" in d:
        return f"nothing listens at {where}: is etcd running there? (see --etcd-endpoints)"
    if "http/2" in d or "settings frame" in d or "http1" in d:
        return (f"{where} answered, but it is not etcd: it does not speak gRPC over HTTP/2 "
                "(a web server on the etcd port?)")
    if "unimplemented" in d or "method not found" in d or "status: 404" in d:
        return (f"{where} answered, but it is not etcd: it does not serve etcd's v3 API "
                "(another gRPC or HTTP/2 server on the etcd port?)")
    if "no route to host" in d or "network is unreachable" in d:
        return f"no route to {where}"
    if "socket closed" in d or "connection reset" in d or "end of tcp stream" in d:
        return (f"{where} closed the connection (if etcd serves https, use https:// and "
                "--etcd-cafile)")
    return ""


def _translate(op: str, exc: BaseException, where: str = "etcd") -> Exception:
    import grpc
    from etcd3aio import (
        EtcdConnectionError,
        EtcdPermissionDeniedError,
        EtcdTransientError,
        EtcdUnauthenticatedError,
    )

    if isinstance(exc, EtcdUnauthenticatedError | EtcdPermissionDeniedError):
        return PermanentError(f"etcd refused {op}: {exc}")
    if isinstance(exc, EtcdConnectionError | EtcdTransientError):
        hint = reach_hint(str(exc), where)
        return TemporaryError(f"etcd {op} failed: {hint}" if hint else f"etcd {op} failed: {exc}")
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return TemporaryError(f"etcd {op} timed out (no answer from {where} within "
                              "--etcd-timeout)")
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return PermanentError(f"etcd refused {op}: {exc.details()}")
        hint = reach_hint(f"{code.name} {exc.details() or ''}", where)
        if hint:
            return TemporaryError(f"etcd {op} failed: {hint}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return TemporaryError(f"etcd {op} timed out (no answer from {where} within "
                                  "--etcd-timeout)")
        return TemporaryError(f"etcd {op} failed: {code.name} {exc.details() or ''}".strip())
    if isinstance(exc, OSError):
        return TemporaryError(f"etcd {op} failed: {exc}")
    return TemporaryError(f"etcd {op} failed: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _errors(op: str, where: str = "etcd") -> Iterator[None]:
    try:
        yield
    except (TemporaryError, PermanentError):
        raise
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise _translate(op, exc, where) from exc


def _read(path: str | None, flag: str, pem: str) -> bytes | None:
    """The PEM file a flag names; ConfigError unless it holds a `pem` block (CERTIFICATE,
    PRIVATE KEY): gRPC would only find out at the TLS handshake, in its own words."""
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(flag, f"cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in data or pem.encode() + b"-----" not in data:
        raise ConfigError(flag, f"{path} holds no PEM {pem.lower()} "
                          f"(-----BEGIN ...{pem}-----)")
    return data


def tls_files(opts: EtcdOptions) -> tuple[str | None, str | None, str | None]:
    """(cafile, certfile, keyfile): the options, else what --etcd-tls-dir holds."""
    files = [opts.cafile, opts.certfile, opts.keyfile]
    if opts.tls_dir:
        for i, name in enumerate(("ca.crt", "tls.crt", "tls.key")):
            path = Path(opts.tls_dir) / name
            if files[i] is None and path.is_file():
                files[i] = str(path)
    return files[0], files[1], files[2]


def _deadline_only(svc: Any) -> None:
    """Bound etcd3aio service `svc`'s unary calls by their gRPC deadline alone.

    etcd3aio 0.3.0 also wraps each call in asyncio.timeout() of the same length; that
    timer fires first, and a grpc.aio call cancelled from asyncio leaks its batch's
    native memory (grpc issue 43360): about 1 KB for every etcd request that timed out,
    measured, so an agent cut off from etcd's quorum grew for as long as it lasted. The
    same retries and error mapping; each attempt's deadline is the time left.
    """
    import grpc

    async def rpc(call: Any, request: Any, *, operation: str, timeout: float | None = None,
                  max_attempts: int | None = None) -> Any:
        attempts = svc._max_attempts if max_attempts is None else max_attempts
        end = None if timeout is None else time.monotonic() + timeout
        backoff = svc._initial_backoff_seconds
        for attempt in range(1, attempts + 1):
            left = None if end is None else max(end - time.monotonic(), 0.001)
            try:
                return await call(request, metadata=svc._metadata or None, timeout=left)
            except grpc.aio.AioRpcError as exc:
                last = attempt == attempts or (end is not None
                                               and end - time.monotonic() <= backoff)
                if last and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise TimeoutError(operation) from exc
                if last or not svc._is_transient_error(exc):
                    svc._raise_rpc_exception(exc, operation, attempts=attempt)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, svc._max_backoff_seconds)
        raise AssertionError("unreachable")

    svc._rpc = rpc


def _grpc_words(exc: BaseException) -> str:
    """gRPC's own words for why a call failed (the hints for a first connection, such
    as https?, mislead about one that worked until now). A function, not inline: a
    local holding the error in a suspended generator would keep its traceback, and
    the failed call with it, alive."""
    import grpc

    cause = exc.__cause__
    if isinstance(cause, grpc.aio.AioRpcError):
        return f"{cause.code().name}: {cause.details()}"
    return str(exc)


class EtcdStore:
    WATCH_BACKOFF = 0.2  # before resuming a broken watch; doubles while streams keep breaking
    WATCH_BACKOFF_MAX = 2.0

    def __init__(self, opts: EtcdOptions) -> None:
        self.opts = opts
        self.prefix = opts.prefix
        self._hosts, scheme_tls = parse_endpoints(opts.endpoints)
        cafile, certfile, keyfile = tls_files(opts)
        ca = _read(cafile, "--etcd-cafile", "CERTIFICATE")
        cert = _read(certfile, "--etcd-certfile", "CERTIFICATE")
        key = _read(keyfile, "--etcd-keyfile", "PRIVATE KEY")
        if (cert is None) != (key is None):
            raise ConfigError("--etcd-certfile", "give both --etcd-certfile and --etcd-keyfile")
        if cert is not None and ca is None:
            raise ConfigError("--etcd-cafile", "a client certificate needs --etcd-cafile too")
        if scheme_tls and ca is None:
            where = f" (or ca.crt in --etcd-tls-dir {opts.tls_dir})" if opts.tls_dir else ""
            raise ConfigError("--etcd-cafile", f"https:// endpoints need --etcd-cafile{where}")
        self._tls_args: dict[str, Any] = {}
        if ca is not None:
            server_name = opts.server_name
            if server_name is None and len(self._hosts) > 1:
                server_name = "localhost"
            self._tls_args = dict(ca_cert=ca, cert_key=key, cert_chain=cert,
                                  tls_server_name=server_name)
        self.endpoints: tuple[str, ...] = ()
        self.tls = ca is not None
        self._client: Any = None
        self._connected = False

    async def connect(self) -> None:
        """Resolve the endpoints and open the channel; every request does this first, so
        a store whose etcd host did not resolve yet keeps trying on each use."""
        if self._connected:
            return
        from etcd3aio import Etcd3Client

        self.endpoints = await resolve_endpoints(self._hosts, self.opts.timeout)
        self._client = Etcd3Client(
            list(self.endpoints),
            rpc_max_attempts=2,
            **self._tls_args,
        )
        if self.endpoints[0].startswith("["):
            # etcd3aio always names grpc's ipv4: resolver, which refuses IPv6 literals.
            self._client._manager.target = "ipv6:" + ",".join(self.endpoints)
        with self._errors("connect"):
            await self._client.connect()
        for svc in (self._client.kv, self._client.lease, self._client.cluster,
                    self._client.maintenance, self._client.auth):
            _deadline_only(svc)
        self._connected = True

    async def close(self) -> None:
        if self._connected:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._connected = False

    async def __aenter__(self) -> EtcdStore:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _errors(self, op: str) -> contextlib.AbstractContextManager[None]:
        # The addresses asked, once resolved; the names given until then.
        where = self.endpoints or tuple(f"[{h}]:{port}" if _literal(h) == 6 else f"{h}:{port}"
                                        for h, port in self._hosts)
        return _errors(op, ", ".join(where))

    @property
    def _kv(self) -> Any:
        assert self._client.kv is not None, "call connect() first"
        return self._client.kv

    @property
    def _lease(self) -> Any:
        assert self._client.lease is not None, "call connect() first"
        return self._client.lease

    # --- health -----------------------------------------------------------

    async def ping(self) -> int:
        """The current revision; raises TemporaryError if etcd cannot serve reads."""
        await self.connect()
        with self._errors("status"):
            resp = await self._kv.get(config_key(self.prefix), timeout=self.opts.timeout)
            return int(resp.header.revision)

    # --- network config ---------------------------------------------------

    async def get_config(self) -> NetworkConfig:
        await self.connect()
        key = config_key(self.prefix)
        with self._errors(f"read {key}"):
            resp = await self._kv.get(key, timeout=self.opts.timeout)
        if not resp.kvs:
            raise NotFound(f"no network config at {key}; run `overlayctl network init`")
        try:
            return NetworkConfig.from_json(resp.kvs[0].value)
        except ConfigError as exc:
            raise ConfigError(exc.field, f"{exc.message} (in {key})") from None

    async def watch_config(self, start_revision: int) -> AsyncIterator[int]:
        """The revision of each change to the config key from `start_revision` on.

        A watch instead of polling: at 5,000 nodes, reading the key every few
        seconds from every node is a thousand reads a second for a key that
        almost never changes. Raises WatchLost like `watch_leases`.
        """
        async with contextlib.aclosing(self._watch(config_key(self.prefix), None,
                                                   start_revision)) as responses:
            async for resp in responses:
                if resp.events:
                    yield max(int(ev.kv.mod_revision) for ev in resp.events)

    async def _watch(self, key: str, range_end: bytes | None, start_revision: int
                     ) -> AsyncGenerator[Any, None]:
        """Watch responses from `start_revision` on.

        A stream that breaks after etcd accepted it (a member restarted, a failover) is
        resumed from the revision after the last event seen, on whichever member the
        channel reaches, for up to --etcd-timeout: no relisting, so a member's restart
        does not make every agent it served read every lease at once. WatchLost when
        the history needed is gone or the server cancelled (the caller relists);
        TemporaryError when etcd takes no watch (after a break: for that long).

        Our own streams, not etcd3aio's watch(): that one fed each stream from a
        generator that never ends, and every stream that broke left grpc's task
        consuming it pending until the garbage collector destroyed it mid-flight,
        with about 3 KB of native memory, measured. Here the create request is
        written, the stream is read, and a broken one is cancelled before the next.
        """
        await self.connect()
        import grpc
        from etcd3aio._protobuf import WatchCreateRequest, WatchRequest

        svc = self._client.watch
        next_revision = start_revision
        backoff = self.WATCH_BACKOFF
        resume_until: float | None = None  # set while a broken watch is being resumed
        while True:
            call = svc._stub.Watch(metadata=svc._metadata or None)
            created = False
            try:
                with self._errors("watch"):
                    await call.write(WatchRequest(create_request=WatchCreateRequest(
                        key=key.encode(), range_end=range_end or b"",
                        start_revision=next_revision)))
                    while True:
                        resp = await call.read()
                        if resp is grpc.aio.EOF:
                            raise TemporaryError("the server ended the watch stream")
                        if resp.compact_revision:
                            raise WatchLost(f"history compacted up to {resp.compact_revision}")
                        if resp.canceled:
                            raise WatchLost("watch cancelled: "
                                            f"{resp.cancel_reason or 'no reason'}")
                        created = True
                        backoff, resume_until = self.WATCH_BACKOFF, None
                        if resp.events:
                            next_revision = max(next_revision, 1 + max(
                                int(ev.kv.mod_revision) for ev in resp.events))
                        yield resp
            except WatchLost:
                raise
            except TemporaryError as exc:
                if created:
                    log.info("etcd watch of %s broke (%s); resuming from revision %d",
                             key, _grpc_words(exc), next_revision)
                    resume_until = time.monotonic() + self.opts.timeout
                elif resume_until is None or time.monotonic() > resume_until:
                    raise  # etcd takes no watch at all (for --etcd-timeout after a break)
            finally:
                call.cancel()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.WATCH_BACKOFF_MAX)

    async def put_config(self, cfg: NetworkConfig, *, overwrite: bool = False) -> bool:
        """Write the config; without `overwrite`, only if none exists. True if written."""
        await self.connect()
        key = config_key(self.prefix)
        kv = self._kv
        with self._errors(f"write {key}"):
            if overwrite:
                await kv.put(key, cfg.to_json(), timeout=self.opts.timeout)
                return True
            resp = await kv.txn(
                compare=[kv.txn_compare_create_revision(key, 0)],
                success=[kv.txn_op_put(key, cfg.to_json())],
                timeout=self.opts.timeout,
            )
            return bool(resp.succeeded)

    # --- leases -----------------------------------------------------------

    def _decode(self, kv: Any) -> tuple[IPNet | None, LeaseEntry | None, str, bool]:
        """(key subnet, entry, why invalid, is an IPv6 claim) of one lease key."""
        key = kv.key.decode(errors="replace")
        subnet = parse_subnet_key(self.prefix, key)
        if subnet is None:
            return None, None, f"{key}: not a subnet key", False
        try:
            rec = NodeRecord.from_json(kv.value)
        except ConfigError as exc:
            return subnet, None, f"{key}: {exc}", False
        role = key_role(subnet, rec)
        if not role:
            return subnet, None, f"{key}: value names subnet {rec.key_subnet}", False
        return subnet, LeaseEntry(rec, int(kv.mod_revision), int(kv.lease)), "", role == "claim"

    async def list_leases(self) -> LeaseSnapshot:
        await self.connect()
        from etcd3aio import prefix_range_end

        head = f"{self.prefix}subnets/"
        with self._errors(f"list {head}"):
            resp = await self._kv.get(head, range_end=prefix_range_end(head),
                                      timeout=self.opts.timeout)
        entries: dict[IPNet, LeaseEntry] = {}
        claims: dict[IPNet, LeaseEntry] = {}
        invalid = []
        for kv in resp.kvs:
            subnet, entry, err, claim = self._decode(kv)
            if entry is not None and subnet is not None:
                (claims if claim else entries)[subnet] = entry
            else:
                invalid.append((kv.key.decode(errors="replace"), err))
        return LeaseSnapshot(int(resp.header.revision), entries, invalid, claims)

    async def watch_leases(self, start_revision: int) -> AsyncIterator[list[LeaseEvent]]:
        """Batches of lease changes from `start_revision` on.

        Raises WatchLost when the history needed is gone (compacted) or the
        server cancelled the watch: the caller relists and starts again.
        """
        from etcd3aio import prefix_range_end

        head = f"{self.prefix}subnets/"
        async with contextlib.aclosing(self._watch(head, prefix_range_end(head),
                                                   start_revision)) as responses:
            async for resp in responses:
                batch = []
                for ev in resp.events:
                    key = ev.kv.key.decode(errors="replace")
                    subnet = parse_subnet_key(self.prefix, key)
                    if subnet is None:
                        continue
                    if ev.type == 1:  # DELETE
                        batch.append(LeaseEvent(subnet, None, int(ev.kv.mod_revision)))
                        continue
                    _, entry, err, claim = self._decode(ev.kv)
                    if entry is None:
                        log.warning("ignoring invalid lease %s", err)
                        batch.append(LeaseEvent(subnet, None, int(ev.kv.mod_revision)))
                        continue
                    batch.append(LeaseEvent(subnet, entry, int(ev.kv.mod_revision), claim))
                if batch:
                    yield batch

    async def grant(self, ttl: int) -> int:
        await self.connect()
        with self._errors("grant lease"):
            resp = await self._lease.grant(ttl, timeout=self.opts.timeout)
            return int(resp.ID)

    async def keepalive(self, lease_id: int) -> int:
        """Renew once; the remaining TTL, <= 0 if the lease no longer exists."""
        from etcd3aio._protobuf import LeaseKeepAliveRequest

        await self.connect()

        async def one() -> AsyncIterator[Any]:
            yield LeaseKeepAliveRequest(ID=lease_id)

        # One request, then the stream is read to its end: etcd ends it when we are done
        # sending. Neither cancelled nor timed out from asyncio (a cancelled grpc.aio call
        # leaks native memory, see _deadline_only): the gRPC deadline bounds it.
        lease = self._lease
        ttl: int | None = None
        with self._errors("renew lease"):
            call = lease._stub.LeaseKeepAlive(one(), metadata=lease._metadata or None,
                                              timeout=self.opts.timeout)
            async for resp in call:
                if ttl is None:
                    ttl = int(resp.TTL)
        if ttl is None:
            raise TemporaryError("etcd renew lease: stream closed without an answer")
        return ttl

    async def revoke(self, lease_id: int) -> None:
        await self.connect()
        with self._errors("revoke lease"):
            await self._lease.revoke(lease_id, timeout=self.opts.timeout)

    async def create_lease(self, record: NodeRecord, lease_id: int) -> int | None:
        """Claim the record's subnets (every key of its lease) if nobody holds any of them.
        The new mod_revision, or None."""
        return await self.write_lease(record, lease_id, dict.fromkeys(record.lease_keys, 0))

    async def replace_lease(self, record: NodeRecord, lease_id: int,
                            expect_mod: int | Mapping[IPNet, int],
                            drop: Mapping[IPNet, int] | None = None) -> int | None:
        """Rewrite our own lease (new etcd lease, new VTEP...) if unchanged since we read it.

        `expect_mod`: the mod_revision of each existing key (an int: of the record's
        own key); a key of the record not named must not exist. `drop`: other keys
        of ours to delete in the same transaction (mod_revision, or 0: whatever it is).
        """
        expect = ({record.key_subnet: expect_mod} if isinstance(expect_mod, int)
                  else dict(expect_mod))
        for k in record.lease_keys:
            expect.setdefault(k, 0)
        return await self.write_lease(record, lease_id, expect, drop or {})

    async def write_lease(self, record: NodeRecord, lease_id: int, expect: Mapping[IPNet, int],
                          drop: Mapping[IPNet, int] | None = None) -> int | None:
        """One transaction: every key of `record` must be as `expect` says (its
        mod_revision, 0: absent), then all of them get the record, bound to `lease_id`,
        and the keys in `drop` go."""
        await self.connect()
        kv = self._kv
        compare = []
        for subnet, mod in {**(drop or {}), **expect}.items():
            key = subnet_key(self.prefix, subnet)
            if mod:
                compare.append(_compare_mod(key, mod))
            elif subnet in expect:
                compare.append(kv.txn_compare_create_revision(key, 0))
        value = record.to_json()
        success = [kv.txn_op_put(subnet_key(self.prefix, k), value, lease=lease_id)
                   for k in record.lease_keys]
        success += [kv.txn_op_delete(subnet_key(self.prefix, k)) for k in (drop or {})
                    if k not in record.lease_keys]
        what = subnet_key(self.prefix, record.key_subnet)
        with self._errors(f"claim {what}"):
            resp = await kv.txn(compare=compare, success=success, timeout=self.opts.timeout)
        return int(resp.header.revision) if resp.succeeded else None

    async def delete_lease(self, subnet: IPNet | NodeRecord,
                           expect_mod: int | None = None) -> bool:
        """Delete one lease: a subnet's key, or every key of a record (its IPv6 claim too);
        with `expect_mod`, only if the (record's) key is unchanged since then."""
        await self.connect()
        keys = subnet.lease_keys if isinstance(subnet, NodeRecord) else (subnet,)
        main = subnet_key(self.prefix, keys[0])
        kv = self._kv
        with self._errors(f"delete {main}"):
            if expect_mod is None and len(keys) == 1:
                resp = await kv.delete(main, timeout=self.opts.timeout)
                return bool(resp.deleted)
            resp = await kv.txn(
                compare=[_compare_mod(main, expect_mod)] if expect_mod is not None else [],
                success=[kv.txn_op_delete(subnet_key(self.prefix, k)) for k in keys],
                timeout=self.opts.timeout,
            )
            return bool(resp.succeeded)

    async def put_raw(self, key: str, value: bytes | str) -> None:
        await self.connect()
        with self._errors(f"write {key}"):
            await self._kv.put(key, value, timeout=self.opts.timeout)


def _compare_mod(key: str, mod: int) -> Any:
    from etcd3aio._protobuf import Compare

    return Compare(key=key.encode(), target=Compare.MOD, result=Compare.EQUAL, mod_revision=mod)
