"""Network namespaces without forking.

A netlink socket belongs to the namespace it was created in, whatever the
thread does afterwards; setns(CLONE_NEWNET) affects only the calling thread.
So entering the target namespace for the instant of socket() gives a socket
that talks to it, from a process that stays where it is. (pyroute2's own
netns support forks a helper process per socket: milliseconds we do not
have on the CNI path.)
"""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0

T = TypeVar("T")

_libc: ctypes.CDLL | None = None


def _setns(fd: int, nstype: int) -> None:
    native = getattr(os, "setns", None)  # Python >= 3.12
    if native is not None:
        native(fd, nstype)
        return
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def run_in_netns(ns_fd: int, fn: Callable[[], T]) -> T:
    """Run `fn` with this thread inside the namespace `ns_fd`, then come back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(ns_fd, CLONE_NEWNET)
        try:
            return fn()
        finally:
            _setns(home, CLONE_NEWNET)
    finally:
        os.close(home)


def netlink_socket(ns_fd: int | None = None) -> socket.socket:
    """A NETLINK_ROUTE datagram socket in namespace `ns_fd` (ours if None)."""

    def make() -> socket.socket:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)

    return make() if ns_fd is None else run_in_netns(ns_fd, make)


def same_netns(ns_fd: int) -> bool:
    """True if `ns_fd` is the namespace this thread is in."""
    st = os.fstat(ns_fd)
    mine = os.stat("/proc/thread-self/ns/net")
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
