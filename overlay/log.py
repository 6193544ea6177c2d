"""Logging: readable lines by default, one JSON object per line for collectors.

Every change overlayd makes to the kernel is logged once, at info level, with
what and why. Such lines carry structured fields (`change_fields`): in JSON
they become keys of their own (`"event": "kernel-change", "kind": "fdb",
"action": "add", "why": "..."`), so a collector can select them without
parsing the message; the text format shows only the message.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

# Attributes every LogRecord has; anything else was passed with `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName",
}

KERNEL_CHANGE = "kernel-change"


def change_fields(kind: str, action: str, why: str, **more: object) -> dict[str, object]:
    """`extra=` for the log line of one kernel change."""
    return {"event": KERNEL_CHANGE, "kind": kind, "action": action, "why": why, **more}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in doc:
                doc[key] = _plain(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def quiet_grpc() -> None:
    """gRPC's C core logs TLS and connection errors to stderr on its own; we report
    them ourselves, in words, so it stays quiet unless GRPC_VERBOSITY asks otherwise.
    (Before grpc is imported: it reads the variable once.)"""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def setup(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("pyroute2", "grpc", "asyncio", "etcd3aio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # Warnings (e.g. deprecations in a library) go through the same handler, so
    # a JSON log stays one JSON object per line.
    logging.captureWarnings(True)
