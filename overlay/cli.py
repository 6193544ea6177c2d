"""What overlayctl and overlayd share on the command line.

One place turns an exception into one sentence and an exit code (`explain`,
`run`), so a command added anywhere under `overlayctl` gets the same
treatment without a handler of its own; and argparse types (`seconds`,
`port`, `int_range`, `path`) refuse values that cannot work before anything
runs, naming the flag the user typed.

Exit status, for every command:
  0    done
  1    a runtime failure: etcd unreachable, no agent, a file not writable
  2    a usage error: a bad flag or value (argparse's own code)
  70   a bug: an exception nobody translated (EX_SOFTWARE); one line, and the
       traceback only with OVERLAY_DEBUG=1
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from overlay.errors import ConfigError, OverlayError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 70, 130
DEBUG_ENV = "OVERLAY_DEBUG"


@dataclass(frozen=True)
class Failure:
    """What the user reads, and the exit status."""

    message: str
    code: int
    detail: str = ""  # more lines after the sentence (a log tail), or ""


def os_error(exc: OSError, doing: str = "") -> str:
    """'cannot write /x: permission denied (run as root?)' from an OSError."""
    what = exc.strerror or str(exc)
    where = f" {exc.filename}" if exc.filename is not None else ""
    if exc.filename2 is not None:
        where += f" -> {exc.filename2}"
    hint = ""
    if exc.errno in (errno.EACCES, errno.EPERM) and os.geteuid() != 0:
        hint = " (run as root?)"
    elif exc.errno == errno.EROFS:
        hint = " (a read-only file system)"
    head = f"cannot {doing}{where}" if doing else (where.strip() or "system error")
    return f"{head}: {what[:1].lower()}{what[1:]}{hint}"


def explain(exc: BaseException) -> Failure:
    """One sentence and an exit status for an exception that reached the command line."""
    if isinstance(exc, KeyboardInterrupt):
        return Failure("interrupted", EXIT_INTERRUPTED)
    if isinstance(exc, ConfigError):
        return Failure(f"invalid {exc.field}: {exc.message}", EXIT_USAGE)
    if isinstance(exc, OverlayError):
        return Failure(str(exc) or type(exc).__name__, EXIT_FAILURE,
                       str(getattr(exc, "detail", "") or ""))
    if isinstance(exc, OSError):
        return Failure(os_error(exc), EXIT_FAILURE)
    if isinstance(exc, RecursionError | MemoryError):
        return Failure(f"gave up: {type(exc).__name__}", EXIT_FAILURE)
    return Failure(f"internal error: {type(exc).__name__}: {exc}; this is a bug, please "
                   f"report it ({DEBUG_ENV}=1 shows where it happened)", EXIT_BUG)


def run(prog: str, fn: Callable[[], int]) -> int:
    """`fn()`, with any exception reported as one line on stderr and an exit status."""
    try:
        return fn()
    except SystemExit:
        raise
    except BrokenPipeError:
        # `overlayctl ... | head`: the reader left; nothing to say to it.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (no flush error at exit)
        return EXIT_FAILURE
    except BaseException as exc:
        failure = explain(exc)
        if failure.code == EXIT_BUG and os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        report(prog, failure)
        return failure.code


def report(prog: str, failure: Failure) -> None:
    with contextlib.suppress(OSError):
        print(f"{prog}: {failure.message}", file=sys.stderr)
        if failure.detail:
            print(failure.detail.rstrip("\n"), file=sys.stderr)
        sys.stderr.flush()


@contextlib.contextmanager
def flag_names(fields: Mapping[str, str]) -> Iterator[None]:
    """Re-raise a ConfigError about a config key (`SubnetLen`) as one about the flag the
    user typed (`--subnet-len`)."""
    try:
        yield
    except ConfigError as exc:
        if exc.field in fields:
            raise ConfigError(fields[exc.field], exc.message) from None
        raise


# --- argparse types: each refuses in words what cannot work ---------------------------


def seconds(text: str) -> float:
    """A duration: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return value


def int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An integer type for argparse, lo <= value (<= hi)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"{value} must be {bound}")
        return value

    parse.__name__ = "integer"
    return parse


port = int_range(1, 65535)


def path(text: str) -> Path:
    """A file or directory name; an empty one (which would mean the current directory)
    is refused."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path names nothing")
    return Path(text)


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every runnable command of `parser` (the leaves of its subcommand tree) and its
    parser: (("network", "init"), <parser>), ... For tests and docs that must cover every
    command, including ones added later."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for action in subs:
        for name, sub in action.choices.items():
            yield from commands(sub, (*path, name))


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The flags of one command, without --help and --version."""
    return [a for a in parser._actions if a.option_strings
            and not isinstance(a, argparse._HelpAction | argparse._VersionAction)]
