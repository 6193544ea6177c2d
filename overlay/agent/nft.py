"""Running `nft`: a script on stdin, or a listing. Both nftables users of the agent
(masquerading and the VXLAN filter) go through a `Runner`; `NftCommand` is the real
one, and the unit tests give them one that only records."""

from __future__ import annotations

import asyncio
import shutil
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
