"""The [gossip] table: memberlist's defaults, validation, and loading from the file and the environment."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from pleaco import config
from pleaco.cluster.config import GossipConfig
from pleaco.config import ConfigError, load


@pytest.fixture(autouse=True)
def no_system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a real /etc/pleaco/pleaco.toml on the test machine out of the tests."""
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", tmp_path / "absent" / "pleaco.toml")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pleaco.toml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_loaded_when_nothing_is_set() -> None:
    g = GossipConfig()
    assert g.validate() == []
    assert 0 < g.probe_timeout < g.probe_interval
    assert 512 <= g.max_packet <= 65000
    assert load(env={}).gossip == GossipConfig()


@pytest.mark.parametrize("name", ["probe_interval", "probe_timeout", "gossip_interval", "push_pull_interval",
                                  "replay_window", "seed_retry", "stream_timeout"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_durations_must_be_positive(name: str, value: float) -> None:
    changes: dict[str, Any] = {name: value}
    g = dataclasses.replace(GossipConfig(), **changes)
    assert f"gossip.{name}: must be greater than 0" in g.validate()


def test_probe_timeout_below_interval() -> None:
    assert GossipConfig(probe_interval=1.0, probe_timeout=0.999).validate() == []
    for timeout in (1.0, 2.0):
        assert GossipConfig(probe_interval=1.0, probe_timeout=timeout).validate() == [
            "gossip.probe_timeout: must be less than probe_interval"]


@pytest.mark.parametrize("name", ["indirect_checks", "gossip_nodes", "retransmit_mult", "load_retransmit_mult",
                                  "suspicion_mult", "suspicion_max_timeout_mult", "awareness_max_multiplier"])
def test_counts_must_be_at_least_one(name: str) -> None:
    assert dataclasses.replace(GossipConfig(), **{name: 1}).validate() == []
    for value in (0, -3):
        assert dataclasses.replace(GossipConfig(), **{name: value}).validate() == [f"gossip.{name}: must be at least 1"]


@pytest.mark.parametrize(("value", "ok"), [(511, False), (512, True), (1400, True), (65000, True), (65001, False)])
def test_max_packet_bounds(value: int, ok: bool) -> None:
    problems = GossipConfig(max_packet=value).validate()
    assert problems == ([] if ok else ["gossip.max_packet: must be between 512 and 65000"])


def test_every_problem_is_reported() -> None:
    g = GossipConfig(probe_interval=0, gossip_nodes=0, max_packet=10)
    assert g.validate() == [
        "gossip.probe_interval: must be greater than 0",
        "gossip.probe_timeout: must be less than probe_interval",
        "gossip.gossip_nodes: must be at least 1",
        "gossip.max_packet: must be between 512 and 65000",
    ]


def test_gossip_table_from_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
name = "n1"

[gossip]
probe_interval = 2
probe_timeout = 0.75
indirect_checks = 5
max_packet = 9000
""")
    cfg = load(path, env={})
    assert cfg.name == "n1"
    assert cfg.gossip == GossipConfig(probe_interval=2.0, probe_timeout=0.75, indirect_checks=5, max_packet=9000)
    assert isinstance(cfg.gossip.probe_interval, float)


def test_unknown_gossip_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[gossip]\nprobe_intervall = 2.0\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'gossip\.probe_intervall'"):
        load(path, env={})


def test_gossip_must_be_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'gossip' must be a table"):
        load(write(tmp_path, 'gossip = "fast"\n'), env={})


@pytest.mark.parametrize(("line", "name"), [
    ('indirect_checks = "3"', "gossip.indirect_checks"),
    ("indirect_checks = 3.5", "gossip.indirect_checks"),
    ("indirect_checks = true", "gossip.indirect_checks"),
    ('probe_interval = "1s"', "gossip.probe_interval"),
    ("probe_interval = false", "gossip.probe_interval"),
    ("max_packet = [1400]", "gossip.max_packet"),
])
def test_wrong_types_name_the_setting(tmp_path: Path, line: str, name: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{name}: expected"):
        load(write(tmp_path, f"[gossip]\n{line}\n"), env={})


@pytest.mark.parametrize(("text", "message"), [
    ("probe_interval = 1.0\nprobe_timeout = 1.5", "gossip.probe_timeout: must be less than probe_interval"),
    ("max_packet = 100", "gossip.max_packet: must be between 512 and 65000"),
    ("retransmit_mult = 0", "gossip.retransmit_mult: must be at least 1"),
    ("replay_window = -1.0", "gossip.replay_window: must be greater than 0"),
    ("push_pull_interval = inf", "gossip.push_pull_interval: must be a finite number"),
    ("probe_interval = nan", "gossip.probe_interval: must be a finite number"),
])
def test_invalid_values_from_the_file(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, f"[gossip]\n{text}\n"), env={})


def test_env_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[gossip]\nprobe_interval = 2.0\nprobe_timeout = 0.5\ngossip_nodes = 4\n")
    cfg = load(path, env={"PLEACO_GOSSIP_PROBE_INTERVAL": "3.5", "PLEACO_GOSSIP_RETRANSMIT_MULT": "6"})
    assert cfg.gossip.probe_interval == 3.5
    assert cfg.gossip.retransmit_mult == 6
    assert cfg.gossip.gossip_nodes == 4  # from the file, untouched by the env
    assert load(env={"PLEACO_GOSSIP_PROBE_INTERVAL": "2"}).gossip.probe_interval == 2.0
    assert load(path, env={"PLEACO_GOSSIP_PROBE_TIMEOUT": "1.5"}).gossip.probe_timeout == 1.5


@pytest.mark.parametrize(("env", "message"), [
    ({"PLEACO_GOSSIP_PROBE_INTERVAL": "fast"}, "gossip.probe_interval: expected float"),
    ({"PLEACO_GOSSIP_PROBE_INTERVAL": "0.4", "PLEACO_GOSSIP_PROBE_TIMEOUT": "0.4"},
     "gossip.probe_timeout: must be less than probe_interval"),
    ({"PLEACO_GOSSIP_PROBE_INTERVAL": "nan"}, "gossip.probe_interval: must be a finite number"),
    ({"PLEACO_GOSSIP_MAX_PACKET": "1400.0"}, "gossip.max_packet: expected int"),
])
def test_bad_env_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(env=env)


def test_unrelated_env_is_ignored() -> None:
    assert load(env={"PLEACO_GOSSIP_NOPE": "1", "PLEACO_GOSSIP": "x"}).gossip == GossipConfig()
