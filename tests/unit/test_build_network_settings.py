"""build.network's settings and what each mode gives a build (the isolated network's
firewall is tested on the real engine in tests/integration/test_build_network.py)."""

from __future__ import annotations

import pytest

from pleaco.builds.config import BuildConfig
from pleaco.builds.network import BuildNetwork


def test_the_default_is_isolated_and_valid() -> None:
    cfg = BuildConfig()
    assert cfg.network == "isolated" and cfg.network_allow == [] and cfg.validate() == []


@pytest.mark.parametrize(("cfg", "problem"), [
    (BuildConfig(network="bridge"), "build.network: expected one of isolated, none, host-reachable, got 'bridge'"),
    (BuildConfig(network_allow=["10.0.5.0/33"]), "build.network_allow: '10.0.5.0/33' is not an IPv4 network"),
    (BuildConfig(network_allow=["mirror.lan"]), "build.network_allow: 'mirror.lan' is not an IPv4 network"),
])
def test_bad_settings_are_named(cfg: BuildConfig, problem: str) -> None:
    problems = cfg.validate()
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_none_and_host_reachable_need_no_network_of_pleacos() -> None:
    # engine None: these modes make no engine or firewall call.
    assert BuildNetwork(None, "none").prepare() == "none"  # type: ignore[arg-type]
    assert BuildNetwork(None, "host-reachable").prepare() is None  # type: ignore[arg-type]


def test_a_bad_mode_or_bridge_name_is_refused() -> None:
    with pytest.raises(ValueError, match=r"build\.network: expected one of"):
        BuildNetwork(None, "open")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="longer than 15 characters"):
        BuildNetwork(None, bridge="pleaco-build-network")  # type: ignore[arg-type]
