"""Docker Engine: the typed adapter and health probes."""

from pleaco.runtime.docker import (
    LABEL_APP,
    LABEL_NODE,
    LABEL_RELEASE,
    LABEL_REPLICA,
    Conflict,
    ContainerInfo,
    DockerRuntime,
    EngineCallFailed,
    EngineError,
    EngineUnavailable,
    ExitInfo,
    NotFound,
    RunSpec,
)

__all__ = [
    "LABEL_APP",
    "LABEL_NODE",
    "LABEL_RELEASE",
    "LABEL_REPLICA",
    "Conflict",
    "ContainerInfo",
    "DockerRuntime",
    "EngineCallFailed",
    "EngineError",
    "EngineUnavailable",
    "ExitInfo",
    "NotFound",
    "RunSpec",
]
