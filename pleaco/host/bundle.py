"""Release bundles: pleaco and its dependencies as wheels, signed by a release key.

A bundle is an uncompressed tar (the wheels inside are zip files already) of:

    manifest.json   {"format": 1, "version", "key_id", "created", "files": {path: sha256 hex}}
    manifest.sig    the Ed25519 signature of manifest.json's exact bytes (64 raw bytes)
    wheels/*.whl    pleaco's own wheel at ``version`` and the wheels of its dependencies

Release keys are Ed25519, each file one line of hex: the private key file the 32-byte seed
(mode 0600), the public key file the 32-byte raw public key. That hex is also how
``[upgrade] trusted_keys`` names a key (or a path to a public key file). A key's id is the
first 16 bytes of SHA-256 of its raw public key, in hex (as a node id is derived).

``verify_bundle`` reads the whole bundle and checks everything (structure, signature,
digests, the version) before anything is installed; a refusal raises ``BundleError``
naming the problem and changes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pleaco.errors import InvalidInput, PleacoError
from pleaco.identity import node_id_for, verify, write_secret_file

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
WHEELS = "wheels"
FORMAT = 1
# Where dependency wheels are kept between builds (``release build --wheels`` overrides):
# the first build fetches them from the package index, later ones are offline and fast.
DEFAULT_WHEEL_CACHE = Path.home() / ".cache" / "pleaco" / "wheels"
_VERSION = re.compile(r"\d+(\.\d+){0,3}")
_KEY_HEX = re.compile(r"[0-9a-fA-F]{64}")


class BundleError(InvalidInput, ValueError, code="bundle_invalid"):
    """A release bundle that is not signed by a trusted key, not intact, or not newer."""


class BuildError(PleacoError, RuntimeError, code="bundle_build_failed"):
    """A bundle could not be made (the tree, the key, a wheel)."""


@dataclass(frozen=True)
class Manifest:
    version: str
    files: dict[str, str]  # member path -> sha256 hex
    key_id: str
    created: str  # ISO 8601, UTC

    def to_json(self) -> bytes:
        body = {"format": FORMAT, "version": self.version, "key_id": self.key_id, "created": self.created,
                "files": dict(sorted(self.files.items()))}
        return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{MANIFEST} is not JSON: {exc}") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise BundleError(f"{MANIFEST}: not a pleaco manifest of format {FORMAT}")
        files = body.get("files")
        fields = (body.get("version"), body.get("key_id"), body.get("created"))
        if not all(isinstance(v, str) for v in fields) or not isinstance(files, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise BundleError(f"{MANIFEST}: version, key_id, created (strings) and files (path: sha256) expected")
        return cls(version=body["version"], files=dict(files), key_id=body["key_id"], created=body["created"])

    @property
    def pleaco_wheel(self) -> str | None:
        """The member path of pleaco's own wheel at this version, if the bundle has it."""
        prefix = f"{WHEELS}/pleaco-{self.version}-"
        return next((p for p in sorted(self.files) if p.startswith(prefix) and p.endswith(".whl")), None)


def parse_version(text: str) -> tuple[int, ...]:
    """``1.2.3`` as ``(1, 2, 3)``; anything else (pre-releases, local tags) is refused:
    pleaco's releases are plain dotted numbers, and an upgrade must compare them exactly."""
    if not _VERSION.fullmatch(text):
        raise BundleError(f"version {text!r} is not a dotted number such as 0.3.0")
    return tuple(int(p) for p in text.split("."))


def newer(candidate: str, running: str) -> bool:
    a, b = parse_version(candidate), parse_version(running)
    width = max(len(a), len(b))  # 1.2 == 1.2.0
    return a + (0,) * (width - len(a)) > b + (0,) * (width - len(b))


# -- keys ---------------------------------------------------------------------------

def key_id(public_key: bytes) -> str:
    return node_id_for(public_key)  # the same derivation as a node id: checkable from the key


def keygen(out_dir: Path) -> tuple[Path, Path]:
    """A new release key pair in ``out_dir``: ``release.key`` (seed, hex, 0600) and
    ``release.pub`` (raw public key, hex). Refuses to overwrite an existing key."""
    private, public = out_dir / "release.key", out_dir / "release.pub"
    for path in (private, public):
        if path.exists():
            raise BuildError(f"{path} exists; move it away or choose another --out")
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    write_secret_file(private, (seed.hex() + "\n").encode())
    public.write_text(_public_bytes(key).hex() + "\n")
    return private, public


def _public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise BuildError(f"release key {path}: {exc.strerror or exc}") from None
    if not _KEY_HEX.fullmatch(text):
        raise BuildError(f"release key {path}: expected 64 hex digits (a file made by `pleaco release keygen`)")
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(text))


