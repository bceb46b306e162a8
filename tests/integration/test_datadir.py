"""One agent per data dir and per address: a second agent on a data dir in use, or on an
address (API, gossip, proxy, proxy admin) a running agent holds, refuses to start naming
the first one's pid, and changes nothing; once the first is gone (even killed), it starts."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest
from agentproc import AgentProcess, ProxyPorts

Factory = Callable[..., AgentProcess]


def test_a_second_agent_on_a_data_dir_in_use_refuses_naming_the_first(agent_factory: Factory) -> None:
    first = agent_factory("node")
    assert first.proc is not None
    second = AgentProcess(first.data_dir)
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


@pytest.mark.parametrize("shared", ["proxy", "proxy https", "proxy admin", "proxy activator", "gossip"])
def test_a_second_agent_on_an_address_in_use_refuses_naming_the_first(agent_factory: Factory, shared: str) -> None:
    mine = ProxyPorts()
    first = agent_factory("first", extra_args=mine.args(), env=mine.env())
    assert first.proc is not None
    # The second: its own data dir and ports, but for the one it shares with the first.
    roles = {"proxy": "http", "proxy https": "https", "proxy admin": "admin", "proxy activator": "activator"}
    theirs = ProxyPorts(**({roles[shared]: getattr(mine, roles[shared])} if shared in roles else {}))
    args2 = theirs.args()
    if shared == "gossip":
        args2 += ["--gossip-listen", f"0.0.0.0:{first.gossip_port}"]  # the wildcard overlaps 127.0.0.1
    second = agent_factory("second", extra_args=args2, env=theirs.env(), start=False)
    with pytest.raises(RuntimeError, match="exited"):
        second.start()
    assert second.proc is not None and second.proc.returncode not in (0, None)
    named = f"in use by another agent on this host (pid {first.proc.pid}, data dir {first.data_dir}"
    assert f"{shared} address" in second.log_tail() and named in second.log_tail()
    assert not (second.data_dir / "node.key").exists() and not (second.data_dir / "state.db").exists()
    assert first.client.status()["node_id"] == first.node_id  # the first is untouched
    # Gone (killed, its registry entry left behind), the first no longer blocks the second.
    first.stop(signal.SIGKILL)
    second.start()
    assert second.client.status()["node_id"] == second.node_id
