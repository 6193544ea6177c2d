"""Flags that several overlayctl commands share, defined once."""

from __future__ import annotations

import argparse


def sandbox_name(text: str) -> str:
    """argparse type of a sandbox name; the rule is the sandbox's own (NAME_RE)."""
    from overlay.sandbox.sandbox import NAME_RE

    if not NAME_RE.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a sandbox name: 1 to 12 lowercase letters or digits (its "
            "namespaces are ovs-<name>-<host>)")
    return text


def add_sandbox_name(p: argparse.ArgumentParser, default: str | None = "demo",
                     help: str = "the sandbox") -> None:
    """--name, as every `sandbox` subcommand and `trace` take it."""
    shown = " (default: %(default)s)" if default is not None else ""
    p.add_argument("--name", type=sandbox_name, default=default,
                   help=f"{help}: 1 to 12 lowercase letters or digits; its namespaces are "
                   f"ovs-<name>-<host>{shown}")