def trusted_public_keys(entries: Sequence[str]) -> dict[str, bytes]:
    """``[upgrade] trusted_keys`` as {key id: raw public key}. Each entry is 64 hex digits
    or the path of a file holding them; an entry that is neither is an error naming it."""
    out: dict[str, bytes] = {}
    for entry in entries:
        text = entry.strip()
        if not _KEY_HEX.fullmatch(text):
            try:
                text = Path(entry).read_text().strip()
            except OSError as exc:
                raise BundleError(f"trusted key {entry!r}: neither 64 hex digits nor a readable key file "
                                  f"({exc.strerror or exc})") from None
            if not _KEY_HEX.fullmatch(text):
                raise BundleError(f"trusted key file {entry}: expected 64 hex digits (a release.pub)")
        raw = bytes.fromhex(text)
        out[key_id(raw)] = raw
    return out


# -- verifying ----------------------------------------------------------------------

def _safe_name(name: str) -> str:
    """A member name as a relative path inside the bundle, or BundleError (traversal)."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or str(path) != name:
        raise BundleError(f"member {name!r} is not a plain relative path (path traversal?)")
    return name


def _members(tar: tarfile.TarFile) -> Iterator[tuple[str, IO[bytes]]]:
    """Every member of ``tar`` in order, as (checked name, readable data); a member that is
    not a regular file, a name seen twice, or a traversal raises BundleError."""
    seen: set[str] = set()
    for member in tar:
        name = _safe_name(member.name)
        if not member.isfile():
            raise BundleError(f"member {name!r} is not a regular file (links and devices are refused)")
        if name in seen:
            raise BundleError(f"member {name!r} appears twice")
        seen.add(name)
        data = tar.extractfile(member)
        assert data is not None  # a regular file always has data
        yield name, data


def _sha256(data: IO[bytes], copy_to: IO[bytes] | None = None) -> str:
    digest = hashlib.sha256()
    while chunk := data.read(1 << 20):
        digest.update(chunk)
        if copy_to is not None:
            copy_to.write(chunk)
    return digest.hexdigest()


def open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except FileNotFoundError:
        raise BundleError(f"bundle {path} does not exist") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(f"bundle {path} is not a tar file ({exc})") from None


def verify_bundle(path: Path, trusted_keys: Sequence[str], running_version: str) -> Manifest:
    """Check the bundle at ``path`` whole and answer its manifest, or raise BundleError.

    Checked in order: a readable, complete tar of plain relative regular files; a manifest
    signed by one of ``trusted_keys``; every file listed present with its digest and nothing
    else; pleaco's wheel at the manifest's version; a version newer than ``running_version``.
    """
    keys = trusted_public_keys(trusted_keys)
    if not keys:
        raise BundleError("no trusted release keys: set [upgrade] trusted_keys")
    manifest_raw = signature = None
    digests: dict[str, str] = {}
    try:
        with open_tar(path) as tar:
            for name, data in _members(tar):
                if name == MANIFEST:
                    manifest_raw = data.read()
                elif name == SIGNATURE:
                    signature = data.read()
                else:
                    digests[name] = _sha256(data)
    except (tarfile.TarError, EOFError, OSError) as exc:  # a member cut short while reading
        raise BundleError(f"bundle {path} is truncated or damaged ({exc})") from None
    if manifest_raw is None or signature is None:
        raise BundleError(f"bundle {path} has no {MANIFEST} or no {SIGNATURE}: not a pleaco release bundle")
    signer = next((kid for kid, pub in keys.items() if verify(pub, signature, manifest_raw)), None)
    if signer is None:
        try:
            claimed = Manifest.from_json(manifest_raw).key_id
        except BundleError:
            claimed = ""
        if claimed and claimed not in keys:
            raise BundleError(f"bundle is signed by key {claimed}, which is not in [upgrade] trusted_keys")
        raise BundleError("bad signature: manifest.sig does not verify with any trusted key")
    manifest = Manifest.from_json(manifest_raw)
    if manifest.key_id != signer:
        raise BundleError(f"manifest names key {manifest.key_id} but is signed by {signer}")
    for name in sorted(manifest.files):
        _safe_name(name)
        if name not in digests:
            raise BundleError(f"file {name} is in the manifest but missing from the bundle")
        if digests[name] != manifest.files[name]:
            raise BundleError(f"file {name}: sha256 {digests[name]} differs from the manifest's {manifest.files[name]}")
    extra = sorted(set(digests) - set(manifest.files))
    if extra:
        raise BundleError(f"file {extra[0]} is in the bundle but not in the manifest")
    parse_version(manifest.version)
    if manifest.pleaco_wheel is None:
        raise BundleError(f"the bundle has no pleaco wheel of version {manifest.version}")
    try:
        parse_version(running_version)
    except BundleError:
        raise BundleError(f"the running version {running_version!r} is not comparable; refusing to upgrade") from None
    if not newer(manifest.version, running_version):
        raise BundleError(f"version {manifest.version} is not newer than the running {running_version}")
    return manifest


def extract_wheels(path: Path, manifest: Manifest, dest: Path) -> None:
    """Write the manifest's files of the bundle under ``dest``, each checked again against
    its digest as it is written (the file may have changed since it was verified)."""
    with open_tar(path) as tar:
        for name, data in _members(tar):
            if name not in manifest.files:
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as out:
                digest = _sha256(data, out)
            if digest != manifest.files[name]:
                raise BundleError(f"file {name} changed since the bundle was verified")


# -- building -----------------------------------------------------------------------

Progress = Callable[[str], None]


def _patch_version(tree: Path, version: str) -> None:
    """Set the version in the (copied) tree: ``__version__`` and pyproject's ``version``."""
    for rel, name in (("pleaco/__init__.py", "__version__"), ("pyproject.toml", "version")):
        path = tree / rel
        new, count = re.subn(rf'^{name} = "[^"]*"', f'{name} = "{version}"', path.read_text(), count=1, flags=re.M)
        if count != 1:
            raise BuildError(f"{rel}: no {name} line to set")
        path.write_text(new)


