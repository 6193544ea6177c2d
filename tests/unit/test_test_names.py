"""pytest imports test modules by basename (no packages under tests/): two files with one
name in tests/unit and tests/integration stop the whole suite at collection."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_no_two_test_modules_share_a_basename():
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted(TESTS.rglob("*.py")):
        if ".venv" in path.parts:
            continue
        if path.name in seen and path.name != "conftest.py":
            clashes.append(f"{seen[path.name]} and {path}")
        seen.setdefault(path.name, path)
    assert not clashes, clashes
