"""Docker Swarm mode on this engine for the baselines (scale, rollout), on loopback only,
and put back as it was found, also on failure.

``SwarmMode`` runs ``docker swarm init --advertise-addr 127.0.0.1 --listen-addr
127.0.0.1:2377`` when the engine is not in Swarm mode, and on exit ``docker swarm leave
--force`` plus removal of the ``docker_gwbridge`` network that ``swarm init`` created (leaving
does not remove it). An engine already in Swarm mode (as a manager) is used as it is and left
in it. Services are created with ``--no-resolve-image`` so that Swarm uses local images no
registry has.
"""

from __future__ import annotations

from benchmarks.common import LOOPBACK, BenchError, count_containers, docker_cli, log, remove_containers, wait_until

GWBRIDGE = "docker_gwbridge"


def service_label(service: str) -> str:
    """The label Swarm puts on every container of ``service``."""
    return f"com.docker.swarm.service.name={service}"


def remove_service(service: str, timeout: float = 60.0) -> None:
    """``docker service rm``, then wait for its containers to go; force-remove any left."""
    docker_cli("service", "rm", service, check=False)
    label = service_label(service)
    try:
        wait_until(lambda: count_containers([label], running_only=False) == 0,
                   timeout, f"swarm to remove the containers of {service}", interval=0.5)
    except BenchError as exc:
        log(f"swarm: {exc}; forcing")
        remove_containers([label])


class SwarmMode:
    """Swarm mode on for the ``with`` block (see the module doc)."""

    def __init__(self) -> None:
        self.initialised = False
        self.had_gwbridge = True

    def __enter__(self) -> SwarmMode:
        state = docker_cli("info", "--format", "{{.Swarm.LocalNodeState}}").strip()
        if state == "inactive":
            self.had_gwbridge = bool(docker_cli("network", "ls", "-q", "--filter", f"name=^{GWBRIDGE}$").strip())
            log("swarm: docker swarm init (on loopback)")
            self.initialised = True  # before init: a half-done init is still left on exit
            try:
                docker_cli("swarm", "init", "--advertise-addr", LOOPBACK, "--listen-addr", f"{LOOPBACK}:2377")
            except BaseException:
                self.__exit__()
                raise
        elif state == "active":
            if docker_cli("info", "--format", "{{.Swarm.ControlAvailable}}").strip() != "true":
                raise BenchError("this engine is a Swarm worker, not a manager; cannot create a service")
            log("swarm: already active; using it (and leaving it on afterwards)")
        else:
            raise BenchError(f"swarm is {state!r} on this engine; expected inactive or active")
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.initialised:
            return
        log("swarm: docker swarm leave --force")
        docker_cli("swarm", "leave", "--force", check=False)
        if not self.had_gwbridge:
            docker_cli("network", "rm", GWBRIDGE, check=False)
        self.initialised = False

    def remove_leftover(self, service: str) -> None:
        if docker_cli("service", "ls", "-q", "--filter", f"name={service}").strip():
            log(f"swarm: removing a leftover service {service}")
            remove_service(service)