def _tree_version(tree: Path) -> str:
    match = re.search(r'^__version__ = "([^"]*)"', (tree / "pleaco" / "__init__.py").read_text(), re.M)
    if match is None:
        raise BuildError(f"{tree}/pleaco/__init__.py has no __version__")
    return match.group(1)


def _pip(args: list[str], what: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise BuildError(f"{what} failed:\n{tail}")


def build_bundle(tree: Path, key: Path, out: Path, version: str | None = None, *,
                 wheels: Path | None = None, progress: Progress | None = None) -> Manifest:
    """Make a signed bundle of the pleaco source ``tree`` at ``out`` and answer its manifest.

    ``version`` overrides the tree's (a temporary copy is patched; the tree is not touched).
    Dependency wheels come from ``wheels`` (default ~/.cache/pleaco/wheels), filled from the
    package index only when it cannot satisfy pyproject's dependencies.
    """
    say = progress or (lambda _line: None)
    private = load_private_key(key)
    if not (tree / "pyproject.toml").is_file() or not (tree / "pleaco" / "__init__.py").is_file():
        raise BuildError(f"{tree} is not a pleaco source tree (no pyproject.toml or pleaco/__init__.py)")
    version = version or _tree_version(tree)
    try:
        parse_version(version)
    except BundleError as exc:
        raise BuildError(str(exc)) from None
    cache = wheels or DEFAULT_WHEEL_CACHE
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pleaco-bundle-") as tmp_name:
        tmp = Path(tmp_name)
        src, stage = tmp / "src", tmp / "stage"
        (stage / WHEELS).mkdir(parents=True)
        shutil.copytree(tree / "pleaco", src / "pleaco", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (tree / name).is_file():
                shutil.copy2(tree / name, src / name)
        _patch_version(src, version)
        say(f"building the pleaco {version} wheel")
        own = ["wheel", "--no-deps", "-q", "-w", str(stage / WHEELS), str(src)]
        try:  # offline with the running Python's setuptools, when it can make wheels (setuptools 70.1+ or wheel)
            _pip([*own, "--no-build-isolation"], "building pleaco's wheel")
        except BuildError:
            _pip(own, "building pleaco's wheel")  # in an isolated build environment from the package index
        deps = tomllib.loads((src / "pyproject.toml").read_text())["project"].get("dependencies", [])
        if deps:
            offline = ["wheel", "-q", "--no-index", "--find-links", str(cache), "-w", str(stage / WHEELS), *deps]
            try:
                _pip(offline, "collecting dependency wheels")
                say(f"dependency wheels from {cache}")
            except BuildError:
                say(f"fetching dependency wheels into {cache} (first build: this takes a while)")
                _pip(["wheel", "-q", "-w", str(cache), *deps], "fetching dependency wheels")
                _pip(offline, "collecting dependency wheels")
        files = {}
        for whl in sorted((stage / WHEELS).iterdir()):
            with open(whl, "rb") as f:
                files[f"{WHEELS}/{whl.name}"] = _sha256(f)
        manifest = Manifest(version=version, files=files, key_id=key_id(_public_bytes(private)),
                            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        raw = manifest.to_json()
        say(f"signing {len(files)} files with key {manifest.key_id}")
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in ((MANIFEST, raw), (SIGNATURE, private.sign(raw))):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                tar.addfile(info, io.BytesIO(data))
            for name in sorted(files):
                tar.add(stage / name, arcname=name, recursive=False)
        os.replace(partial, out)
    return manifest
