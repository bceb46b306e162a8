"""An offline vulnerability database in OSV JSON format, and version comparison.

``pleaco vulndb import PATH`` validates OSV advisories (one JSON file, a JSON list, or a
directory of ``*.json``) and installs them, normalised, as ``DATA_DIR/vulndb/osv.json``. The
file is replaced atomically, so a scan reads either the old database or the new one; an
invalid advisory stops the import with a message naming the file and field, and the old
database stays.

Only what matching needs is kept: id, summary, severity, and per affected package its
ecosystem, name, explicit versions and ECOSYSTEM/SEMVER ranges.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pleaco.errors import InvalidInput

SEVERITY_RANK = {"unknown": 0, "low": 1, "medium": 2, "high": 3, "critical": 4}
# GitHub's advisories say MODERATE where others say MEDIUM.
_SEVERITY_ALIASES = {"moderate": "medium", "important": "high", "negligible": "low"}


class VulnDbError(InvalidInput, ValueError, code="invalid_vulndb"):
    """An advisory file that is not valid OSV; the message names the file and field."""


@dataclass(frozen=True)
class Affected:
    ecosystem: str  # "Debian", "Alpine", "PyPI" (OSV's "Debian:12" is cut at the colon)
    name: str
    versions: frozenset[str] = frozenset()
    # (introduced, fixed, last_affected); "0" introduced means every version before.
    ranges: tuple[tuple[str, str | None, str | None], ...] = ()


@dataclass(frozen=True)
class Advisory:
    id: str
    summary: str
    severity: str
    affected: tuple[Affected, ...] = field(default_factory=tuple)


def db_path(data_dir: Path) -> Path:
    return data_dir / "vulndb" / "osv.json"


def normalise_name(ecosystem: str, name: str) -> str:
    if ecosystem == "PyPI":  # PEP 503
        return re.sub(r"[-_.]+", "-", name).lower()
    return name


def _severity(doc: dict[str, Any]) -> str:
    for holder in (doc.get("database_specific"), *[a.get("ecosystem_specific") for a in doc.get("affected", [])],
                   *[a.get("database_specific") for a in doc.get("affected", [])]):
        if isinstance(holder, dict) and isinstance(holder.get("severity"), str):
            sev = holder["severity"].lower()
            sev = _SEVERITY_ALIASES.get(sev, sev)
            if sev in SEVERITY_RANK:
                return str(sev)
    return "unknown"


def parse_advisory(doc: Any, where: str) -> Advisory:
    if not isinstance(doc, dict):
        raise VulnDbError(f"{where}: expected an OSV object")
    if not isinstance(doc.get("id"), str) or not doc["id"]:
        raise VulnDbError(f"{where}: id: missing or not a string")
    where = f"{where} ({doc['id']})"
    affected_in = doc.get("affected", [])
    if not isinstance(affected_in, list):
        raise VulnDbError(f"{where}: affected: expected a list")
    affected = []
    for i, a in enumerate(affected_in):
        pkg = a.get("package") if isinstance(a, dict) else None
        if not isinstance(pkg, dict) or not isinstance(pkg.get("name"), str) or not isinstance(
            pkg.get("ecosystem"), str
        ):
            raise VulnDbError(f"{where}: affected[{i}].package: needs string name and ecosystem")
        eco = pkg["ecosystem"].split(":", 1)[0]
        versions = a.get("versions", [])
        if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
            raise VulnDbError(f"{where}: affected[{i}].versions: expected a list of strings")
        ranges = []
        for j, r in enumerate(a.get("ranges", [])):
            if not isinstance(r, dict) or not isinstance(r.get("events"), list):
                raise VulnDbError(f"{where}: affected[{i}].ranges[{j}].events: expected a list")
            if r.get("type") not in ("ECOSYSTEM", "SEMVER"):
                continue  # GIT ranges name commits, not installed versions
            intro: str | None = None
            for k, ev in enumerate(r["events"]):
                if not isinstance(ev, dict) or len(ev) != 1 or not all(isinstance(v, str) for v in ev.values()):
                    raise VulnDbError(f"{where}: affected[{i}].ranges[{j}].events[{k}]: expected one string field")
                (kind, value), = ev.items()
                if kind == "introduced":
                    intro = value
                elif kind in ("fixed", "last_affected", "limit") and intro is not None:
                    ranges.append((intro, value if kind == "fixed" else None,
                                   value if kind == "last_affected" else None))
                    intro = None
            if intro is not None:
                ranges.append((intro, None, None))
        affected.append(Affected(eco, normalise_name(eco, pkg["name"]), frozenset(versions), tuple(ranges)))
    summary = doc.get("summary") or doc.get("details") or ""
    return Advisory(doc["id"], str(summary)[:300], _severity(doc), tuple(affected))


def _to_json(adv: Advisory) -> dict[str, Any]:
    return {
        "id": adv.id, "summary": adv.summary, "severity": adv.severity,
        "affected": [{"ecosystem": a.ecosystem, "name": a.name, "versions": sorted(a.versions),
                      "ranges": [list(r) for r in a.ranges]} for a in adv.affected],
    }


def _from_json(doc: dict[str, Any]) -> Advisory:
    return Advisory(doc["id"], doc["summary"], doc["severity"], tuple(
        Affected(a["ecosystem"], a["name"], frozenset(a["versions"]), tuple(tuple(r) for r in a["ranges"]))
        for a in doc["affected"]))


def read_source(path: Path) -> list[Advisory]:
    """Advisories from a file (one OSV object or a list of them) or a directory of *.json."""
    files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
    if not files:
        raise VulnDbError(f"{path}: no *.json files")
    out = []
    for f in files:
        try:
            doc = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise VulnDbError(f"{f}: cannot read: {exc}") from None
        except json.JSONDecodeError as exc:
            raise VulnDbError(f"{f}: not valid JSON: {exc}") from None
        docs = doc if isinstance(doc, list) else [doc]
        out += [parse_advisory(d, f"{f}[{i}]" if isinstance(doc, list) else str(f)) for i, d in enumerate(docs)]
    return out


def import_db(source: Path, data_dir: Path) -> int:
    """Validate and install advisories; returns how many. Nothing changes on error."""
    advisories = read_source(source)
    target = db_path(data_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps([_to_json(a) for a in advisories]))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return len(advisories)


def load_db(data_dir: Path) -> list[Advisory]:
    path = db_path(data_dir)
    if not path.exists():
        return []
    return [_from_json(d) for d in json.loads(path.read_text())]


# -- versions -----------------------------------------------------------------------------


def _debian_order(c: str) -> int:
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _debian_part(a: str, b: str) -> int:
    """dpkg's verrevcmp: alternating non-digit and digit runs; '~' sorts before anything."""
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _debian_order(a[i]) if i < len(a) else 0
            bc = _debian_order(b[j]) if j < len(b) else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


