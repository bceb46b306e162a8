"""A compose file's ``secrets`` and ``x-pleaco-jobs`` (pleaco.stacks.compose), read, checked
and deployed by the stack service over a real store: the secrets become the apps' sealed
file secrets, the jobs their schedules of source ``stack``; bad input changes nothing."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pleaco.apps import AppStore
from pleaco.builds.secrets import SecretBox
from pleaco.identity import Identity
from pleaco.stacks.compose import ComposeError, load, plan, read_secrets
from pleaco.stacks.schedule import ScheduleStore, parse_schedule
from pleaco.stacks.secrets import MAX_SECRET_BYTES, AppSecrets
from pleaco.stacks.service import RepoStacks, SecretMissing, StackService
from pleaco.store import Store

MAX = 10
IMAGE = "pleaco/hello:latest"


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[StackService, AppSecrets, ScheduleStore]]:
    store = Store(tmp_path / "state.db", Identity.generate())
    apps = AppStore(store, max_replicas=MAX)
    secrets = AppSecrets(store, apps, SecretBox(tmp_path), tmp_path)
    schedules = ScheduleStore(store)
    yield StackService(apps, secrets, schedules, lambda app: True, lambda: None), secrets, schedules
    store.close()


def doc(web: dict[str, Any] | None = None, secrets: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"services": {"web": {"image": IMAGE, **(web or {})}}}
    if secrets is not None:
        out["secrets"] = secrets
    return out


def compose_error(document: Any, values: Any = None, builds: bool = False) -> str:
    with pytest.raises(ComposeError) as exc:
        plan("st", document, MAX, builds=builds, secret_values=values)
    return str(exc.value)


# -- reading (the CLI) -------------------------------------------------------------------


def test_the_cli_reads_file_and_environment_secrets_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "db.txt").write_text("s3cret\n")
    compose = tmp_path / "compose.yaml"
    compose.write_text("services:\n  web:\n    image: x\n    secrets: [db, token, ext]\n"
                       "secrets:\n  db:\n    file: ./keys/db.txt\n  token:\n    environment: API_TOKEN\n"
                       "  ext:\n    external: true\n")
    loaded = load(compose)
    assert read_secrets(loaded, tmp_path, {"API_TOKEN": "tok"}) == {"db": "s3cret\n", "token": "tok"}
    assert "s3cret" not in json.dumps(loaded)  # the document itself holds paths, never values

    with pytest.raises(ComposeError, match=r"^secrets\.token\.environment: variable API_TOKEN is not set"):
        read_secrets(loaded, tmp_path, {})
    (tmp_path / "keys" / "db.txt").write_bytes(b"x" * (MAX_SECRET_BYTES + 1))
    with pytest.raises(ComposeError, match=rf"^secrets\.db\.file \./keys/db\.txt: .*{MAX_SECRET_BYTES}") as big:
        read_secrets(loaded, tmp_path, {"API_TOKEN": "tok"})
    assert "xxxx" not in str(big.value)
    (tmp_path / "keys" / "db.txt").unlink()
    with pytest.raises(ComposeError, match=r"^secrets\.db\.file \./keys/db\.txt: cannot read it"):
        read_secrets(loaded, tmp_path, {"API_TOKEN": "tok"})


# -- checking (the server) ---------------------------------------------------------------


def test_secrets_and_jobs_map_onto_the_service() -> None:
    checked = plan("st", doc({"secrets": ["db", {"source": "ext", "target": "/run/secrets/api_key"}],
                              "x-pleaco-jobs": {"backup": {"cron": "0 3 * * *", "command": "sh -c 'echo hi'"},
                                                "vacuum": {"cron": "*/5 * * * *", "command": ["vacuum", 1]}}},
                             {"db": {"file": "db.txt"}, "ext": {"external": True}}),
                   MAX, secret_values={"db": "pw"})
    web = checked.service("web")
    assert [(s.source, s.target, s.value) for s in web.secrets] == [("ext", "api_key", None), ("db", "db", "pw")]
    assert [(j.name, j.cron.text, j.command) for j in web.jobs] == [
        ("backup", "0 3 * * *", ("sh", "-c", "echo hi")), ("vacuum", "*/5 * * * *", ("vacuum", "1"))]
    assert "pw" not in repr(checked)  # a plan in a log or an error shows no value
    # Compose's usual names, with dots and dashes, are file names under /run/secrets too.
    tls = plan("st", doc({"secrets": ["server.crt", {"source": "db-password", "target": "db-password"}]},
                         {"server.crt": {"file": "c"}, "db-password": {"file": "p"}}),
               MAX, secret_values={"server.crt": "cert", "db-password": "pw"})
    assert [s.target for s in tls.service("web").secrets] == ["db-password", "server.crt"]


@pytest.mark.parametrize(("web", "secrets", "values", "message"), [
    ({"secrets": ["nope"]}, {}, None, r"^services\.web\.secrets: secret 'nope' is not declared"),
    ({"secrets": [{"source": "db", "mode": "0440"}]}, {"db": {"file": "f"}}, {"db": "v"},
     r"^services\.web\.secrets\.mode: not supported by pleaco \(known: source, target; no uid, gid or mode"),
    ({"secrets": [{"source": "db", "uid": "1000"}]}, {"db": {"file": "f"}}, {"db": "v"},
     r"^services\.web\.secrets\.uid: not supported"),
    ({"secrets": [{"source": "db", "target": "a/b"}]}, {"db": {"file": "f"}}, {"db": "v"},
     r"^services\.web\.secrets: target 'a/b' is not a file name"),
    ({"secrets": [{"source": "db", "target": ".."}]}, {"db": {"file": "f"}}, {"db": "v"},
     r"^services\.web\.secrets: target '\.\.' is not a file name"),
    ({"secrets": [{"source": "db", "target": ".hidden"}]}, {"db": {"file": "f"}}, {"db": "v"},
     r"^services\.web\.secrets: target '\.hidden' is not a file name"),
    ({"secrets": ["db", {"source": "db"}]}, {"db": {"file": "f"}}, {"db": "v"},
     r"^services\.web\.secrets: two secrets with target 'db'"),
    ({"secrets": "db"}, {"db": {"file": "f"}}, {"db": "v"}, r"^services\.web\.secrets: expected a list"),
    ({}, {"db": {"file": "f"}}, None, r"^secrets\.db: its value was not sent"),
    ({}, {"db": {"file": "f", "name": "x"}}, {"db": "v"}, r"^secrets\.db\.name: not supported"),
    ({}, {"db": {"external": False}}, None, r"^secrets\.db\.external: only true"),
    ({}, {"db": {"driver": "x"}}, None,
     r"^secrets\.db\.driver: not supported by pleaco \(known: environment, external, file; "),
    ({}, {"db": "f"}, None, r"^secrets\.db: expected a mapping"),
    ({}, {"db": {"file": "f"}}, {"db": "v", "other": "w"}, r"^secrets\.other: a value was sent for a secret"),
    ({}, {"db": {"file": "f"}}, {"db": ""}, r"^secrets\.db\.file f: the value is empty"),
    ({}, {"db": {"file": "f"}}, {"db": "x" * (MAX_SECRET_BYTES + 1)}, rf"^secrets\.db\.file f: .*{MAX_SECRET_BYTES}"),
    ({}, {"db": {"environment": "V"}}, {"db": 5}, r"^secrets\.db\.environment V: expected a string"),
    ({"x-pleaco-jobs": {"backup": {"cron": "61 * * * *", "command": ["x"]}}}, None, None,
     r"^services\.web\.x-pleaco-jobs\.backup: .*61"),
    ({"x-pleaco-jobs": {"Bad_Name": {"cron": "* * * * *", "command": ["x"]}}}, None, None,
     r"^services\.web\.x-pleaco-jobs\.Bad_Name: job name"),
    ({"x-pleaco-jobs": {"backup": {"cron": "* * * * *", "command": ["x"], "user": "root"}}}, None, None,
     r"^services\.web\.x-pleaco-jobs\.backup\.user: not supported by pleaco \(known: command, cron\)$"),
    ({"x-pleaco-jobs": {"backup": {"cron": "* * * * *"}}}, None, None,
     r"^services\.web\.x-pleaco-jobs\.backup\.command: required"),
    ({"x-pleaco-jobs": {"backup": {"cron": "* * * * *", "command": []}}}, None, None,
     r"^services\.web\.x-pleaco-jobs\.backup: command: expected a non-empty list"),
    ({"x-pleaco-jobs": ["backup"]}, None, None, r"^services\.web\.x-pleaco-jobs: expected a mapping"),
    ({"x-pleaco-job": {}}, None, None, r"^services\.web\.x-pleaco-job: not supported by pleaco"),
])
def test_bad_secrets_and_jobs_name_where(web: dict[str, Any], secrets: dict[str, Any] | None, values: Any,
                                         message: str) -> None:
    error = compose_error(doc(web, secrets), values)
    assert re.match(message, error), error
    assert "xxxx" not in error


def test_a_repositorys_compose_file_has_only_external_secrets() -> None:
    for source in ({"file": "db.txt"}, {"environment": "DB"}):
        error = compose_error(doc({"secrets": ["db"]}, {"db": source}), builds=True)
        assert error.startswith(f"secrets.db.{next(iter(source))}: a connected repository's compose file")
        assert "external: true" in error
    assert plan("st", doc({"secrets": ["db"]}, {"db": {"external": True}}), MAX, builds=True).services[0].secrets


# -- deploying ---------------------------------------------------------------------------


def deploy(stacks: StackService, document: dict[str, Any], values: dict[str, str] | None = None) -> Any:
    return asyncio.run(stacks.deploy("st", document, secrets=values))


def test_secrets_are_sealed_file_secrets_that_roll_only_when_they_change(
        parts: tuple[StackService, AppSecrets, ScheduleStore]) -> None:
    stacks, secrets, _ = parts
    apps = stacks.apps
    with_db = doc({"secrets": ["db"]}, {"db": {"file": "db.txt"}})
    first = deploy(stacks, with_db, {"db": "pw-1"})
    spec = apps.get("st-web")
    assert spec is not None and first.services[0].revision == 1 and set(spec.secrets) == {"db"}
    assert secrets.material(spec).files == {"db": "pw-1"} and secrets.material(spec).env == {}
    raw = json.dumps([r.value for r in apps.store.records("secret")] + [r.value for r in apps.store.records("app")]
                     + [r.value for r in apps.store.records("release")])
    assert "pw-1" not in raw  # sealed in the secret record, a stamp only in the app and its releases

    same = deploy(stacks, with_db, {"db": "pw-1"})
    assert not same.services[0].changed and apps.get("st-web").revision == 1  # type: ignore[union-attr]
    changed = deploy(stacks, with_db, {"db": "pw-2"})
    assert changed.services[0].changed and apps.get("st-web").revision == 2  # type: ignore[union-attr]
    assert secrets.material(apps.get("st-web")).files == {"db": "pw-2"}  # type: ignore[arg-type]

    # One set by hand stays when the stack drops its own; the stack's goes, and that rolls.
    secrets.put("st-web", "BY_HAND", {"value": "h", "mount": "file"})
    dropped = deploy(stacks, doc())
    spec = apps.get("st-web")
    assert spec is not None and dropped.services[0].changed and set(spec.secrets) == {"BY_HAND"}
    assert secrets.material(spec).files == {"BY_HAND": "h"}
    assert [s.key for s in secrets.infos("st-web")] == ["BY_HAND"]


def test_an_external_secret_must_be_set_first_and_is_then_given(
        parts: tuple[StackService, AppSecrets, ScheduleStore]) -> None:
    stacks, secrets, _ = parts
    apps = stacks.apps
    ext = doc({"secrets": [{"source": "key", "target": "api_key"}]}, {"key": {"external": True}})
    with pytest.raises(SecretMissing) as missing:
        deploy(stacks, ext)
    assert "services.web.secrets: external secret 'key'" in str(missing.value)
    assert "pleaco secrets set st-web api_key --mount file" in str(missing.value)
    assert apps.get("st-web") is None and apps.store.count() == 0  # nothing deployed

    deploy(stacks, doc())
    secrets.put("st-web", "api_key", {"value": "k", "mount": "env"})
    with pytest.raises(SecretMissing, match="environment variable"):
        deploy(stacks, ext)
    secrets.put("st-web", "api_key", {"value": "k-1", "mount": "file"})
    revision = apps.get("st-web").revision  # type: ignore[union-attr]
    assert not deploy(stacks, ext).services[0].changed  # set by hand: its stamp is the app's already
    spec = apps.get("st-web")
    assert spec is not None and spec.revision == revision and secrets.material(spec).files == {"api_key": "k-1"}
    deploy(stacks, doc())  # dropped from the file: set by hand, it stays
    assert [s.key for s in secrets.infos("st-web")] == ["api_key"]


def test_jobs_are_the_apps_stack_schedules(parts: tuple[StackService, AppSecrets, ScheduleStore]) -> None:
    stacks, _, schedules = parts
    jobs = {"backup": {"cron": "0 3 * * *", "command": ["sh", "-c", "echo backup"]}}
    deploy(stacks, doc({"x-pleaco-jobs": jobs}))
    schedules.put(parse_schedule("st-web", "by-api", {"cron": "* * * * *", "command": ["true"]}))

    def listed() -> list[tuple[str, str, tuple[str, ...], str]]:
        return [(s.name, s.cron.text, s.command, s.source) for s in schedules.schedules("st-web")]

    assert listed() == [("backup", "0 3 * * *", ("sh", "-c", "echo backup"), "stack"),
                        ("by-api", "* * * * *", ("true",), "api")]
    deploy(stacks, doc({"x-pleaco-jobs": {"backup": {"cron": "0 4 * * *", "command": "backup.sh --all"}}}))
    assert listed()[0] == ("backup", "0 4 * * *", ("backup.sh", "--all"), "stack")
    before = stacks.apps.store.count()
    with pytest.raises(ComposeError, match=r"^services\.web\.x-pleaco-jobs\.backup: "):
        deploy(stacks, doc({"x-pleaco-jobs": {"backup": {"cron": "bad", "command": ["x"]}}}))
    assert stacks.apps.store.count() == before and listed()[0][1] == "0 4 * * *"
    deploy(stacks, doc())
    assert listed() == [("by-api", "* * * * *", ("true",), "api")]
    stacks.remove("st")
    assert schedules.schedules("st-web") == []


def test_a_repositorys_stack_names_the_file_and_takes_external_secrets(
        parts: tuple[StackService, AppSecrets, ScheduleStore]) -> None:
    stacks, secrets, _ = parts
    loop = asyncio.new_event_loop()
    try:
        repo = RepoStacks(stacks, loop)
        raw = f"services:\n  web:\n    image: {IMAGE}\n    secrets: [key]\nsecrets:\n  key: {{external: true}}\n"

        def nothing(name: str) -> str:
            raise FileNotFoundError(name)

        with pytest.raises(ComposeError, match=r"^compose\.yaml: secrets\.key\.file: a connected repository's"):
            repo.check("st", "compose.yaml", raw.replace("{external: true}", "{file: k.txt}").encode(), nothing)
        with pytest.raises(SecretMissing, match=r"^compose\.yaml: services\.web\.secrets: external secret 'key'"):
            repo.check("st", "compose.yaml", raw.encode(), nothing)
        assert stacks.apps.count() == 0
        deploy(stacks, doc())
        secrets.put("st-web", "key", {"value": "v", "mount": "file"})
        checked = repo.check("st", "compose.yaml", raw.encode(), nothing)
        asyncio.run(stacks.deploy_plan(checked.plan))
        assert secrets.material(stacks.apps.get("st-web")).files == {"key": "v"}  # type: ignore[arg-type]
    finally:
        loop.close()
