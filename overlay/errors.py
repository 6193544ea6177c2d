"""One small exception hierarchy for the whole project.

Foreign exceptions (etcd3aio, grpc, pyroute2, OSError) are translated at the
boundary into these, so callers decide on one question: retry or give up.
"""

from __future__ import annotations


class OverlayError(Exception):
    """Base of every error this project raises on purpose."""


class TemporaryError(OverlayError):
    """Worth retrying: etcd unreachable, no free subnet yet, a busy kernel."""


class PermanentError(OverlayError):
    """Retrying will not help: invalid configuration, refused credentials."""


class ConfigError(PermanentError):
    """A configuration value is invalid. `field` names the offending key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFound(OverlayError):
    """A looked-up object does not exist."""
