"""App secrets over a real store (pleaco.stacks.secrets): what the writes are, what a
replica gets, and that a release is not started before the secret version it was made for."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from pleaco.apps import AppStore
from pleaco.builds.secrets import SecretBox
from pleaco.identity import Identity
from pleaco.runtime import RunSpec
from pleaco.stacks.secrets import AppSecrets, SecretInputError, SecretNotFound, SecretsNotReady

IDENTITY = Identity.generate()


@pytest.fixture
def secrets(tmp_path: Path) -> Iterator[AppSecrets]:
    from pleaco.store import Store

    store = Store(tmp_path / "state.db", IDENTITY)
    apps = AppStore(store, max_replicas=10)
    apps.deploy("web", {"image": "img", "env": {"A": "spec", "B": "spec"}})
    yield AppSecrets(store, apps, SecretBox(tmp_path), tmp_path)
    store.close()


def test_set_seals_rolls_and_gives_env_and_files(secrets: AppSecrets, tmp_path: Path) -> None:
    secrets.put("web", "B", {"value": "from-secret"})
    secrets.put("web", "TOKEN", {"value": "t0k", "mount": "file"})
    spec = secrets.apps.get("web")
    assert spec is not None and spec.revision == 3 and set(spec.secrets) == {"B", "TOKEN"}
    assert "from-secret" not in str(secrets.store.value("secret", "app/web/B"))  # sealed
    assert "from-secret" not in str(secrets.apps.releases("web"))
    run = RunSpec(app="web", node="n" * 32, release=3, replica=0, image="img", env=spec.env)
    given = secrets.give(spec, run)
    assert given.env == {"A": "spec", "B": "from-secret"}  # a secret wins over the spec's variable
    ((src, dst, mode),) = given.binds
    assert (dst, mode) == ("/run/secrets", "ro")
    assert (Path(src) / "TOKEN").read_text() == "t0k" and (Path(src) / "TOKEN").stat().st_mode & 0o777 == 0o400
    assert secrets.sweep({run.name}) == 0 and secrets.sweep(set()) == 1 and not Path(src).exists()


def test_a_release_waits_for_its_secret_version(secrets: AppSecrets) -> None:
    secrets.put("web", "K", {"value": "old"})
    spec = secrets.apps.get("web")
    assert spec is not None
    # A release made for a later value than this node holds (the records spread one by one).
    newer = dataclasses.replace(spec, secrets={"K": "9" * 13 + "-ffffffff"})
    with pytest.raises(SecretsNotReady, match="K"):
        secrets.material(newer)
    with pytest.raises(SecretsNotReady, match="MISSING"):
        secrets.material(dataclasses.replace(spec, secrets={**spec.secrets, "MISSING": "0000000000001-00"}))
    assert secrets.material(spec).env == {"K": "old"}
    # Removed after the release was made: not waited for, not given.
    secrets.remove("web", "K")
    assert secrets.material(spec).env == {}


def test_bad_input_changes_nothing(secrets: AppSecrets) -> None:
    before = secrets.store.count()
    for key, body, what in [("1X", {"value": "v"}, "key"), ("K", {"value": ""}, "empty"),
                            ("K", {"value": "a\x00b"}, "NUL"), ("K", {"value": "v", "mount": "tmpfs"}, "mount"),
                            ("K", {"value": 5}, "string"), ("K", ["v"], "body")]:
        with pytest.raises(SecretInputError, match=what):
            secrets.put("web", key, body)
    with pytest.raises(SecretNotFound, match="nope"):
        secrets.put("nope", "K", {"value": "v"})
    with pytest.raises(SecretNotFound, match="K"):
        secrets.remove("web", "K")
    assert secrets.store.count() == before


def test_deploy_and_rollback_keep_the_secrets_and_rm_takes_them(secrets: AppSecrets) -> None:
    secrets.put("web", "K", {"value": "v"})
    stamps = secrets.apps.get("web").secrets  # type: ignore[union-attr]
    secrets.apps.deploy("web", {"image": "img2"})
    assert secrets.apps.get("web").secrets == stamps  # type: ignore[union-attr]
    secrets.apps.rollback("web")
    assert secrets.apps.get("web").secrets == stamps  # type: ignore[union-attr]
    secrets.apps.remove("web")
    assert secrets.store.value("secret", "app/web/K") is None


def test_reseal_keeps_the_mount_and_stamp(secrets: AppSecrets) -> None:
    secrets.put("web", "K", {"value": "v", "mount": "file"})
    rec = secrets.store.value("secret", "app/web/K")
    assert rec is not None
    secrets.store.put("secret", "app/web/K", {"scheme": "plain", "data": "v", "mount": "file", "stamp": rec["stamp"]})
    assert secrets.box.reseal(secrets.store) == 1
    after = secrets.store.value("secret", "app/web/K")
    assert after is not None and after["mount"] == "file" and after["stamp"] == rec["stamp"]
    assert after["scheme"] == "local-v1" and secrets.material(secrets.apps.get("web")).files == {"K": "v"}  # type: ignore[arg-type]
