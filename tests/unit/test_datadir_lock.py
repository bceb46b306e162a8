"""The data dir lock: one holder at a time, named by pid; released, it can be taken again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pleaco.errors import Conflict
from pleaco.host.datadir import DataDirInUse, DataDirLock


def test_one_holder_at_a_time_named_by_pid(tmp_path: Path) -> None:
    first, second = DataDirLock(tmp_path), DataDirLock(tmp_path)
    first.acquire()
    with pytest.raises(DataDirInUse, match=f"pid {os.getpid()}") as err:
        second.acquire()
    assert isinstance(err.value, Conflict) and err.value.code == "data_dir_in_use"
    first.release()
    second.acquire()  # free again
    assert (tmp_path / "agent.lock").read_text().strip() == str(os.getpid())
    second.release()
