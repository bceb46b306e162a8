"""Release bundles: a bundle built from the tree verifies; every kind of bad bundle is
refused with a message naming the problem, and refusing installs nothing."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pleaco.host import bundle
from pleaco.host.bundle import BundleError, Manifest, build_bundle, keygen, load_private_key, verify_bundle
from pleaco.host.config import UpgradeSettings
from pleaco.host.trial import STATE_FILE, LocalUpgrade

REPO = Path(__file__).resolve().parents[2]
WHEEL = "wheels/pleaco-0.3.0-py3-none-any.whl"
DEP = "wheels/dep-1.0-py3-none-any.whl"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, str]:
    private, public = keygen(tmp_path / "keys")
    return private, public.read_text().strip()


Tamper = Callable[[bytes, bytes], tuple[bytes, bytes]]


def write_bundle(path: Path, key: Ed25519PrivateKey, members: list[tuple[str, bytes]], version: str = "0.3.0",
                 listed: dict[str, bytes] | None = None, tamper: Tamper | None = None,
                 extra: Callable[[tarfile.TarFile], None] | None = None) -> Path:
    """A bundle by hand: ``members`` in the tar, ``listed`` (default: the members) in the
    signed manifest; ``tamper`` may change the manifest and signature after signing."""
    files = {name: hashlib.sha256(data).hexdigest() for name, data in (listed or dict(members)).items()}
    public = key.public_key().public_bytes_raw()
    raw = Manifest(version=version, files=files, key_id=bundle.key_id(public), created="2026-11-29T23:00:00Z").to_json()
    sig = key.sign(raw)
    if tamper:
        raw, sig = tamper(raw, sig)
    with tarfile.open(path, "w") as tar:
        for name, data in [(bundle.MANIFEST, raw), (bundle.SIGNATURE, sig), *members]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra:
            extra(tar)
    return path


GOOD = [(WHEEL, b"pleaco wheel bytes"), (DEP, b"a dependency")]


def test_a_bundle_built_from_the_tree_verifies(tmp_path: Path, keys: tuple[Path, str]) -> None:
    private, public = keys
    made = build_bundle(REPO, private, tmp_path / "b.tar", "0.3.0")
    got = verify_bundle(tmp_path / "b.tar", [public], "0.2.0")
    assert got == made
    assert got.version == "0.3.0" and got.pleaco_wheel is not None
    # the dependencies' wheels travel with it (pyproject's dependencies, by wheel name)
    names = {p.split("/")[1].split("-")[0].lower() for p in got.files}
    assert {"pleaco", "aiohttp", "cryptography", "docker", "pystemd", "pyroute2", "zeroconf"} <= names
    # the key file, or its hex, names the same key
    assert verify_bundle(tmp_path / "b.tar", [str(private.with_name("release.pub"))], "0.2.0") == made
    assert (private.stat().st_mode & 0o777) == 0o600


def test_a_hand_made_good_bundle_verifies(tmp_path: Path, keys: tuple[Path, str]) -> None:
    private, public = keys
    path = write_bundle(tmp_path / "b.tar", load_private_key(private), GOOD)
    assert verify_bundle(path, [public], "0.2.9").files.keys() == {WHEEL, DEP}


def _flip_byte(data: bytes, at: int = 0) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


def _symlink(tar: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("wheels/link.whl")
    info.type = tarfile.SYMTYPE
    info.linkname = "/etc/passwd"
    tar.addfile(info)


# (name, how to make the bad bundle from (path, key), the running version, the message expected)
Maker = Callable[[Path, Ed25519PrivateKey], Path]
CASES: list[tuple[str, Maker, str, str]] = [
    ("bad signature", lambda p, k: write_bundle(p, k, GOOD, tamper=lambda raw, sig: (raw, _flip_byte(sig))),
     "0.2.0", "bad signature"),
    ("manifest changed after signing",
     lambda p, k: write_bundle(p, k, GOOD, tamper=lambda raw, sig: (raw.replace(b"0.3.0", b"0.4.0"), sig)),
     "0.2.0", "bad signature"),
    ("untrusted key", lambda p, k: write_bundle(p, Ed25519PrivateKey.generate(), GOOD),
     "0.2.0", "not in [upgrade] trusted_keys"),
    ("wrong digest", lambda p, k: write_bundle(p, k, [(WHEEL, b"pleaco wheel bytes"), (DEP, b"evil")],
                                               listed=dict(GOOD)),
     "0.2.0", f"file {DEP}: sha256"),
    ("missing file", lambda p, k: write_bundle(p, k, GOOD[:1], listed=dict(GOOD)),
     "0.2.0", f"file {DEP} is in the manifest but missing"),
    ("extra file", lambda p, k: write_bundle(p, k, [*GOOD, ("wheels/extra.whl", b"x")], listed=dict(GOOD)),
     "0.2.0", "file wheels/extra.whl is in the bundle but not in the manifest"),
    ("traversal", lambda p, k: write_bundle(p, k, [*GOOD, ("wheels/../../evil", b"x")]),
     "0.2.0", "path traversal"),
    ("absolute path", lambda p, k: write_bundle(p, k, [*GOOD, ("/tmp/evil", b"x")]),
     "0.2.0", "path traversal"),
    ("symlink", lambda p, k: write_bundle(p, k, GOOD, extra=_symlink), "0.2.0", "not a regular file"),
    ("older version", lambda p, k: write_bundle(p, k, GOOD), "0.10.0", "0.3.0 is not newer than the running 0.10.0"),
    ("equal version", lambda p, k: write_bundle(p, k, GOOD), "0.3.0", "0.3.0 is not newer than the running 0.3.0"),
    ("unparsable version", lambda p, k: write_bundle(p, k, [("wheels/pleaco-0.3.0rc1-x.whl", b"w")],
                                                     version="0.3.0rc1"),
     "0.2.0", "is not a dotted number"),
    ("no pleaco wheel", lambda p, k: write_bundle(p, k, GOOD[1:]), "0.2.0", "no pleaco wheel of version 0.3.0"),
    ("truncated", lambda p, k: _truncate(write_bundle(p, k, [(WHEEL, b"w" * 50_000), DEP_PAIR])),
     "0.2.0", "truncated"),
    ("garbage", lambda p, k: _garbage(p), "0.2.0", "is not a tar file"),
    ("empty file", lambda p, k: _empty(p), "0.2.0", "is not a tar file"),
    ("no manifest", lambda p, k: _tar_of(p, GOOD), "0.2.0", "no manifest.json"),
]
DEP_PAIR = GOOD[1]


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(hashlib.sha256(b"x").digest() * 1000)
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _tar_of(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class NoEngine:
    def list_managed(self, node_id: str, app: str | None = None) -> list[Any]:
        raise AssertionError("a refused bundle must not get as far as the containers")


@pytest.mark.parametrize(("make", "running", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_bundle_is_refused_naming_the_problem_and_installs_nothing(
        tmp_path: Path, keys: tuple[Path, str], make: Maker, running: str, message: str) -> None:
    private, public = keys
    path = make(tmp_path / "bad.tar", load_private_key(private))
    with pytest.raises(BundleError) as err:
        verify_bundle(path, [public], running)
    assert message in str(err.value)
    assert err.value.code == "bundle_invalid" and err.value.status == 400

    # Through the agent's entry: the same refusal, no slot, no upgrade state, no restart.
    data_dir, root = tmp_path / "data", tmp_path / "opt"
    data_dir.mkdir()
    restarts: list[list[str]] = []
    upgrade = LocalUpgrade(data_dir, UpgradeSettings(trusted_keys=[public], root=root), node_id="n",
                           engine=NoEngine(), live_nodes=lambda: ["n"], restart=restarts.append, argv=["agent"],
                           version=running)
    with pytest.raises(BundleError) as again:
        upgrade.begin(path)
    assert message in str(again.value)
    assert not (data_dir / STATE_FILE).exists() and not restarts
    assert not root.exists() or not any((root / "releases").iterdir())


def test_no_trusted_keys_refuses_everything(tmp_path: Path, keys: tuple[Path, str]) -> None:
    path = write_bundle(tmp_path / "b.tar", load_private_key(keys[0]), GOOD)
    with pytest.raises(BundleError, match="no trusted release keys"):
        verify_bundle(path, [], "0.2.0")


def test_a_trusted_key_that_is_neither_hex_nor_a_key_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "notakey").write_text("hello\n")
    with pytest.raises(BundleError, match="notakey: expected 64 hex digits"):
        bundle.trusted_public_keys([str(tmp_path / "notakey")])
    with pytest.raises(BundleError, match="'zz': neither 64 hex digits nor a readable key file"):
        bundle.trusted_public_keys(["zz"])


def test_versions_compare_as_numbers() -> None:
    assert bundle.newer("0.10.0", "0.9.9") and bundle.newer("1.0.1", "1.0") and not bundle.newer("1.0", "1.0.0")
    for bad in ("v1.0", "1.0.0-rc1", "", "1..2", "1.0.0+local"):
        with pytest.raises(BundleError):
            bundle.parse_version(bad)


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    keygen(tmp_path)
    with pytest.raises(bundle.BuildError, match="exists"):
        keygen(tmp_path)


def test_build_names_a_bad_tree_and_a_bad_key(tmp_path: Path, keys: tuple[Path, str]) -> None:
    with pytest.raises(bundle.BuildError, match="is not a pleaco source tree"):
        build_bundle(tmp_path, keys[0], tmp_path / "b.tar")
    (tmp_path / "k").write_text("nope")
    with pytest.raises(bundle.BuildError, match="expected 64 hex digits"):
        build_bundle(REPO, tmp_path / "k", tmp_path / "b.tar")
    with pytest.raises(bundle.BuildError, match="not a dotted number"):
        build_bundle(REPO, keys[0], tmp_path / "b.tar", "latest")
    assert not (tmp_path / "b.tar").exists()
