"""What a container of an app's release is made of on this node: one recipe for the app
loop's replicas and for the app's jobs (pleaco.stacks.jobs), so that a job runs as a
replica of the same release does: its image, environment, entrypoint and command, limits,
named volumes, and, with the cluster network, the ``pleaco`` network and the resolvers that
answer ``NAME.internal`` (and a stack's search domain)."""

from __future__ import annotations

from pleaco.apps import AppSpec
from pleaco.reconcile.view import NodeView
from pleaco.runtime import RunSpec


def release_container(spec: AppSpec, view: NodeView, replica: int) -> RunSpec:
    """Replica ``replica`` of ``spec``'s release on this node, as ``view`` says the node
    runs containers now (its network, once made; its resolvers; where ports are published).
    What the app's secrets add comes on top (pleaco.reconcile.provision)."""
    on_network = bool(view.network)
    return RunSpec(
        app=spec.name, node=view.node_id, release=spec.revision, replica=replica,
        image=spec.image, port=spec.port, env=spec.env, publish_host=view.publish_host,
        publish=view.publish_ports, network=view.network,
        dns=view.resolvers if on_network else (),
        dns_search=(f"{spec.stack}.{view.names_suffix}",) if spec.stack and on_network else (),
        command=spec.command, entrypoint=spec.entrypoint,
        healthcheck=spec.health_cmd.to_docker() if spec.health_cmd else None,
        memory=spec.memory, nano_cpus=round(spec.cpus * 1e9) if spec.cpus else None, pids=spec.pids,
        volumes=tuple((m.name, m.path) for m in spec.volumes),
    )
