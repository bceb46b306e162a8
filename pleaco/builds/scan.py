"""The basic vulnerability scan: installed packages from an image's file system, matched
against the offline OSV database.

Packages are read from the image as ``docker save`` streams it (its layers, each a tar, and
``manifest.json`` naming their order; no container is made): dpkg's status file, apk's
installed database and Python's ``*.dist-info/METADATA`` (and ``*.egg-info/PKG-INFO``), as
the top layer holding each sees it (whiteouts of upper layers delete). Nothing is written
to disk.
"""

from __future__ import annotations

import email.parser
import json
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import IO, Any

from pleaco.builds.vulndb import SEVERITY_RANK, Advisory, affected_by, normalise_name
from pleaco.errors import PleacoError

DPKG_STATUS = "var/lib/dpkg/status"
APK_INSTALLED = "lib/apk/db/installed"
_PY_META = re.compile(r"(^|/)[^/]+\.(dist-info/METADATA|egg-info/PKG-INFO)$")
# Larger package databases than this are not read (a hostile image cannot eat the agent).
MAX_DB_BYTES = 64 << 20


@dataclass(frozen=True)
class Package:
    ecosystem: str  # Debian | Alpine | PyPI
    name: str
    version: str
    source: str  # the file it was read from


@dataclass(frozen=True)
class Finding:
    id: str
    package: str
    ecosystem: str
    installed: str
    fixed: str | None
    severity: str
    summary: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_dpkg_status(text: str, source: str = DPKG_STATUS) -> list[Package]:
    out = []
    for para in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in para.splitlines():
            if line[:1] not in (" ", "\t") and ":" in line:
                k, _, v = line.partition(":")
                fields[k.strip().lower()] = v.strip()
        if "package" in fields and "version" in fields and "installed" in fields.get("status", "installed"):
            out.append(Package("Debian", fields["package"], fields["version"], source))
    return out


def parse_apk_installed(text: str, source: str = APK_INSTALLED) -> list[Package]:
    out = []
    for para in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in para.splitlines() if len(line) > 2 and line[1] == ":")
        if "P" in fields and "V" in fields:
            out.append(Package("Alpine", fields["P"], fields["V"], source))
    return out


def parse_python_metadata(text: str, source: str) -> list[Package]:
    msg = email.parser.Parser().parsestr(text, headersonly=True)
    name, version = msg.get("Name"), msg.get("Version")
    if not name or not version:
        return []
    return [Package("PyPI", normalise_name("PyPI", name.strip()), version.strip(), source)]


def _path(name: str) -> str:
    while name.startswith(("./", "/")):
        name = name[2:] if name.startswith("./") else name[1:]
    return name.rstrip("/")


def _packages_of(path: str, text: str) -> list[Package]:
    if path == DPKG_STATUS:
        return parse_dpkg_status(text, "/" + path)
    if path == APK_INSTALLED:
        return parse_apk_installed(text, "/" + path)
    return parse_python_metadata(text, "/" + path)


@dataclass
class _Layer:
    files: dict[str, list[Package]]  # package database path -> its packages
    deleted: set[str]  # whiteouts: paths removed from the layers below
    opaque: set[str]  # directories whose lower layers' contents are hidden


def _read_fs(tar: tarfile.TarFile) -> _Layer:
    layer = _Layer({}, set(), set())
    for member in tar:
        path = _path(member.name)
        head, _, base = path.rpartition("/")
        if base == ".wh..wh..opq":
            layer.opaque.add(head)
            continue
        if base.startswith(".wh."):
            layer.deleted.add(f"{head}/{base[4:]}" if head else base[4:])
            continue
        if not member.isfile() or member.size > MAX_DB_BYTES:
            continue
        if path in (DPKG_STATUS, APK_INSTALLED) or _PY_META.search(path):
            f = tar.extractfile(member)
            if f is not None:
                layer.files[path] = _packages_of(path, f.read().decode("utf-8", "replace"))
    return layer


def _under(path: str, top: str) -> bool:
    return not top or path == top or path.startswith(top + "/")


