"""Agent configuration: defaults, file < env < overrides, and errors that name the key."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pleaco import config
from pleaco.config import Config, ConfigError, load, parse_host_port


@pytest.fixture(autouse=True)
def no_system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a real /etc/pleaco/pleaco.toml on the test machine out of the tests."""
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", tmp_path / "absent" / "pleaco.toml")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pleaco.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    cfg = load(env={})
    assert cfg == Config()
    assert cfg.data_dir == Path("/var/lib/pleaco")
    assert cfg.name == socket.gethostname()
    assert cfg.api_listen == "0.0.0.0:7400"
    assert cfg.gossip_listen == "0.0.0.0:7401"
    assert cfg.proxy_listen == "0.0.0.0:80"
    assert cfg.proxy_image == "caddy:2"
    assert cfg.seeds == []
    assert cfg.join_token == ""
    assert cfg.discovery == "mdns"
    assert cfg.max_replicas == 100
    assert cfg.api_host_port == ("0.0.0.0", 7400)
    assert cfg.db_path == Path("/var/lib/pleaco/state.db")
    assert cfg.token_path == Path("/var/lib/pleaco/admin.token")


def test_default_file_is_read_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'name = "from-default-file"\n')
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", path)
    assert load(env={}).name == "from-default-file"


def test_config_file_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "via-env-path"\n')
    assert load(env={"PLEACO_CONFIG": str(path)}).name == "via-env-path"


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml", env={})


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load(write(tmp_path, "name = \n"), env={})


def test_file_values_are_typed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'data_dir = "/srv/pleaco"\nmax_replicas = 7\nbackoff_base = 2\nhealth_timeout = 0.5\n'
        'seeds = ["10.0.0.1:7401", "10.0.0.2:7401"]\ndiscovery = "seeds"\n',
    )
    cfg = load(path, env={})
    assert cfg.data_dir == Path("/srv/pleaco")
    assert cfg.max_replicas == 7
    assert cfg.backoff_base == 2.0 and isinstance(cfg.backoff_base, float)
    assert cfg.health_timeout == 0.5
    assert cfg.seeds == ["10.0.0.1:7401", "10.0.0.2:7401"]
    assert cfg.discovery == "seeds"


def test_precedence_file_then_env_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "file"\napi_listen = "1.1.1.1:1"\nproxy_image = "file:1"\nmax_replicas = 5\n')
    env = {"PLEACO_NAME": "env", "PLEACO_API_LISTEN": "2.2.2.2:2", "PLEACO_MAX_REPLICAS": "6"}
    cfg = load(path, env=env, overrides={"name": "flag", "max_replicas": None})
    assert cfg.name == "flag"  # overrides beat env and file
    assert cfg.api_listen == "2.2.2.2:2"  # env beats file
    assert cfg.proxy_image == "file:1"  # file beats default
    assert cfg.max_replicas == 6  # an override of None (flag not given) is ignored


def test_env_values_are_parsed_from_text() -> None:
    cfg = load(env={"PLEACO_MAX_REPLICAS": "12", "PLEACO_DOCKER_TIMEOUT": "2.5", "PLEACO_DATA_DIR": "/d"})
    assert cfg.max_replicas == 12
    assert cfg.docker_timeout == 2.5
    assert cfg.data_dir == Path("/d")


def test_list_from_env() -> None:
    assert load(env={"PLEACO_SEEDS": "a:1,b:2"}).seeds == ["a:1", "b:2"]
    assert load(env={"PLEACO_SEEDS": " a:1 , b:2 ,"}).seeds == ["a:1", "b:2"]
    assert load(env={"PLEACO_SEEDS": ""}).seeds == []


def test_unrelated_env_is_ignored() -> None:
    assert load(env={"PLEACO_NOT_A_SETTING": "x", "HOME": "/root"}) == Config()


def test_unknown_key_in_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="api_listn"):
        load(write(tmp_path, 'api_listn = "0.0.0.0:1"\n'), env={})


