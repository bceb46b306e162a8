"""Source: fetch exactly one commit with git, keep it as a content-addressed tarball.

Each app has a bare cache repository (``DATA_DIR/build/git/APP.git``); a build fetches only
the commit it builds, shallow (``git fetch --depth 1 URL SHA``, which GitHub and any git
server speaking protocol v2 allow), and ``git archive`` turns it into
``DATA_DIR/build/sources/APP/SHA.tar``. The tarball is named by the commit (itself a hash of
the tree) and its SHA-256 goes into the build record; it is kept for rebuilds and rollbacks,
so the same commit is never fetched twice.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pleaco.builds.manifest import FILENAME
from pleaco.builds.stackbuild import COMPOSE_FILES
from pleaco.errors import PleacoError

COMMIT = re.compile(r"^[0-9a-f]{40}$")
ZERO_COMMIT = "0" * 40
# git must never ask for a password on a terminal or a GUI: a private repo without
# credentials fails at once with git's message.
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/true", "SSH_ASKPASS": "/bin/true",
           "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new"}


class SourceError(PleacoError, RuntimeError, code="source_failed"):
    """The commit could not be fetched or archived; the message says why (git's words)."""


@dataclass(frozen=True)
class GitAuth:
    """Credentials for a private repository: an HTTPS token (GitHub's personal access or
    installation token) or an SSH deploy key (the private key's text)."""

    token: str | None = None
    ssh_key: str | None = None

    @contextlib.contextmanager
    def env(self, scratch: Path) -> Iterator[dict[str, str]]:
        """Environment for git carrying these credentials. Passed in the environment (not on
        the command line, which every user can read in ps); a deploy key lives in a 0600 file
        only for the duration of the git command."""
        env: dict[str, str] = {}
        if self.token:
            basic = base64.b64encode(f"x-access-token:{self.token}".encode()).decode()
            env |= {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraHeader",
                    "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}"}
        if not self.ssh_key:
            yield env
            return
        scratch.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=scratch, prefix="key-")
        try:
            with os.fdopen(fd, "w") as f:  # mkstemp makes it 0600
                f.write(self.ssh_key.rstrip("\n") + "\n")
            env["GIT_SSH_COMMAND"] = (f"ssh -i {name} -o IdentitiesOnly=yes -o BatchMode=yes "
                                      "-o StrictHostKeyChecking=accept-new")
            yield env
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)


@dataclass(frozen=True)
class Source:
    commit: str
    tarball: Path
    sha256: str
    manifest_text: str | None  # pleaco.toml at the repository root, if any
    # The compose file at the root (pleaco.builds.stackbuild.COMPOSE_FILES, the first found),
    # if any: its name and bytes.
    compose_file: str | None = None
    compose_raw: bytes | None = None


def _git(args: list[str], timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=timeout,
                              env={**os.environ, **GIT_ENV, **(env or {})})
    except subprocess.TimeoutExpired:
        raise SourceError(f"git {args[0]} did not finish within {timeout:.0f}s") from None
    except FileNotFoundError:
        raise SourceError("git is not installed on this node") from None
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        raise SourceError(f"git {args[0]} failed: {err[-1] if err else 'exit ' + str(done.returncode)}")
    return done.stdout.decode(errors="replace")


def ls_remote(url: str, branch: str, timeout: float, auth: GitAuth | None = None,
              scratch: Path | None = None) -> str | None:
    """The commit the branch points to, or None when it does not exist (polling fallback)."""
    with (auth or GitAuth()).env(scratch or Path(tempfile.gettempdir())) as env:
        out = _git(["ls-remote", "--", url, f"refs/heads/{branch}"], timeout, env=env)
    for line in out.splitlines():
        sha, _, ref = line.partition("\t")
        if ref == f"refs/heads/{branch}" and COMMIT.fullmatch(sha):
            return sha
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(data_dir: Path, app: str, url: str, commit: str, timeout: float, auth: GitAuth | None = None) -> Source:
    """The tarball of ``commit`` from ``url``, fetched unless already stored."""
    if not COMMIT.fullmatch(commit):
        raise SourceError(f"{commit!r} is not a full commit id")
    # Per app: a commit another app fetched with its credentials must not reach an app
    # connected without them.
    sources = data_dir / "build" / "sources" / app
    sources.mkdir(parents=True, exist_ok=True)
    tarball = sources / f"{commit}.tar"
    if not tarball.exists():
        repo = data_dir / "build" / "git" / f"{app}.git"
        if not (repo / "HEAD").exists():
            repo.mkdir(parents=True, exist_ok=True)
            _git(["init", "--bare", "-q", str(repo)], timeout)
        with (auth or GitAuth()).env(data_dir / "build" / "keys") as env:
            try:
                _git(["fetch", "-q", "--depth", "1", "--no-tags", "--", url, commit], timeout, cwd=repo, env=env)
            except SourceError as exc:
                # Old servers refuse a want of a bare commit id (protocol v0 without
                # allowReachableSHA1InWant): fetch the branch heads and look for it there.
                try:
                    _git(["fetch", "-q", "--no-tags", "--", url, "+refs/heads/*:refs/remotes/origin/*"], timeout,
                         cwd=repo, env=env)
                    _git(["cat-file", "-e", f"{commit}^{{commit}}"], timeout, cwd=repo)
                except SourceError:
                    raise exc from None
        tmp = tarball.with_suffix(".tmp")
        _git(["archive", "--format=tar", "-o", str(tmp), commit], timeout, cwd=repo)
        os.replace(tmp, tarball)
    with tarfile.open(tarball) as tar:
        raw = _member(tar, FILENAME)
        manifest = None if raw is None else raw.decode("utf-8", "replace")
        compose = next(((name, raw) for name in COMPOSE_FILES if (raw := _member(tar, name)) is not None), None)
    return Source(commit, tarball, _sha256(tarball), manifest, *(compose or (None, None)))


def _member(tar: tarfile.TarFile, name: str) -> bytes | None:
    """The bytes of file ``name`` in the tarball, None when it has none."""
    try:
        member = tar.getmember(name)
    except KeyError:
        return None
    f = tar.extractfile(member)
    return f.read() if f else None
