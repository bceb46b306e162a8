"""A repository's [jobs.NAME] tables (pleaco/builds/manifest.py) and what a release makes
of them (ScheduleStore.replace_from_manifest): manifest schedules replaced, API ones kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from pleaco.builds.manifest import ManifestError, parse
from pleaco.identity import Identity
from pleaco.stacks.schedule import ScheduleStore, parse_schedule
from pleaco.store import Store

IDENTITY = Identity.generate()


def test_jobs_tables() -> None:
    m = parse('[jobs.backup]\ncron = "0 3 * * *"\ncommand = "pg_dump > /backup"\n'
              '[jobs.report]\ncron = "*/15 * * * mon-fri"\ncommand = ["report", "--daily"]\n')
    assert [(n, c.text, cmd) for n, c, cmd in m.jobs] == [
        ("backup", "0 3 * * *", ("sh", "-c", "pg_dump > /backup")),
        ("report", "*/15 * * * mon-fri", ("report", "--daily"))]
    assert parse("[app]\nname = 'x'\n").jobs == ()


@pytest.mark.parametrize(("text", "message"), [
    ('[jobs.backup]\ncron = "0 33 * * *"\ncommand = "x"', r"\[jobs.backup\] cron hour: 33 is out of range"),
    ('[jobs.backup]\ncron = "0 3 * * *"', r"\[jobs.backup\] command"),
    ('[jobs.backup]\ncommand = "x"', r"\[jobs.backup\] cron: expected a string"),
    ('[jobs.Bad]\ncron = "* * * * *"\ncommand = ["x"]', r"\[jobs.Bad\]: job name"),
    ("[jobs]\nbackup = 1", r"\[jobs\] backup: expected a table"),
    ('[jobs.b]\ncron = "* * * * *"\ncommand = ["x"]\nevery = 1', r"\[jobs.b\] every: unknown field"),
])
def test_bad_jobs_are_named(text: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse(text)


def test_a_release_replaces_the_manifest_schedules_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db", IDENTITY)
    try:
        schedules = ScheduleStore(store)
        schedules.put(parse_schedule("web", "by-hand", {"cron": "* * * * *", "command": ["true"]}))

        def release(text: str) -> None:
            schedules.replace_from_manifest("web", parse(text).jobs)

        release('[jobs.a]\ncron = "0 * * * *"\ncommand = "a"\n[jobs.b]\ncron = "0 * * * *"\ncommand = "b"\n')
        assert [(s.name, s.source) for s in schedules.schedules("web")] == [
            ("a", "manifest"), ("b", "manifest"), ("by-hand", "api")]
        release('[jobs.b]\ncron = "5 * * * *"\ncommand = "b"\n')
        assert [(s.name, s.cron.text) for s in schedules.schedules("web")] == [("b", "5 * * * *"),
                                                                               ("by-hand", "* * * * *")]
        release("")
        assert [s.name for s in schedules.schedules("web")] == ["by-hand"]
    finally:
        store.close()