def compare_debian(a: str, b: str) -> int:
    def split(v: str) -> tuple[int, str, str]:
        epoch, _, rest = v.rpartition(":") if ":" in v else ("0", "", v)
        upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "0")
        return int(epoch or 0) if epoch.isdigit() else 0, upstream, revision

    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return ea - eb
    return _debian_part(ua, ub) or _debian_part(ra, rb)


def compare_generic(a: str, b: str) -> int:
    """Numbers compare as numbers, other runs as text, release before pre-release suffix-less:
    good enough for PyPI and Alpine's common versions (1.2.10 > 1.2.9, 2.0 == 2.0.0)."""
    def key(v: str) -> list[tuple[int, int | str]]:
        parts: list[tuple[int, int | str]] = []
        for tok in re.findall(r"\d+|[A-Za-z]+", v):
            parts.append((1, int(tok)) if tok.isdigit() else (0, tok.lower()))
        while parts and parts[-1] == (1, 0):
            parts.pop()
        return parts

    ka, kb = key(a), key(b)
    return (ka > kb) - (ka < kb)


def compare(ecosystem: str, a: str, b: str) -> int:
    return compare_debian(a, b) if ecosystem in ("Debian", "Ubuntu") else compare_generic(a, b)


def affected_by(adv_pkg: Affected, version: str) -> tuple[bool, str | None]:
    """Whether ``version`` is affected, and the version that fixes it when one is known."""
    if version in adv_pkg.versions:
        fixed = next((r[1] for r in adv_pkg.ranges if r[1]), None)
        return True, fixed
    for intro, fixed, last in adv_pkg.ranges:
        eco = adv_pkg.ecosystem
        if intro != "0" and compare(eco, version, intro) < 0:
            continue
        if fixed is not None and compare(eco, version, fixed) >= 0:
            continue
        if last is not None and compare(eco, version, last) > 0:
            continue
        return True, fixed
    return False, None