def packages_from_image_tar(stream: IO[bytes]) -> list[Package]:
    """Read the package databases out of a ``docker save`` stream (one pass): each layer's
    files and whiteouts, then the layers stacked in ``manifest.json``'s order."""
    layers: dict[str, _Layer] = {}
    seen: list[str] = []
    order: list[str] | None = None
    with tarfile.open(fileobj=stream, mode="r|*") as outer:
        for member in outer:
            name = _path(member.name)
            if not member.isfile():
                continue
            if name == "manifest.json":
                f = outer.extractfile(member)
                try:
                    manifest: Any = json.loads(f.read()) if f else []
                    order = [_path(str(x)) for x in manifest[0]["Layers"]]
                except (ValueError, TypeError, KeyError, IndexError):
                    order = None
            elif name.endswith("/layer.tar") or name.startswith("blobs/"):
                f = outer.extractfile(member)
                if f is None:
                    continue
                try:  # OCI layouts keep configs and manifests among the blobs: not tars
                    with tarfile.open(fileobj=f, mode="r|*") as inner:
                        layers[name] = _read_fs(inner)
                except tarfile.TarError:
                    continue
                seen.append(name)
    state: dict[str, list[Package]] = {}
    for name in order if order is not None else seen:
        layer = layers.get(name)
        if layer is None:
            continue
        for top in layer.opaque | layer.deleted:
            for path in [p for p in state if _under(p, top)]:
                del state[path]
        state.update(layer.files)
    return [p for pkgs in state.values() for p in pkgs]


def match(packages: Iterable[Package], advisories: Iterable[Advisory]) -> list[Finding]:
    index: dict[tuple[str, str], list[tuple[Advisory, Any]]] = {}
    for adv in advisories:
        for aff in adv.affected:
            index.setdefault((aff.ecosystem, aff.name), []).append((adv, aff))
    findings = []
    for pkg in packages:
        for adv, aff in index.get((pkg.ecosystem, pkg.name), []):
            hit, fixed = affected_by(aff, pkg.version)
            if hit:
                findings.append(Finding(adv.id, pkg.name, pkg.ecosystem, pkg.version, fixed, adv.severity,
                                        adv.summary))
    return sorted(set(findings), key=lambda f: (-SEVERITY_RANK[f.severity], f.package, f.installed, f.id))


def blocking(findings: Iterable[Finding], fail_on: str) -> list[Finding]:
    """The findings at or above ``fail_on``. An advisory without a severity counts as low:
    known-vulnerable is never "nothing", but it should not block a release on its own
    unless the app asked to be strict."""
    if fail_on == "none":
        return []
    limit = SEVERITY_RANK[fail_on]
    return [f for f in findings if max(SEVERITY_RANK[f.severity], 1) >= limit]


class TrivyError(PleacoError, RuntimeError, code="scanner_failed"):
    pass


def trivy_path() -> str | None:
    """Where ``trivy`` is installed, if it is: pleaco then scans with it instead."""
    return shutil.which("trivy")


def trivy_scan(trivy: str, image: str, timeout: float) -> list[Finding]:
    """Findings of ``trivy image`` (its own, fuller database and matching)."""
    try:
        done = subprocess.run([trivy, "image", "--quiet", "--format", "json", "--scanners", "vuln", image],
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TrivyError(f"trivy did not finish within {timeout:.0f}s") from None
    if done.returncode != 0:
        raise TrivyError(f"trivy failed: {done.stderr.decode(errors='replace').strip()[-300:]}")
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise TrivyError(f"trivy printed no JSON report: {exc}") from None
    findings = []
    for result in report.get("Results") or []:
        for v in result.get("Vulnerabilities") or []:
            sev = str(v.get("Severity", "unknown")).lower()
            findings.append(Finding(
                id=str(v.get("VulnerabilityID", "")), package=str(v.get("PkgName", "")),
                ecosystem=str(result.get("Type", "")), installed=str(v.get("InstalledVersion", "")),
                fixed=v.get("FixedVersion") or None, severity=sev if sev in SEVERITY_RANK else "unknown",
                summary=str(v.get("Title", ""))[:300],
            ))
    return sorted(set(findings), key=lambda f: (-SEVERITY_RANK[f.severity], f.package, f.installed, f.id))
