"""The offline OSV database: import, version order, matching, and the scan's parsers."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from pleaco.builds import scan, vulndb
from pleaco.builds.vulndb import VulnDbError, compare_debian, compare_generic

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vulnerable"


@pytest.mark.parametrize(("a", "b", "sign"), [
    ("1.0", "1.0", 0), ("1.0-1", "1.0-2", -1), ("1:0.9", "2.0", 1), ("1.0~rc1", "1.0", -1),
    ("1.2.3-1", "1.2.3-2", -1), ("2.10", "2.9", 1), ("1.0a", "1.0", 1), ("1.0+deb12u1", "1.0", 1),
    ("7.88.1-10+deb12u5", "7.88.1-10+deb12u12", -1), ("0", "0.1", -1),
])
def test_debian_version_order(a: str, b: str, sign: int) -> None:
    assert (compare_debian(a, b) > 0) - (compare_debian(a, b) < 0) == sign
    assert (compare_debian(b, a) > 0) - (compare_debian(b, a) < 0) == -sign


@pytest.mark.parametrize(("a", "b", "sign"), [
    ("1.2.10", "1.2.9", 1), ("2.0", "2.0.0", 0), ("1.0", "1.2", -1), ("1.31.1-r9", "1.31.1-r10", -1),
])
def test_generic_version_order(a: str, b: str, sign: int) -> None:
    assert compare_generic(a, b) == sign


def test_import_and_match_the_example(tmp_path: Path) -> None:
    assert vulndb.import_db(EXAMPLE / "osv-advisories.json", tmp_path) == 3
    advisories = vulndb.load_db(tmp_path)
    packages = [
        scan.Package("PyPI", "insecure-foo", "1.0", "/x"),
        scan.Package("PyPI", "insecure-foo", "1.2", "/y"),  # fixed
        scan.Package("Debian", "libfake1", "1.2.3-1", "/var/lib/dpkg/status"),
        scan.Package("Debian", "libsafe1", "2.0-1", "/var/lib/dpkg/status"),  # exactly the fixed version
    ]
    found = scan.match(packages, advisories)
    assert [(f.id, f.package, f.installed, f.fixed, f.severity) for f in found] == [
        ("PLEACO-TEST-2026-0001", "insecure-foo", "1.0", "1.2", "critical"),
        ("PLEACO-TEST-2026-0002", "libfake1", "1.2.3-1", "1.2.3-2", "low"),
    ]
    assert [f.id for f in scan.blocking(found, "critical")] == ["PLEACO-TEST-2026-0001"]
    assert len(scan.blocking(found, "low")) == 2 and scan.blocking(found, "none") == []


def test_explicit_versions_and_last_affected() -> None:
    adv = vulndb.parse_advisory({
        "id": "X-1", "database_specific": {"severity": "MODERATE"},
        "affected": [{"package": {"ecosystem": "Alpine:v3.19", "name": "busybox"}, "versions": ["1.36.0-r0"],
                      "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "1.30"}, {"last_affected": "1.34"}]},
                                 {"type": "GIT", "events": [{"introduced": "abc"}]}]}],
    }, "inline")
    assert adv.severity == "medium"
    pkgs = [scan.Package("Alpine", "busybox", v, "/lib/apk/db/installed") for v in ("1.36.0-r0", "1.32", "1.35", "1.2")]
    assert [f.installed for f in scan.match(pkgs, [adv])] == ["1.32", "1.36.0-r0"]


def test_import_rejects_invalid_advisories_and_keeps_the_old_db(tmp_path: Path) -> None:
    vulndb.import_db(EXAMPLE / "osv-advisories.json", tmp_path)
    before = vulndb.db_path(tmp_path).read_bytes()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "OK-1"}, {"id": "BAD-1", "affected": [{"package": {"name": "x"}}]}]))
    with pytest.raises(VulnDbError, match=r"bad.json\[1\] \(BAD-1\): affected\[0\].package: needs string name"):
        vulndb.import_db(bad, tmp_path)
    bad.write_text("{nope")
    with pytest.raises(VulnDbError, match="not valid JSON"):
        vulndb.import_db(bad, tmp_path)
    with pytest.raises(VulnDbError, match="id: missing"):
        vulndb.parse_advisory({"summary": "no id"}, "inline")
    assert vulndb.db_path(tmp_path).read_bytes() == before


def test_import_a_directory(tmp_path: Path) -> None:
    src = tmp_path / "osv"
    (src / "PyPI").mkdir(parents=True)
    for i, doc in enumerate(json.loads((EXAMPLE / "osv-advisories.json").read_text())):
        (src / "PyPI" / f"{i}.json").write_text(json.dumps(doc))
    assert vulndb.import_db(src, tmp_path / "data") == 3


def _tar(files: dict[str, str]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def test_packages_from_an_image_file_system() -> None:
    image = _save([("layer", {
        "var/lib/dpkg/status": (EXAMPLE / "dpkg" / "status").read_text()
        + "\nPackage: removed1\nStatus: deinstall ok config-files\nVersion: 1\n",
        "lib/apk/db/installed": "C:Q1abc=\nP:musl\nV:1.2.4-r2\nA:x86_64\n\nP:busybox\nV:1.36.1-r5\n",
        "usr/lib/python3/dist-packages/insecure_foo-1.0.dist-info/METADATA":
            (EXAMPLE / "site-packages/insecure_foo-1.0.dist-info/METADATA").read_text(),
        "usr/lib/python3.11/site-packages/Old.Pkg-0.1.egg-info/PKG-INFO": "Name: Old.Pkg\nVersion: 0.1\n",
        "etc/hostname": "x\n",
    })])
    got = {(p.ecosystem, p.name, p.version) for p in scan.packages_from_image_tar(image)}
    assert got == {("Debian", "libfake1", "1.2.3-1"), ("Debian", "libsafe1", "2.0-1"), ("Alpine", "musl", "1.2.4-r2"),
                   ("Alpine", "busybox", "1.36.1-r5"), ("PyPI", "insecure-foo", "1.0"), ("PyPI", "old-pkg", "0.1")}


def _save(layers: list[tuple[str, dict[str, str]]], manifest_last: bool = True) -> io.BytesIO:
    """A `docker save` stream: each layer a tar of its own, manifest.json naming their order."""
    # The layers go into the stream top first: manifest.json, not the stream, orders them.
    members = {f"{name}/layer.tar": _tar(files).getvalue() for name, files in reversed(layers)}
    members["abc.json"] = b'{"config": {}}'
    manifest = json.dumps([{"Config": "abc.json", "RepoTags": None,
                            "Layers": [f"{name}/layer.tar" for name, _ in layers]}]).encode()
    items = list(members.items())
    items = [*items, ("manifest.json", manifest)] if manifest_last else [("manifest.json", manifest), *items]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def test_packages_from_a_saved_image_stack_its_layers() -> None:
    apk = "P:musl\nV:1.2.4-r2\n\nP:busybox\nV:1.36.1-r5\n"
    meta = "usr/lib/python3.11/site-packages/{}.dist-info/METADATA"
    layers = [
        ("top", {"lib/apk/db/installed": "P:musl\nV:1.2.5-r0\n",  # upgraded: the top copy counts
                 "usr/lib/python3.11/site-packages/.wh.gone-1.0.dist-info": "",  # a whiteout
                 "opt/app/.wh..wh..opq": "",  # an opaque directory
                 meta.format("kept-2.0"): "Name: kept\nVersion: 2.0\n"}),
        ("base", {"lib/apk/db/installed": apk, meta.format("gone-1.0"): "Name: gone\nVersion: 1.0\n",
                  meta.format("kept-1.0"): "Name: kept\nVersion: 1.0\n",
                  "opt/app/lib/x-1.0.dist-info/METADATA": "Name: hidden\nVersion: 1.0\n"}),
    ]
    order = [layers[1], layers[0]]
    for manifest_last in (True, False):
        stream = _save(order, manifest_last)
        got = {(p.ecosystem, p.name, p.version) for p in scan.packages_from_image_tar(stream)}
        assert got == {("Alpine", "musl", "1.2.5-r0"), ("PyPI", "kept", "1.0"), ("PyPI", "kept", "2.0")}


def test_trivy_report_becomes_findings(tmp_path: Path) -> None:
    report = {"Results": [{"Target": "img (debian 12)", "Type": "debian", "Vulnerabilities": [
        {"VulnerabilityID": "CVE-2024-1", "PkgName": "libc6", "InstalledVersion": "2.36-9",
         "FixedVersion": "2.36-9+deb12u1", "Severity": "HIGH", "Title": "overflow"},
        {"VulnerabilityID": "CVE-2024-2", "PkgName": "zlib1g", "InstalledVersion": "1:1.2.13", "Severity": "UNKNOWN"},
    ]}]}
    fake = tmp_path / "trivy"
    fake.write_text(f"#!/bin/sh\n[ \"$1 $4\" = \"image json\" ] || exit 9\ncat <<'JSON'\n{json.dumps(report)}\nJSON\n")
    fake.chmod(0o755)
    found = scan.trivy_scan(str(fake), "sha256:abc", 10)
    assert [(f.id, f.package, f.installed, f.fixed, f.severity) for f in found] == [
        ("CVE-2024-1", "libc6", "2.36-9", "2.36-9+deb12u1", "high"),
        ("CVE-2024-2", "zlib1g", "1:1.2.13", None, "unknown"),
    ]
    assert [f.id for f in scan.blocking(found, "high")] == ["CVE-2024-1"]
    fake.write_text("#!/bin/sh\necho 'no db' >&2\nexit 1\n")
    with pytest.raises(scan.TrivyError, match="trivy failed: no db"):
        scan.trivy_scan(str(fake), "sha256:abc", 10)
