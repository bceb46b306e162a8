"""One agent per data dir: a second agent on a data dir in use refuses to start, naming
the first one's pid, and changes nothing; once the first is gone (even killed), it starts."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest
from agentproc import AgentProcess, free_port

Factory = Callable[..., AgentProcess]


def test_a_second_agent_on_a_data_dir_in_use_refuses_naming_the_first(agent_factory: Factory) -> None:
    args = ["--proxy-image=", "--gossip-listen", f"127.0.0.1:{free_port()}"]
    first = agent_factory("node", extra_args=args)
    assert first.proc is not None
    second = AgentProcess(first.data_dir, extra_args=["--proxy-image=", "--gossip-listen", f"127.0.0.1:{free_port()}"])
    with pytest.raises(RuntimeError, match="exited"):
        second.start()
    assert second.proc is not None and second.proc.returncode not in (0, None)
    assert f"is in use by another agent (pid {first.proc.pid})" in second.log_tail()
    assert first.client.status()["node_id"] == first.node_id  # the first is untouched
    # Killed, the first leaves no lock behind: the kernel drops it with the process.
    first.stop(signal.SIGKILL)
    second.start()
    try:
        assert second.node_id == first.node_id  # the same data dir, the same identity
    finally:
        second.cleanup()
