"""One owner per app decides what must be decided once for the whole cluster: three real
agents, a failing rollout, and the owner killed before its deadline. Exactly one rollback
happens, decided by the next owner from the cluster-wide health in the route records."""

from __future__ import annotations

from collections.abc import Callable

from agentproc import AgentProcess, form_cluster, metric, states, wait_for
from conftest import HELLO

from pleaco.placement import app_owner

Factory = Callable[..., AgentProcess]
DEADLINE = 15  # seconds a release has to turn healthy everywhere


def test_the_next_owner_rolls_back_once_when_the_owner_dies_mid_rollout(agent_factory: Factory) -> None:
    agents = form_cluster(agent_factory, 3, env={"PLEACO_ROLLOUT_DEADLINE": str(DEADLINE),
                                                 "PLEACO_HEALTH_GRACE": "2"})
    by_id = {a.node_id: a for a in agents}
    body = {"image": HELLO, "replicas": 3, "port": 8080, "health": "/healthz"}
    agents[0].client.deploy("web", body)
    wait_for(lambda: all(a.client.app("web")["healthy"] == 3 for a in agents), 60, "v1 healthy everywhere")

    owner = by_id[app_owner("web", sorted(by_id))]
    survivors = [a for a in agents if a is not owner]
    next_owner = by_id[app_owner("web", sorted(a.node_id for a in survivors))]
    # v2 never passes its health check; the owner dies at once, long before its deadline.
    survivors[0].client.deploy("web", {**body, "health": "/missing"})
    wait_for(lambda: owner.client.app("web")["revision"] == 2, 20, "the owner saw revision 2")
    owner.kill()
    wait_for(lambda: all(states(a)[owner.node_id] == "dead" for a in survivors), 30, "the owner declared dead")

    def rolled_back() -> bool:
        apps = [a.client.app("web") for a in survivors]
        return all(app["revision"] == 3 and (app["rollback"] or {}).get("to") == 1 for app in apps)

    wait_for(rolled_back, DEADLINE + 45, "revision 2 rolled back to revision 1's spec, seen by every survivor")
    # The rolled-back release turns healthy on the survivors; then look at who decided.
    wait_for(lambda: all(a.client.app("web")["healthy"] == 3 for a in survivors), 60, "revision 3 healthy")
    counts = {a.node_id: metric(a, "pleaco_rollbacks_total") for a in survivors}
    assert counts == {a.node_id: (1.0 if a is next_owner else 0.0) for a in survivors}, counts
    assert "rolled back" in survivors[0].client.app("web")["message"]
    assert all(a.client.app("web")["revision"] == 3 for a in survivors)  # one rollback, not two
