"""The suite's own layout: pytest imports test files by their base name (no packages
under tests/), so two test files of one name in unit/ and integration/ break collection
of the whole suite in CI."""

from __future__ import annotations

import collections
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_test_files_share_a_name() -> None:
    names = collections.Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert not [n for n, k in names.items() if k > 1], "rename one of each: unit tests take a _unit suffix"
