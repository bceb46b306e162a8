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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pleaco.apps import AppStore
from pleaco.builds import source
from pleaco.builds.engine import Cancel, Cancelled
from pleaco.builds.manifest import ManifestError, parse
from pleaco.builds.model import Build as BuildRecord
from pleaco.builds.secrets import SecretBox
from pleaco.builds.stackbuild import ContextError, ServiceBuild, context_tarball, read_text
from pleaco.identity import Identity
from pleaco.stacks.compose import MAX_SERVICES, PENDING_IMAGE, Build, ComposeError, plan
from pleaco.stacks.schedule import ScheduleStore
from pleaco.stacks.secrets import AppSecrets
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
    # A compose file kept for local development: pleaco.toml's app is built, the file left aside.
    assert not parse('[app]\ncompose = false\n[run]\nport = 80\n').compose and parse("").compose
    with pytest.raises(ManifestError, match=r"^pleaco\.toml: \[app\] compose: expected true or false"):
        parse('[app]\ncompose = "no"\n')


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
        secrets = AppSecrets(store, apps, SecretBox(tmp_path), tmp_path)
        yield RepoStacks(StackService(apps, secrets, ScheduleStore(store), lambda app: True, lambda: None), loop)
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
    first = checked.deploy({"web": "sha256:" + "1" * 64}, {"commit": "c1", "build": "shop-c1"}, Cancel())
    assert sorted((r.service, r.revision, r.changed) for r in first) == [("kv", 1, True), ("web", 1, True)]
    web = apps.get("shop-web")
    assert web is not None and web.stack == "shop" and web.env == {"GREETING": "hi"}
    assert apps.releases("shop-web")[-1]["commit"] == "c1"
    # The same image again: nothing changes; another: web alone.
    again = checked.deploy({"web": "sha256:" + "1" * 64}, {"commit": "c2", "build": "shop-c2"}, Cancel())
    assert [r.changed for r in again] == [False, False]
    third = checked.deploy({"web": "sha256:" + "2" * 64}, {"commit": "c3", "build": "shop-c3"}, Cancel())
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


# -- the build pipeline's stack path, with the engine faked (test_stack_repo.py runs it for real)


class FakeEngine:
    """The build engine's calls a stack's build makes: tests fail in an image one of whose
    files says FAIL; a push answers a digest."""

    def __init__(self, builder: FakeBuilder) -> None:
        self.builder = builder
        self.pushed: list[tuple[str, str, str]] = []
        self.tested: list[str] = []

    def labels(self, build_id: str, role: str) -> dict[str, str]:
        return {"pleaco.build": build_id, "pleaco.build-role": role}

    def image_id(self, ref: str) -> str | None:
        return None

    def tag(self, image: str, repository: str, tag: str) -> None:
        pass

    def run_to_completion(self, image: str, command: list[str], **kw: Any) -> Any:
        from pleaco.builds.engine import TestResult
        self.tested.append(image)
        failing = any(b"FAIL" in text for text in self.builder.made[image].values())
        return TestResult(1 if failing else 0, f"ran {image}", False)

    def push(self, image: str, repository: str, tag: str, **kw: Any) -> str:
        self.pushed.append((image, repository, tag))
        return "sha256:" + "d" * 64

    def remove_leftovers(self, build_ids: set[str] | None = None) -> int:
        return 0


