"""A connected repository's compose file: ``build`` parsed (pleaco.stacks.compose), the build
context cut from the commit's tarball (pleaco.builds.stackbuild), the compose file found
(pleaco.builds.source, real git), pleaco.toml beside it, and the check and deploy the build
pipeline runs (pleaco.stacks.service.RepoStacks over a real store)."""

from __future__ import annotations

import asyncio
import io
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pleaco.apps import AppStore
from pleaco.builds import source
from pleaco.builds.manifest import ManifestError, parse
from pleaco.builds.model import Build as BuildRecord
from pleaco.builds.stackbuild import ContextError, ServiceBuild, context_tarball, read_text
from pleaco.identity import Identity
from pleaco.stacks.compose import MAX_SERVICES, PENDING_IMAGE, Build, ComposeError, plan
from pleaco.stacks.service import RepoStacks, StackConflict, StackService
from pleaco.store import Store
from pleaco.store.record import MAX_RECORD_BYTES, gossip_size

MAX = 10


def services(**svcs: Any) -> dict[str, Any]:
    return {"services": svcs}


def test_build_short_and_long_forms() -> None:
    p = plan("st", services(
        web={"build": "./web", "ports": [8080]},
        root={"build": "."},
        api={"build": {"context": "src/api/", "dockerfile": "docker/Dockerfile.prod",
                       "args": {"VERSION": 2, "DEBUG": False}}, "image": "registry.example/api:1"},
        listed={"build": {"args": ["A=1", "B=x=y"]}},
        kv={"image": "pleaco/busybox:latest"}), MAX, builds=True)
    built = {s.name: s.build for s in p.services}
    assert built == {"web": Build("web", "Dockerfile", {}), "root": Build("", "Dockerfile", {}),
                     "api": Build("src/api", "docker/Dockerfile.prod", {"VERSION": "2", "DEBUG": "false"}),
                     "listed": Build("", "Dockerfile", {"A": "1", "B": "x=y"}), "kv": None}
    # Until the build has made it, a built service's image is a placeholder; the build's
    # images replace it, and the other services keep theirs.
    assert p.service("api").body["image"] == PENDING_IMAGE
    done = p.with_images({"web": "sha256:" + "a" * 64, "root": "r", "api": "a", "listed": "l"})
    assert done.service("web").body == {"image": "sha256:" + "a" * 64, "port": 8080}
    assert done.service("kv").body["image"] == "pleaco/busybox:latest"
    with pytest.raises(ValueError, match="web"):
        p.with_images({"root": "r", "api": "a", "listed": "l"})


@pytest.mark.parametrize(("build", "where"), [
    ("https://github.com/o/r.git", "services.web.build.context: 'https://github.com/o/r.git': only a path"),
    ("/srv/web", "services.web.build.context: '/srv/web': only a path"),
    ("../elsewhere", "services.web.build.context: '../elsewhere' is outside the repository"),
    ({"context": "a/../../b"}, "services.web.build.context: 'a/../../b' is outside"),
    ({"dockerfile": "../Dockerfile"}, "services.web.build.dockerfile: '../Dockerfile' is outside"),
    ({"target": "prod"}, "services.web.build.target: not supported by pleaco"),
    ({"args": ["BARE"]}, "services.web.build.args: expected NAME=VALUE"),
    ({"args": {"1X": "a"}}, "services.web.build.args: '1X' is not a build argument name"),
    ({"args": {"X": [1]}}, "services.web.build.args.X: expected a string"),
    (7, "services.web.build: expected a directory"),
])
def test_bad_build_keys_name_the_service_and_key(build: Any, where: str) -> None:
    with pytest.raises(ComposeError) as info:
        plan("st", services(web={"build": build}), MAX, builds=True)
    assert str(info.value).startswith(where), str(info.value)


def test_stack_deploy_runs_images_only() -> None:
    with pytest.raises(ComposeError, match=r"^services\.web\.build: not supported by stack deploy"):
        plan("st", services(web={"build": "."}), MAX)
    with pytest.raises(ComposeError, match=r"^services\.web\.image: required"):
        plan("st", services(web={"ports": [80]}), MAX, builds=True)


