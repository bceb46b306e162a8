"""Release slots: a real bundle installed into a venv slot in a temporary root; reinstalls
reuse a complete slot and replace a half-made one; flips are atomic; pruning keeps the
current and the previous slot."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pleaco.host import slots as slots_module
from pleaco.host.bundle import Manifest, build_bundle, keygen, verify_bundle
from pleaco.host.slots import COMPLETE, NoSuchSlot, SlotError, Slots

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    """One real bundle of this tree at 0.2.0 for the module (building one takes seconds)."""
    out = tmp_path_factory.mktemp("bundle")
    private, public = keygen(out)
    path = out / "pleaco-0.2.0.tar"
    build_bundle(REPO, private, path, "0.2.0")
    return path, verify_bundle(path, [public.read_text()], "0.1.0")


def fake_slot(slots: Slots, version: str) -> None:
    (slots.path(version) / "bin").mkdir(parents=True)
    (slots.path(version) / COMPLETE).write_text(version)


def runs_version(slot: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the slot's own code, not this tree's
    out = subprocess.run([str(slot / "bin" / "pleaco"), "--version"], capture_output=True, text=True, env=env)
    return out.stdout.strip() or out.stderr


def test_install_makes_a_venv_slot_that_runs_that_version(tmp_path: Path, release: tuple[Path, Manifest],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    slots = Slots(tmp_path / "opt")
    slot = slots.install(*release)
    assert slot == tmp_path / "opt" / "releases" / "0.2.0" and slots.complete("0.2.0")
    assert runs_version(slot) == "pleaco 0.2.0"
    assert not (slot / "bin" / "pip").exists()  # this process's pip installed it: the slot has none
    assert (slot / "manifest.json").read_bytes() == release[1].to_json()
    assert slots.versions() == ["0.2.0"] and slots.current() is None  # installing is not switching

    # Again: the complete slot is reused as it is.
    marker = slot / "bin" / "untouched"
    marker.write_text("x")
    assert slots.install(*release) == slot and marker.exists()

    # A slot of another bundle of the same version (a rebuilt release) is replaced; here by
    # a process with no pip to lend, so the venv gets its own.
    rebuilt = dataclasses.replace(release[1], created="2000-01-01T00:00:00Z")
    with monkeypatch.context() as patch:
        patch.setattr(slots_module, "_pip_to_lend", lambda _base: None)
        assert slots.install(release[0], rebuilt) == slot
    assert not marker.exists() and (slot / "manifest.json").read_bytes() == rebuilt.to_json()
    assert (slot / "bin" / "pip").exists() and runs_version(slot) == "pleaco 0.2.0"
    marker.write_text("x")

    # A half-made slot (no .complete: a crash mid-install) is replaced.
    (slot / COMPLETE).unlink()
    assert slots.install(*release) == slot
    assert not marker.exists() and slots.complete("0.2.0")
    assert [p.name for p in slots.releases.iterdir()] == ["0.2.0"]  # no unpack dir left behind


def test_a_failed_install_leaves_no_slot(tmp_path: Path, release: tuple[Path, Manifest]) -> None:
    path, manifest = release
    lying = Manifest(version="0.2.1", files=manifest.files, key_id=manifest.key_id, created=manifest.created)
    slots = Slots(tmp_path / "opt")
    with pytest.raises(SlotError, match=r"installing pleaco 0\.2\.1"):
        slots.install(path, lying)  # the bundle has no pleaco 0.2.1 to install
    assert list(slots.releases.iterdir()) == []


def test_flip_switches_current_and_remembers_the_previous(tmp_path: Path) -> None:
    slots = Slots(tmp_path)
    for v in ("0.1.0", "0.2.0"):
        fake_slot(slots, v)
    with pytest.raises(NoSuchSlot, match=r"0\.3\.0"):
        slots.flip("0.3.0")
    assert slots.current() is None
    slots.flip("0.1.0")
    assert (slots.current(), slots.previous()) == ("0.1.0", None)
    slots.flip("0.2.0")
    assert (slots.current(), slots.previous()) == ("0.2.0", "0.1.0")
    assert os.readlink(tmp_path / "current") == "releases/0.2.0"
    assert (tmp_path / "current" / COMPLETE).read_text() == "0.2.0"
    slots.flip("0.2.0")  # to the current one: nothing changes
    assert (slots.current(), slots.previous()) == ("0.2.0", "0.1.0")


def test_flip_is_atomic_current_never_missing(tmp_path: Path) -> None:
    slots = Slots(tmp_path)
    for v in ("0.1.0", "0.2.0"):
        fake_slot(slots, v)
    slots.flip("0.1.0")
    seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.add(os.readlink(tmp_path / "current"))  # raises if ever absent

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(300):
            slots.flip("0.2.0" if i % 2 == 0 else "0.1.0")
    finally:
        stop.set()
        watcher.join()
    assert seen <= {"releases/0.1.0", "releases/0.2.0"} and seen


def test_prune_keeps_current_and_previous(tmp_path: Path) -> None:
    slots = Slots(tmp_path)
    for v in ("0.1.0", "0.2.0", "0.3.0", "0.10.0"):
        fake_slot(slots, v)
    (slots.releases / "0.4.0").mkdir()  # half-made
    slots.flip("0.2.0")
    slots.flip("0.10.0")
    assert slots.versions() == ["0.1.0", "0.2.0", "0.3.0", "0.10.0"]  # numeric order
    assert sorted(slots.prune()) == ["0.1.0", "0.3.0", "0.4.0"]
    assert slots.versions() == ["0.2.0", "0.10.0"]
    assert (slots.current(), slots.previous()) == ("0.10.0", "0.2.0")



def test_pip_is_lent_only_by_an_interpreter_that_has_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bare = tmp_path / "bare"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(bare)],
                   check=True)
    python = str(bare / "bin" / "python")
    assert slots_module._pip_to_lend(sys.executable) == [sys.executable, "-I", "-m", "pip"]  # this venv has pip
    monkeypatch.setattr(sys, "executable", python)
    assert slots_module._pip_to_lend(python) is None  # neither has one: the venv gets its own
