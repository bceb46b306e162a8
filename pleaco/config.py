"""One typed configuration for the agent: file (/etc/pleaco/pleaco.toml) < env < flags.

Every tunable lives here with its default and the reason for it. The file is TOML with
the same names as the fields below; the environment uses ``PLEACO_`` plus the upper-cased
name (``PLEACO_API_LISTEN=127.0.0.1:7400``). An unknown key or a value of the wrong type is
an error naming the key, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pleaco.api.config import ApiConfig
from pleaco.apps import AppDefaults
from pleaco.builds.config import BuildConfig
from pleaco.cluster.config import ClusterSettings
from pleaco.errors import InvalidInput
from pleaco.host.config import UpgradeSettings
from pleaco.hostport import HostPortError
from pleaco.hostport import parse_host_port as parse_host_port  # re-exported: the agent's and tests' HOST:PORT parser
from pleaco.ingress.config import IngressSettings
from pleaco.net.config import NetworkSettings
from pleaco.stacks.config import VolumeSettings
from pleaco.ui.config import UiConfig

DEFAULT_CONFIG_FILE = Path("/etc/pleaco/pleaco.toml")


class ConfigError(InvalidInput, ValueError, code="invalid_config"):
    """A configuration value that is missing, unknown or malformed."""


@dataclass
class Config(ClusterSettings, IngressSettings):
    """The agent's settings. A part's own settings are a dataclass beside its code that
    this one inherits (the keys stay top-level in pleaco.toml), or a table of its own
    ([gossip], [proxy], [rollout], [build]); a part is handed only its own. The cluster's
    (data_dir, name, api_listen, gossip_listen, advertise, seeds, join_token, discovery,
    bootstrap, bootstrap_secret and [gossip]) are in pleaco/cluster/config.py."""

    # Docker Engine endpoint; the docker SDK's own default.
    docker_url: str = "unix:///var/run/docker.sock"
    # Seconds to wait for one Docker Engine call before counting the engine unreachable.
    docker_timeout: float = 30.0
    # Tombstones are dropped after this long (seconds); a day outlasts any partition we
    # expect to heal by itself.
    tombstone_ttl: float = 86400.0
    # Largest API request body (bytes). App specs are small; 1 MiB leaves room for env.
    max_body_bytes: int = 1 << 20
    # Log level: debug, info, warning, error.
    log_level: str = "info"
    # The API's connection, timeout and body limits: the [api] table (see pleaco/api/config.py).
    api: ApiConfig = field(default_factory=ApiConfig)
    # The build pipeline's tunables: the [build] table (see pleaco/builds/config.py).
    build: BuildConfig = field(default_factory=BuildConfig)
    # Release bundles, slots and the trial after a switch: the [upgrade] table (pleaco/host/config.py).
    upgrade: UpgradeSettings = field(default_factory=UpgradeSettings)
    # Every replica's limits when its deploy names none: the [apps] table (pleaco/apps.py).
    apps: AppDefaults = field(default_factory=AppDefaults)
    # Container subnets, routes, WireGuard, service names, isolation: the [network] table
    # (pleaco/net/config.py).
    network: NetworkSettings = field(default_factory=NetworkSettings)
    # The web dashboard's history and live views: the [ui] table (see pleaco/ui/config.py).
    ui: UiConfig = field(default_factory=UiConfig)
    # App volumes' snapshot helper and loop: the [volumes] table (see pleaco/stacks/config.py).
    volumes: VolumeSettings = field(default_factory=VolumeSettings)

    @property
    def api_host_port(self) -> tuple[str, int]:
        return parse_host_port(self.api_listen, "api_listen")

    @property
    def db_path(self) -> Path:
        return self.data_dir / "state.db"

    @property
    def token_path(self) -> Path:
        return self.data_dir / "admin.token"


Fields = dict[str, "dataclasses.Field[Any]"]


def _default(f: dataclasses.Field[Any]) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[operator]


_FIELDS: Fields = {f.name: f for f in dataclasses.fields(Config)}
# Settings that are tables of their own ([gossip]): a dataclass of plain settings each.
_TABLES: dict[str, Fields] = {
    name: {g.name: g for g in dataclasses.fields(_default(f))}
    for name, f in _FIELDS.items()
    if dataclasses.is_dataclass(_default(f))
}


def _coerce(name: str, raw: Any, from_text: bool, fields: Fields = _FIELDS) -> Any:
    """Turn a TOML value (or an env string) into the field's type, or raise ConfigError.

    ``name`` is the setting's full name ("gossip.probe_interval") for messages.
    """
    default = _default(fields[name.rpartition(".")[2]])
    kind = type(default)
    try:
        if kind is bool:
            if from_text:
                return str(raw).lower() in ("1", "true", "yes", "on")
            if not isinstance(raw, bool):
                raise TypeError
            return raw
        if kind is list:
            if from_text:
                return [s for s in str(raw).replace(",", " ").split() if s]
            if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
                raise TypeError
            return list(raw)
        if issubclass(kind, Path):
            if not isinstance(raw, str):
                raise TypeError
            return Path(raw)
        if kind is int:
            if isinstance(raw, bool):
                raise TypeError
            return int(raw) if from_text else _exact(raw, int)
        if kind is float:
            if isinstance(raw, bool):
                raise TypeError
            return float(raw) if from_text or isinstance(raw, int) else _exact(raw, float)
        if not isinstance(raw, str):
            raise TypeError
        return raw
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {raw!r}") from None


def _exact(raw: Any, kind: type) -> Any:
    if not isinstance(raw, kind):
        raise TypeError
    return raw


def load(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config from the file, then the environment, then explicit overrides.

    ``path`` None means the default file if it exists; a path given explicitly must exist.
    Overrides whose value is None are ignored (a flag that was not given).
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {name: {} for name in _TABLES}
    if path is None:
        path = Path(env["PLEACO_CONFIG"]) if "PLEACO_CONFIG" in env else None
        if path is None and DEFAULT_CONFIG_FILE.exists():
            path = DEFAULT_CONFIG_FILE
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        for key, raw in data.items():
            if key in _TABLES:
                if not isinstance(raw, dict):
                    raise ConfigError(f"config file {path}: {key!r} must be a table ([{key}])")
                for sub_key, sub_raw in raw.items():
                    if sub_key not in _TABLES[key]:
                        raise ConfigError(f"config file {path}: unknown setting '{key}.{sub_key}'")
                    tables[key][sub_key] = _coerce(f"{key}.{sub_key}", sub_raw, False, _TABLES[key])
                continue
            if key not in _FIELDS:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")
            values[key] = _coerce(key, raw, from_text=False)
    for name in _FIELDS:
        if name in _TABLES:
            for sub_name in _TABLES[name]:
                env_name = f"PLEACO_{name.upper()}_{sub_name.upper()}"
                if env_name in env:
                    tables[name][sub_name] = _coerce(f"{name}.{sub_name}", env[env_name], True, _TABLES[name])
            continue
        env_name = "PLEACO_" + name.upper()
        if env_name in env:
            values[name] = _coerce(name, env[env_name], from_text=True)
    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = _coerce(key, raw, from_text=isinstance(raw, str))
    for name, table in tables.items():
        values[name] = type(_default(_FIELDS[name]))(**table)
    cfg = Config(**values)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    for name in ("api_listen", "gossip_listen", "proxy_listen"):
        try:
            parse_host_port(getattr(cfg, name), name)
        except HostPortError as exc:
            raise ConfigError(str(exc)) from None
    if cfg.discovery not in ("mdns", "seeds", "none"):
        raise ConfigError(f"discovery: expected mdns, seeds or none, got {cfg.discovery!r}")
    if cfg.bootstrap not in ("manual", "auto", "first"):
        raise ConfigError(f"bootstrap: expected manual, auto or first, got {cfg.bootstrap!r}")
    if cfg.bootstrap == "first" and cfg.join_token:
        raise ConfigError("bootstrap: 'first' founds a new cluster, so it takes no join_token (remove one of them)")
    if cfg.bootstrap == "auto" and (cfg.discovery != "mdns" or len(cfg.bootstrap_secret) < 8):
        raise ConfigError("bootstrap: 'auto' needs discovery = \"mdns\" and a bootstrap_secret of 8+ characters")
    if cfg.max_replicas < 0:
        raise ConfigError("max_replicas: must be at least 0")
    if cfg.start_concurrency < 1:
        raise ConfigError("start_concurrency: must be at least 1")
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name}: must be a finite number, got {value}")
    for name in ("reconcile_interval", "backoff_base", "backoff_max", "health_timeout", "health_grace",
                 "docker_timeout", "image_recheck_interval", "tombstone_ttl", "loop_stuck_after"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}: must be greater than 0")
    for name in _TABLES:
        table = getattr(cfg, name)
        for g in dataclasses.fields(table):
            value = getattr(table, g.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name}.{g.name}: must be a finite number, got {value}")
        problems = table.validate()
        if problems:
            raise ConfigError(problems[0])
    labels = cfg.cluster_domain.split(".")
    if not all(re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", label) for label in labels):
        raise ConfigError(f"cluster_domain: {cfg.cluster_domain!r} is not a DNS name (lower-case labels)")
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level: expected debug, info, warning or error, got {cfg.log_level!r}")