def tarball(path: Path, files: dict[str, str]) -> Path:
    """A tarball as ``git archive`` makes one: directories, then their files."""
    with tarfile.open(path, "w") as tar:
        for name in sorted({str(Path(f).parent) for f in files} - {"."}):
            info = tarfile.TarInfo(name + "/")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return path


def test_a_services_context_is_its_directory_of_the_commit(tmp_path: Path) -> None:
    src = tarball(tmp_path / "src.tar", {"compose.yaml": "x", "web/Dockerfile": "FROM a", "web/app/main.sh": "echo",
                                         "webby/secret": "no", "Dockerfile": "FROM b"})
    ctx = context_tarball(src, ServiceBuild("web", "st-web", "web", "Dockerfile", {}), tmp_path / "ctx" / "web.tar")
    with tarfile.open(ctx) as tar:
        assert sorted(m.name for m in tar.getmembers() if m.isfile()) == ["Dockerfile", "app/main.sh"]
        f = tar.extractfile("app/main.sh")
        assert f is not None and f.read() == b"echo"
    assert context_tarball(src, ServiceBuild("r", "st-r", "", "Dockerfile", {}), tmp_path / "r.tar") == src
    for build, message in ((ServiceBuild("api", "st-api", "api", "Dockerfile", {}), "context: no directory 'api'"),
                           (ServiceBuild("web", "st-web", "web", "Prod.Dockerfile", {}),
                            "dockerfile: no file 'web/Prod.Dockerfile'")):
        with pytest.raises(ContextError, match=f"^services\\.{build.service}\\.build\\.{message}"):
            context_tarball(src, build, tmp_path / "x.tar")


def test_env_files_are_read_from_the_commit_only(tmp_path: Path) -> None:
    src = tarball(tmp_path / "src.tar", {"deploy/web.env": "A=1\n", "deploy/compose.yaml": "x"})
    read = read_text(src, "deploy")
    assert read("web.env") == "A=1\n"
    for name in ("/etc/passwd", "../../etc/passwd"):
        with pytest.raises(OSError, match="not a file in the repository"):
            read(name)
    with pytest.raises(FileNotFoundError, match=r"no file 'deploy/other\.env'"):
        read("other.env")
    with tarfile.open(src, "a") as tar:
        link = tarfile.TarInfo("deploy/link.env")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(OSError, match="not a file of the repository"):
        read("link.env")


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_the_fetched_source_holds_the_first_compose_file_of_the_specs_names(tmp_path: Path) -> None:
    work = tmp_path / "repo"
    work.mkdir()
    (work / "docker-compose.yml").write_text("services: {old: {image: a}}\n")
    (work / "compose.yml").write_text("services: {new: {image: b}}\n")
    git("init", "-q", "-b", "main", cwd=work)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "one", cwd=work)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True, text=True).stdout.strip()
    src = source.fetch(tmp_path / "data", "st", str(work), commit, 30)
    assert (src.compose_file, src.compose_raw, src.manifest_text) == (
        "compose.yml", b"services: {new: {image: b}}\n", None)


def test_pleaco_toml_beside_a_compose_file_builds_tests_and_scans() -> None:
    m = parse('[build]\nargs = {A = "1"}\n[test]\ncommand = ["true"]\n[scan]\nfail_on = "high"\n',
              beside="compose.yaml")
    assert (m.build_args, m.test_command, m.fail_on) == ({"A": "1"}, ["true"], "high")
    for text, where in (("[run]\nport = 80\n", r"\[run\]"), ("[scale]\nmax = 2\n", r"\[scale\]"),
                        ('[jobs.x]\ncron = "0 3 * * *"\ncommand = "x"\n', r"\[jobs\]"),
                        ('[build]\ndockerfile = "D"\n', r"\[build\] dockerfile")):
        with pytest.raises(ManifestError, match=rf"^pleaco\.toml: {where}: not used beside compose\.yaml"):
            parse(text, beside="compose.yaml")
        parse(text)  # alone, pleaco.toml says it


