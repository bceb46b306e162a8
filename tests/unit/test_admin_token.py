"""The admin token: made once, kept, and never one the command line would take for an option."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pleaco import agent
from pleaco.config import Config


def test_a_token_never_starts_with_a_dash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: Iterator[str] = iter(["-leading-dash", "-again", "fine-token"])
    monkeypatch.setattr(agent.secrets, "token_urlsafe", lambda n: next(drawn))
    cfg = Config(data_dir=tmp_path)
    assert agent.load_or_create_token(cfg) == "fine-token"
    assert cfg.token_path.read_text().strip() == "fine-token"
    assert agent.load_or_create_token(cfg) == "fine-token"  # kept across starts
