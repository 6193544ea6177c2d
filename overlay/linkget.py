"""One link by name or index through a pyroute2 socket, without leaking its ACK.

pyroute2 (0.9.7, the newest; older 0.9 releases not checked) sends RTM_GETLINK with
NLM_F_ACK and returns at the reply; the kernel's ACK that follows finds no one
waiting for its sequence number and is parked in the socket's catch-all queue
(sequence 0), which nothing reads unless the socket is bound to multicast groups,
and ours never are. One message per call for the life of the socket: the agent
asks for links every reconcile, so under churn its memory grew by about 5 MiB/h
(each parked ACK is a small bytes object cut from a large receive buffer, which
pins heap pages; found with the chaos soak). Every `link("get")` and
`link_lookup` of a long-lived socket goes through `get_link`.
"""

from __future__ import annotations

import errno
from typing import Any


def drop_strays(ipr: Any) -> int:
    """Discard what waits in the socket's catch-all queue; how many messages.
    Only for sockets bound to no multicast group: there, it holds only replies
    whose request is over (ACKs, a closed socket's error)."""
    mq = getattr(getattr(ipr, "local", None), "msg_queue", None)
    root = getattr(mq, "queues", {}).get(0)
    n = 0
    while root is not None and not root.empty():
        root.get_nowait()
        root.task_done()
        n += 1
    return n


async def get_link(ipr: Any, **match: Any) -> Any:
    """The RTM_NEWLINK message of the link `match` names (ifname= or index=), or
    None if there is no such link; any other error as `ipr.link("get")` raises it."""
    # The ACK of this call arrives after its reply: the next call drops it, so at
    # most one waits at any time.
    drop_strays(ipr)
    try:
        res = await ipr.link("get", **match)
    except Exception as exc:
        if getattr(exc, "code", None) == errno.ENODEV:
            return None
        raise
    if hasattr(res, "__aiter__"):
        async for m in res:
            return m
        return None
    for m in res:
        return m
    return None
