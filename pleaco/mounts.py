"""An app's volume mounts as its spec holds them: ``[{"name": VOLUME, "path": "/in/container"}]``.

Pure parsing and validation, so that pleaco.apps (the spec) can use it without importing the
volume records and their runtime (pleaco.stacks.volumes), which import pleaco.apps.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pleaco.errors import InvalidInput

# Docker's volume names allow upper case too; these are lower case so that a name means the
# same wherever it is typed (a compose file, the CLI, a record key), and short enough that
# ``pleaco-APP-VOLUME`` (a 63-character app) stays a sane Docker name.
VOLUME_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# A mount path: absolute, printable, no NUL or ':' (Docker's -v syntax splits on it).
MAX_PATH = 4096
# Enough for any real app (a database's data, a cache, uploads) and a spec that fits in a record.
MAX_VOLUMES = 16


class VolumeSpecError(InvalidInput, ValueError):
    """A volume mount that is not valid; the message names it and says why."""


@dataclass(frozen=True, slots=True)
class VolumeMount:
    name: str
    path: str

    def to_value(self) -> dict[str, str]:
        return {"name": self.name, "path": self.path}

    def __str__(self) -> str:
        return f"{self.name}:{self.path}"


def validate_volume_name(name: Any) -> str:
    if not isinstance(name, str) or not VOLUME_NAME.fullmatch(name):
        raise VolumeSpecError(f"volume name {name!r} is not valid (1-63 lower-case letters, digits, '_', '.' "
                              "and '-', starting with a letter or digit)")
    return name


def validate_path(path: Any, name: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise VolumeSpecError(f"volume {name}: path {path!r} is not an absolute path")
    if len(path) > MAX_PATH or any(c in path for c in "\x00:") or not path.isprintable():
        raise VolumeSpecError(f"volume {name}: path {path!r} holds a character a mount path cannot ('\\0', ':')")
    normal = posixpath.normpath(path)
    if normal == "/" or normal.startswith("//"):
        raise VolumeSpecError(f"volume {name}: path {path!r} cannot be the container's root")
    return normal


def parse_mount(text: str) -> VolumeMount:
    """``NAME:/path`` (the CLI's ``--volume``) as a mount."""
    name, sep, path = text.partition(":")
    if not sep:
        raise VolumeSpecError(f"volume {text!r}: expected NAME:/path")
    name = validate_volume_name(name)
    return VolumeMount(name, validate_path(path, name))


def parse_all(value: Any) -> tuple[VolumeMount, ...]:
    """A spec's ``volumes`` list (of {"name", "path"} objects or ``NAME:/path`` strings) as
    mounts; names and paths both unique."""
    if not isinstance(value, list | tuple):
        raise VolumeSpecError("expected a list of {\"name\": VOLUME, \"path\": \"/container/path\"}")
    if len(value) > MAX_VOLUMES:
        raise VolumeSpecError(f"{len(value)} volumes: at most {MAX_VOLUMES} per app")
    mounts: list[VolumeMount] = []
    for item in value:
        if isinstance(item, str):
            mounts.append(parse_mount(item))
            continue
        if not isinstance(item, dict) or set(item) != {"name", "path"}:
            raise VolumeSpecError(f"{item!r} is not an object with exactly \"name\" and \"path\"")
        name = validate_volume_name(item["name"])
        mounts.append(VolumeMount(name, validate_path(item["path"], name)))
    _no_duplicates(mounts)
    return tuple(mounts)


def _no_duplicates(mounts: Iterable[VolumeMount]) -> None:
    names: set[str] = set()
    paths: set[str] = set()
    for m in mounts:
        if m.name in names:
            raise VolumeSpecError(f"volume {m.name} is named twice")
        if m.path in paths:
            raise VolumeSpecError(f"path {m.path} is mounted twice")
        names.add(m.name)
        paths.add(m.path)
