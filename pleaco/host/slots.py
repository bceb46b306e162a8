"""Versioned slots: each release installed in a venv of its own, and a ``current`` symlink.

    ROOT/releases/VERSION/   a venv with that pleaco installed (bin/pleaco, bin/python)
    ROOT/current  -> releases/VERSION    what systemd's ExecStart runs
    ROOT/previous -> releases/VERSION    what ``current`` pointed at before the last flip

A venv holds its own absolute path (the scripts' ``#!`` lines), so a slot cannot be built
elsewhere and renamed into place: it is built at its final path and becomes complete when
``.complete`` is written (fsynced), the last step. A slot without it is a half-made one
(a crash mid-install) and the next install of that version replaces it. Flips are atomic:
the new symlink is made under a temporary name and renamed over the old one, so
``current`` always names a whole slot. Operations take ``ROOT/slots.lock`` (flock).

A slot holds pleaco and its dependencies, not pip: pip only installs it, and it is the pip
(>= 22.3, ``--python``) of the installing process's interpreter or of the Python under it.
Only when neither has one is the venv made with a pip of its own (ensurepip, seconds more),
as the golden image's first slot is.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pleaco import logs
from pleaco.errors import Conflict, PleacoError
from pleaco.host.bundle import MANIFEST, Manifest, extract_wheels, parse_version

log = logs.get("pleaco.host.slots")

DEFAULT_ROOT = Path("/opt/pleaco")
COMPLETE = ".complete"


class SlotError(PleacoError, RuntimeError, code="slot_failed"):
    """A slot could not be installed or switched to."""


class NoSuchSlot(Conflict, code="no_such_slot"):
    """A version that has no complete slot."""


class Slots:
    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = root
        self.releases = root / "releases"

    def path(self, version: str) -> Path:
        return self.releases / version

    def python(self, version: str) -> Path:
        return self.path(version) / "bin" / "python"

    def complete(self, version: str) -> bool:
        return (self.path(version) / COMPLETE).is_file()

    def versions(self) -> list[str]:
        """The versions with a complete slot, oldest first."""
        if not self.releases.is_dir():
            return []
        found = [p.name for p in self.releases.iterdir() if (p / COMPLETE).is_file()]
        return sorted(found, key=_order)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.releases.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "slots.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def install(self, bundle: Path, manifest: Manifest) -> Path:
        """Install a verified bundle's pleaco into ``releases/VERSION`` and answer its path.

        A complete slot of that very bundle (the same signed manifest) is reused as it is;
        a half-made one, or one of another bundle of the same version (a release rebuilt
        after a failed one), is replaced.
        """
        version = manifest.version
        parse_version(version)  # a version is a path component: never anything but digits and dots
        slot = self.path(version)
        with self._locked():
            if self.complete(version) and self._holds(version, manifest):
                log.info("slot.reused", version=version, path=str(slot))
                return slot
            if slot.exists() or slot.is_symlink():
                log.warning("slot.replacing", version=version, path=str(slot),
                            why="another bundle" if self.complete(version) else "half-made")
                _remove(slot)
            try:
                self._build(bundle, manifest, slot)
            except BaseException:
                _remove(slot)
                raise
        log.info("slot.installed", version=version, path=str(slot))
        return slot

    def _build(self, bundle: Path, manifest: Manifest, slot: Path) -> None:
        with tempfile.TemporaryDirectory(prefix=".unpack-", dir=self.releases) as tmp:
            extract_wheels(bundle, manifest, Path(tmp))
            # The venv's interpreter is the base Python under the running one (a slot's own
            # venv when pleaco runs from a slot): venvs are not nested.
            base = getattr(sys, "_base_executable", sys.executable)
            # The slot runs pleaco, never pip: pip is only the tool that installs it. A pip
            # at hand installs into the new venv (`pip --python`), which spares the venv its
            # own copy of pip and setuptools (ensurepip: seconds of every install); with
            # none at hand, the venv gets its own.
            lender = _pip_to_lend(base)
            venv = [base, "-m", "venv", *(["--without-pip"] if lender else []), str(slot)]
            _run(venv, f"making the venv of {manifest.version}")
            pip = ([*lender, "--python", str(slot / "bin" / "python")] if lender
                   else [str(slot / "bin" / "python"), "-I", "-m", "pip"])
            # No cache: the wheels are local, and under systemd the home directory is read-only.
            _run([*pip, "install", "--disable-pip-version-check", "--no-cache-dir", "-q", "--no-index",
                  "--find-links", str(Path(tmp) / "wheels"), f"pleaco=={manifest.version}"],
                 f"installing pleaco {manifest.version} into its slot")
        (slot / MANIFEST).write_bytes(manifest.to_json())  # what this slot is, for people and `upgrade status`
        _write_synced(slot / COMPLETE, manifest.version + "\n")

    def _holds(self, version: str, manifest: Manifest) -> bool:
        try:
            return (self.path(version) / MANIFEST).read_bytes() == manifest.to_json()
        except OSError:
            return False

    def current(self) -> str | None:
        return _link_version(self.root / "current")

    def previous(self) -> str | None:
        return _link_version(self.root / "previous")

    def flip(self, version: str) -> None:
        """Point ``current`` at ``version``'s slot (atomically) and ``previous`` at the slot
        it pointed at before; a flip to the current version changes nothing."""
        with self._locked():
            if not self.complete(version):
                raise NoSuchSlot(f"no complete slot for version {version} under {self.releases}")
            old = self.current()
            if old == version:
                return
            if old is not None:
                _symlink_atomic(self.root / "previous", f"releases/{old}")
            _symlink_atomic(self.root / "current", f"releases/{version}")
        log.info("slot.flipped", version=version, previous=old or "")

    def prune(self) -> list[str]:
        """Remove every slot but the current and the previous one (and half-made ones);
        answer the versions removed."""
        removed = []
        with self._locked():
            keep = {self.current(), self.previous()}
            for path in sorted(self.releases.iterdir()):
                if path.name in keep or path.name.startswith("."):
                    continue
                _remove(path)
                removed.append(path.name)
        if removed:
            log.info("slot.pruned", versions=",".join(removed))
        return removed


def _order(version: str) -> tuple[int, ...]:
    try:
        return parse_version(version)
    except PleacoError:
        return ()


def _link_version(link: Path) -> str | None:
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SlotError(f"{link}: {exc.strerror or exc}") from None
    return Path(target).name


def _symlink_atomic(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)  # rename(2): the link is the old one or the new one, never absent
    _fsync_dir(link.parent)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


# `pip --python`, which runs pip's own code under another interpreter, came with pip 22.3.
_PIP_PYTHON_OPTION = (22, 3)
_PIP_VERSION = "import importlib.metadata as m; print(m.version('pip'))"


def _pip_to_lend(base: str) -> list[str] | None:
    """The pip command of the running interpreter or else of ``base`` (the Python under
    it), the first that has a pip able to install into another venv (``--python``); None
    when neither has."""
    for python in dict.fromkeys(p for p in (sys.executable, base) if p):
        proc = subprocess.run([python, "-I", "-c", _PIP_VERSION], capture_output=True, text=True, env=_clean_env())
        try:
            version = tuple(int(part) for part in proc.stdout.strip().split(".")[:2])
        except ValueError:  # no pip (the script failed), or a version that is not X.Y...
            continue
        if proc.returncode == 0 and version >= _PIP_PYTHON_OPTION:
            return [python, "-I", "-m", "pip"]
    return None


def _clean_env() -> dict[str, str]:
    # No PYTHONPATH: the slot's pip and python see only the slot.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV")}


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env())
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise SlotError(f"{what} failed:\n{tail}")