@pytest.fixture
def repo_stacks(tmp_path: Path) -> Iterator[RepoStacks]:
    """RepoStacks over a real store, with its event loop in a thread of its own as the
    agent's is (the build pipeline calls it from a worker thread)."""
    store = Store(tmp_path / "state.db", Identity.generate())
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    apps = AppStore(store, max_replicas=MAX)
    try:
        yield RepoStacks(StackService(apps, lambda app: True, lambda: None), loop)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        store.close()


COMPOSE = b"""
services:
  web: {build: ./web, ports: [8080], env_file: web.env}
  kv: {image: "pleaco/busybox:latest"}
"""


def test_a_repository_stack_is_checked_whole_then_deployed_with_the_built_images(repo_stacks: RepoStacks) -> None:
    files = {"web.env": "GREETING=hi\n"}

    def read(name: str) -> str:
        if name not in files:
            raise FileNotFoundError(name)
        return files[name]

    checked = repo_stacks.check("shop", "compose.yaml", COMPOSE, read)
    assert checked.builds == (ServiceBuild("web", "shop-web", "web", "Dockerfile", {}),)
    apps = repo_stacks.stacks.apps
    assert apps.count() == 0  # a check writes nothing
    first = checked.deploy({"web": "sha256:" + "1" * 64}, {"commit": "c1", "build": "shop-c1"})
    assert sorted((r.service, r.revision, r.changed) for r in first) == [("kv", 1, True), ("web", 1, True)]
    web = apps.get("shop-web")
    assert web is not None and web.stack == "shop" and web.env == {"GREETING": "hi"}
    assert apps.releases("shop-web")[-1]["commit"] == "c1"
    # The same image again: nothing changes; another: web alone.
    again = checked.deploy({"web": "sha256:" + "1" * 64}, {"commit": "c2", "build": "shop-c2"})
    assert [r.changed for r in again] == [False, False]
    third = checked.deploy({"web": "sha256:" + "2" * 64}, {"commit": "c3", "build": "shop-c3"})
    assert sorted((r.service, r.revision, r.changed) for r in third) == [("kv", 1, False), ("web", 2, True)]

    # Errors name the file, the service and the key; nothing is written.
    apps.deploy("other-kv", {"image": "pleaco/busybox:latest"})  # a plain app in stack other's way
    before = apps.store.count()
    for raw, message in ((COMPOSE.replace(b"kv: {", b"kv: {privileged: true, "),
                          r"^compose\.yaml: services\.kv\.privileged: not supported"),
                         (COMPOSE.replace(b"web.env", b"missing.env"),
                          r"^compose\.yaml: services\.web\.env_file missing\.env: cannot read it"),
                         (b"services: [", r"^compose\.yaml: not valid YAML")):
        with pytest.raises(ComposeError, match=message):
            repo_stacks.check("shop", "compose.yaml", raw, read)
    with pytest.raises(StackConflict, match=r"^compose\.yaml: services\.kv: app 'other-kv' exists"):
        repo_stacks.check("other", "compose.yaml", COMPOSE, read)
    assert apps.store.count() == before


def test_a_stacks_build_record_fits_with_its_most_services() -> None:
    finding = {"id": "CVE-2026-0001", "package": "p" * 60, "installed": "1" * 30, "fixed": "2" * 30,
               "severity": "critical", "summary": "s" * 200}
    entry = {"app": "a" * 63, "image": "sha256:" + "f" * 64, "tag": "pleaco-build/" + "a" * 63 + ":" + "c" * 12,
             "test": {"command": ["sh", "-c", "x" * 100], "exit_code": 0, "timed_out": False, "output": "o" * 1024},
             "scan": {"scanner": "pleaco-osv", "packages": 100, "fail_on": "critical",
                      "findings": [finding] * 10, "blocking": 0},
             "revision": 10**6, "changed": True}
    b = BuildRecord(id="a" * 50 + "-" + "c" * 12, app="a" * 50, commit="c" * 40, repo="r" * 256, branch="main",
              compose="docker-compose.yaml", services={f"s{i:061d}": dict(entry) for i in range(MAX_SERVICES)})
    value = b.record_value()
    assert gossip_size("build", b.id, value) <= MAX_RECORD_BYTES
    assert set(value["services"]) == set(b.services) and all("image" in e for e in value["services"].values())