class FakeBuilder:
    """Builds an image whose id is the hash of its context's files (as the layer cache makes
    an unchanged context the same image)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, list[str], str, dict[str, str]]] = []
        self.made: dict[str, dict[str, bytes]] = {}  # image -> its context's files

    def build(self, req: Any, log: Any, cancel: Any) -> str:
        import hashlib
        with tarfile.open(req.tarball) as tar:
            files = {m.name: (f.read() if (f := tar.extractfile(m)) else b"") for m in tar.getmembers() if m.isfile()}
        self.requests.append((req.app, sorted(files), req.dockerfile, req.build_args))
        assert req.dockerfile in files
        image = "sha256:" + hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()
        self.made[image] = files
        return image


@dataclass
class Pipeline:
    """A BuildService with the engine and builder faked, connected to a real git repository
    as app ``shop``; ``push`` commits files and runs the build in this thread."""

    svc: Any
    engine: FakeEngine
    builder: FakeBuilder
    work: Path
    conn: Any

    def push(self, change: dict[str, str]) -> Any:
        from pleaco.builds.service import _BuildCancel
        for name, text in change.items():
            (self.work / name).parent.mkdir(parents=True, exist_ok=True)
            (self.work / name).write_text(text)
        if not (self.work / ".git").exists():
            git("init", "-q", "-b", "main", cwd=self.work)
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "--allow-empty", "-m", "x", cwd=self.work)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=self.work, capture_output=True,
                                text=True).stdout.strip()
        b = self.svc.push(self.conn, commit).build
        assert b is not None
        self.svc._execute(b.id, _BuildCancel())
        return self.svc.builds.get(b.id)


def pipeline(tmp_path: Path, repo_stacks: RepoStacks, registry: str = "") -> Pipeline:
    from pleaco.builds.config import BuildConfig
    from pleaco.builds.service import BuildService

    apps = repo_stacks.stacks.apps
    builder = FakeBuilder()
    engine = FakeEngine(builder)
    svc = BuildService(BuildConfig(registry=registry), tmp_path / "data", "n1", apps.store, apps,
                       engine, stack_check=repo_stacks.check)  # type: ignore[arg-type]
    svc.builder = builder  # type: ignore[assignment]
    svc._packages_of = lambda image: []  # type: ignore[method-assign]
    work = tmp_path / "repo"
    work.mkdir()
    return Pipeline(svc, engine, builder, work, svc.connect("shop", str(work), None, None).connection)


def test_a_push_builds_tests_scans_and_pushes_each_service_then_deploys_the_stack(
        tmp_path: Path, repo_stacks: RepoStacks) -> None:
    apps = repo_stacks.stacks.apps
    pipe = pipeline(tmp_path, repo_stacks, "127.0.0.1:5000/team")
    engine, builder, push = pipe.engine, pipe.builder, pipe.push
    files = {"compose.yaml": "services:\n  api: {build: {context: api, args: {B: svc}}}\n"
                             "  root: {build: ., image: registry.example/root:1}\n  kv: {image: kv:1}\n",
             "pleaco.toml": '[build]\nargs = {A = "toml", B = "toml"}\n[test]\ncommand = ["true"]\n',
             "Dockerfile": "FROM root", "api/Dockerfile": "FROM api", "api/main.sh": "v1"}

    first = push(files)
    assert first.state == "succeeded", first.reason
    assert first.compose == "compose.yaml" and set(first.services) == {"api", "root", "kv"}
    # Each service's own context, its Dockerfile, pleaco.toml's args under its own.
    assert builder.requests == [("shop-api", ["Dockerfile", "main.sh"], "Dockerfile", {"A": "toml", "B": "svc"}),
                                ("shop-root", ["Dockerfile", "api/Dockerfile", "api/main.sh", "compose.yaml",
                                               "pleaco.toml"], "Dockerfile", {"A": "toml", "B": "toml"})]
    api, root = first.services["api"], first.services["root"]
    assert engine.tested == [api["image"], root["image"]] and api["test"]["exit_code"] == 0
    # Pushed by content: an image that did not change keeps its reference.
    assert engine.pushed == [(api["image"], "127.0.0.1:5000/team/shop-api", api["image"][7:19]),
                             (root["image"], "127.0.0.1:5000/team/shop-root", root["image"][7:19])]
    assert apps.get("shop-api").image == f"127.0.0.1:5000/team/shop-api:{api['image'][7:19]}"  # type: ignore[union-attr]
    assert apps.get("shop-kv").image == "kv:1"  # type: ignore[union-attr]
    assert first.release == 1 and all(s["changed"] for s in first.services.values())

    # api's source changes and root leaves the file: api alone is redeployed, root removed.
    second = push({"api/main.sh": "v2", "compose.yaml": files["compose.yaml"].replace("  root: {build: ., image: "
                                                                                     "registry.example/root:1}\n", "")})
    assert second.state == "succeeded", second.reason
    assert {k: (v["revision"], v["changed"]) for k, v in second.services.items()} == {
        "api": (2, True), "kv": (1, False)}
    assert apps.get("shop-root") is None  # dropped from the file: removed, as stack deploy does

    # A service whose tests fail fails the build, naming it; nothing is deployed.
    third = push({"api/main.sh": "FAIL"})
    assert (third.state, third.reason) == ("failed", "service api: tests failed (exit code 1)")
    assert apps.get("shop-api").revision == 2  # type: ignore[union-attr]



def test_a_cancelled_build_stops_a_deploy_waiting_on_dependencies(repo_stacks: RepoStacks) -> None:
    repo_stacks.stacks.healthy = lambda app: False  # kv never becomes healthy: web's wave waits
    raw = b"services:\n  web: {image: w, depends_on: [kv]}\n  kv: {image: k}\n"
    checked = repo_stacks.check("shop", "compose.yaml", raw, lambda name: "")
    cancel = Cancel()
    threading.Timer(0.2, cancel.cancel, ("superseded by build shop-next",)).start()
    with pytest.raises(Cancelled, match="superseded by build shop-next"):
        checked.deploy({}, {}, cancel)
    apps = repo_stacks.stacks.apps
    assert apps.get("shop-kv") is not None and apps.get("shop-web") is None  # the first wave stays


def test_pleaco_toml_may_leave_a_compose_file_aside(tmp_path: Path, repo_stacks: RepoStacks) -> None:
    """A compose file kept for local development beside a pleaco.toml app: [app] compose = false."""
    pipe = pipeline(tmp_path, repo_stacks)
    b = pipe.push({"compose.yaml": "services:\n  db: {image: postgres:16, privileged: true}\n",
                   "pleaco.toml": "[app]\ncompose = false\n[run]\nport = 8080\n", "Dockerfile": "FROM app"})
    assert b.state == "succeeded", b.reason
    assert (b.compose, b.services, b.release) == ("", {}, 1)
    apps = repo_stacks.stacks.apps
    assert [s.name for s in apps.specs()] == ["shop"] and apps.get("shop").image == b.image  # type: ignore[union-attr]