def test_unknown_override_names_the_key() -> None:
    with pytest.raises(ConfigError, match="bogus_setting"):
        load(env={}, overrides={"bogus_setting": 1})


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('max_replicas = "ten"', "max_replicas"),
        ("max_replicas = 1.5", "max_replicas"),
        ("max_replicas = true", "max_replicas"),
        ("backoff_base = true", "backoff_base"),
        ('backoff_base = "1"', "backoff_base"),
        ("name = 3", "name"),
        ('seeds = "a:1"', "seeds"),
        ("seeds = [1, 2]", "seeds"),
        ("data_dir = 5", "data_dir"),
    ],
)
def test_wrong_type_in_file_names_the_key(tmp_path: Path, line: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load(write(tmp_path, line + "\n"), env={})


@pytest.mark.parametrize(
    ("name", "value", "key"),
    [("PLEACO_MAX_REPLICAS", "lots", "max_replicas"), ("PLEACO_BACKOFF_MAX", "1m", "backoff_max")],
)
def test_wrong_type_in_env_names_the_key(name: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load(env={name: value})


@pytest.mark.parametrize(
    "value", ["localhost", "localhost:", "host:http", "host:0", "host:65536", "host:-1", "1.2.3.4:99999", ""]
)
def test_bad_host_port_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="api_listen"):
        load(env={"PLEACO_API_LISTEN": value})


@pytest.mark.parametrize("key", ["gossip_listen", "proxy_listen"])
def test_bad_host_port_names_each_listen_key(key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load(env={}, overrides={key: "nope"})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:7400", ("127.0.0.1", 7400)),
        (":80", ("0.0.0.0", 80)),
        ("[::1]:8080", ("::1", 8080)),
        ("example.org:1", ("example.org", 1)),
        ("h:65535", ("h", 65535)),
    ],
)
def test_parse_host_port(value: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(value, "x") == expected


@pytest.mark.parametrize("value", ["mDNS", "dns", "", "seed"])
def test_bad_discovery_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="discovery"):
        load(env={"PLEACO_DISCOVERY": value})


@pytest.mark.parametrize("value", ["mdns", "seeds", "none"])
def test_good_discovery_values(value: str) -> None:
    assert load(env={"PLEACO_DISCOVERY": value}).discovery == value


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_replicas", -1),
        ("start_concurrency", 0),
        ("reconcile_interval", 0.0),
        ("backoff_base", -1.0),
        ("backoff_max", 0),
        ("health_timeout", 0.0),
        ("log_level", "verbose"),
    ],
)
def test_out_of_range_values_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        load(env={}, overrides={key: value})


def test_overrides_of_text_are_parsed_like_env() -> None:
    cfg = load(env={}, overrides={"max_replicas": "9", "seeds": "x:1,y:2", "data_dir": "/x"})
    assert cfg.max_replicas == 9
    assert cfg.seeds == ["x:1", "y:2"]
    assert cfg.data_dir == Path("/x")


@pytest.mark.parametrize("value", ["h:\u00b2", "h:\u0661\u0662", "h:", "h:0", "h:65536"])
def test_non_ascii_or_out_of_range_ports_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="api_listen"):
        load(env={}, overrides={"api_listen": value})


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="reconcile_interval"):
        load(env={"PLEACO_RECONCILE_INTERVAL": value})


def test_api_table_from_file_and_env(tmp_path: Path) -> None:
    path = write(tmp_path, "[api]\nidle_timeout = 5\nmax_connections = 200\n")
    cfg = load(path, env={"PLEACO_API_HEADER_TIMEOUT": "2.5"})
    assert (cfg.api.idle_timeout, cfg.api.max_connections, cfg.api.header_timeout) == (5.0, 200, 2.5)
    assert cfg.api.max_json_depth == 64


@pytest.mark.parametrize(("text", "named"), [
    ("[api]\nidle_timeout = 0\n", "api.idle_timeout"),
    ("[api]\nmax_connections = 0\n", "api.max_connections"),
    ("[api]\nmax_json_depth = 100000\n", "api.max_json_depth"),
    ("[api]\nkeepalive = 3\n", "api.keepalive"),
])
def test_bad_api_settings_are_refused_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load(write(tmp_path, text), env={})


def test_one_host_port_parser_for_settings_and_addresses() -> None:
    from pleaco import hostport

    assert hostport.split("10.0.0.5:7401") == ("10.0.0.5", 7401)
    assert hostport.split("[::1]:80") == ("::1", 80)
    assert hostport.split(":80") == ("", 80)
    assert hostport.parse_host_port(":80", "proxy_listen") == ("0.0.0.0", 80)
    for bad in ("10.0.0.5", "h:0", "h:65536", "h:x", "h:٣"):
        with pytest.raises(hostport.HostPortError):
            hostport.split(bad)
    with pytest.raises(hostport.HostPortError, match="api_listen: expected HOST:PORT"):
        hostport.parse_host_port("nope", "api_listen")


def test_bootstrap_first_is_accepted_but_not_with_a_join_token() -> None:
    assert load(env={}, overrides={"bootstrap": "first"}).bootstrap == "first"
    with pytest.raises(ConfigError, match="'first' founds a new cluster"):
        load(env={}, overrides={"bootstrap": "first", "join_token": "pleaco1-x"})
    with pytest.raises(ConfigError, match="expected manual, auto or first"):
        load(env={}, overrides={"bootstrap": "sometimes"})
