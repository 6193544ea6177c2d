"""Running `nft`: a script on stdin, or a listing. Both nftables users of the agent
(masquerading and the VXLAN filter) go through a `Runner`; `NftCommand` is the real
one, and the unit tests give them one that only records."""

from __future__ import annotations

import asyncio
import shutil
import socket
from typing import Protocol

from overlay.errors import TemporaryError

NFT = shutil.which("nft") or "/usr/sbin/nft"


class Runner(Protocol):
    async def run(self, script: str) -> None: ...

    async def listing(self, *args: str) -> str | None: ...


class NftCommand:
    async def run(self, script: str) -> None:
        """Apply `script` as one nft transaction; TemporaryError with nft's words if refused."""
        try:
            proc = await asyncio.create_subprocess_exec(
                NFT, "-f", "-", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            raise TemporaryError(f"cannot run nft: {exc}") from None
        _, err = await proc.communicate(script.encode())
        if proc.returncode != 0:
            raise TemporaryError(f"nft failed: {err.decode(errors='replace').strip()}")

    async def listing(self, *args: str) -> str | None:
        """`nft list <args>`, or None if it fails (no such table, or no nft)."""
        try:
            proc = await asyncio.create_subprocess_exec(
                NFT, "list", *args, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
        except OSError:
            return None
        out, _ = await proc.communicate()
        return out.decode(errors="replace") if proc.returncode == 0 else None


NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7


class Monitor:
    """Change notifications of nftables in this network namespace: the kernel's
    NFNLGRP_NFTABLES multicast group, which `nft monitor` reads. Any change to any
    table, ours included, wakes `changed()`; the messages are not parsed (the caller
    lists what it cares about)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK,
                                   socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                   NETLINK_NETFILTER)
        try:
            self._sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
        except OSError:
            self._sock.close()
            raise

    async def changed(self, settle: float = 0.05) -> None:
        """Until something changed; then `settle` s more, to take a burst as one."""
        loop = asyncio.get_running_loop()
        fd = self._sock.fileno()
        ready: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        await asyncio.sleep(settle)
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                if not self._sock.recv(65536):
                    return
            except BlockingIOError:
                return
            except OSError:  # ENOBUFS: notifications were lost; what we do next covers them
                continue

    def close(self) -> None:
        self._sock.close()
