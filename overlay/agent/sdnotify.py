"""sd_notify(3) with the standard library: tell systemd how start-up goes.

With `Type=notify` systemd puts the path of a datagram socket in
$NOTIFY_SOCKET and waits for `READY=1` before it considers overlayd started
(so units ordered after it, such as a kubelet, start only once pods can get
an address). `STATUS=` lines show in `systemctl status`; `STOPPING=1` says
a stop is under way. A name starting with "@" is in the abstract namespace
(the "@" stands for the leading NUL byte). Without $NOTIFY_SOCKET (not run
by systemd) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"


def address(value: str) -> str | bytes | None:
    """The socket address for a $NOTIFY_SOCKET value (None if unusable)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock: addresses (systemd >= 253) are not used for services


def message(**fields: object) -> bytes:
    """`message(ready=1, status="x")` -> b"READY=1\\nSTATUS=x"; newlines in values are
    flattened, since each line is one assignment."""
    lines = []
    for key, value in fields.items():
        text = str(value).replace("\n", " ")
        lines.append(f"{key.upper()}={text}")
    return "\n".join(lines).encode()


class Notifier:
    """Sends notifications to the socket named in the environment at creation."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        value = (os.environ if env is None else env).get(ENV, "")
        self.addr = address(value) if value else None
        if value and self.addr is None:
            log.warning("ignoring %s=%r: not a unix socket path", ENV, value)
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.addr is not None

    def notify(self, **fields: object) -> bool:
        """Send one datagram; True if it was sent. Never raises: systemd being
        unreachable must not stop the agent."""
        if self.addr is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.addr)
                s.sendall(message(**fields))
            return True
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd through %s: %s", ENV, exc)
                self._warned = True
            return False

    def ready(self, status: str) -> bool:
        return self.notify(ready=1, status=status, mainpid=os.getpid())

    def status(self, status: str) -> bool:
        return self.notify(status=status)

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify(stopping=1, status=status)
