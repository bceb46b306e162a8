"""``pleaco release``: keygen and build from the command line, and the clear errors of
build and the node-local apply."""

from __future__ import annotations

from pathlib import Path

import pytest

from pleaco.cli import main
from pleaco.host.bundle import verify_bundle

REPO = Path(__file__).resolve().parents[2]


def test_keygen_then_build_makes_a_bundle_the_key_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["release", "keygen", "--out", str(tmp_path / "keys")]) == 0
    out = capsys.readouterr().out
    public = (tmp_path / "keys" / "release.pub").read_text().strip()
    assert f'trusted_keys = ["{public}"]' in out
    assert main(["release", "build", "--key", str(tmp_path / "keys" / "release.key"), "--out",
                 str(tmp_path / "b.tar"), "--version", "9.9.9", "--tree", str(REPO)]) == 0
    captured = capsys.readouterr()
    assert "pleaco 9.9.9" in captured.out and "building the pleaco 9.9.9 wheel" in captured.err  # progress
    assert verify_bundle(tmp_path / "b.tar", [public], "1.0.0").version == "9.9.9"
    assert main(["release", "keygen", "--out", str(tmp_path / "keys")]) == 1
    assert "exists" in capsys.readouterr().err


def test_build_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["release", "build", "--key", str(tmp_path / "missing.key"), "--out", str(tmp_path / "b.tar")]) == 1
    assert "release key" in capsys.readouterr().err and not (tmp_path / "b.tar").exists()


def test_apply_needs_a_bundle_and_a_running_agent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "b.tar"
    assert main(["release", "apply", "--bundle", str(bundle), "--data-dir", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err
    bundle.write_bytes(b"x")
    assert main(["release", "apply", "--bundle", str(bundle), "--data-dir", str(tmp_path)]) == 1
    assert f"no agent runs on data dir {tmp_path}" in capsys.readouterr().err
    assert not (tmp_path / "upgrade.request").exists()
