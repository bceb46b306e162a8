"""The golden image's files: the Packer template validates with Debian's packer, every
cloud-init example passes `cloud-init schema` and writes a pleaco.toml that pleaco's own
config loader accepts, and the Terraform module parses, declares what it promises and
renders user data that passes the same checks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml

from pleaco import config

REPO = Path(__file__).resolve().parents[2]
CLOUD_INIT = REPO / "cloud-init"
TERRAFORM = REPO / "examples" / "terraform" / "libvirt"
EXAMPLES = sorted(CLOUD_INIT.rglob("*.yaml"))
USER_DATA = [p for p in EXAMPLES if "network-config" not in p.name]


def schema_check(path: Path) -> None:
    out = subprocess.run(["cloud-init", "schema", "--config-file", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, f"{path}: {out.stdout}{out.stderr}"


def pleaco_toml_of(user_data: dict[str, Any], where: str) -> str:
    """The content of the pleaco.toml a user data writes (Debian's cloud-init accepts
    unknown top-level keys, so the schema alone would not notice a misspelt write_files)."""
    files = [f for f in user_data.get("write_files", []) if f.get("path") == "/etc/pleaco/pleaco.toml"]
    assert len(files) == 1, f"{where}: writes /etc/pleaco/pleaco.toml exactly once"
    assert files[0].get("permissions") == "0600", f"{where}: pleaco.toml may hold secrets: 0600"
    return str(files[0]["content"])


def load_toml(text: str, tmp_path: Path) -> config.Config:
    path = tmp_path / "pleaco.toml"
    path.write_text(text)
    return config.load(path, env={})


def validate_args(stage: Path) -> list[str]:
    """`packer validate` with what this machine can give: no checksum file from
    cloud.debian.org, and an (empty) stage dir, whatever `make image` staged or not."""
    stage.mkdir(exist_ok=True)
    return ["packer", "validate", "-var", "qemu_image_checksum=none", "-var", f"stage_dir={stage}"]


def test_the_packer_template_validates(tmp_path: Path) -> None:
    out = subprocess.run([*validate_args(tmp_path / "stage"), "packer/"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_broken_packer_template_is_refused(tmp_path: Path) -> None:
    """The check above can fail: the same template with a builder option misspelt does not validate."""
    broken = tmp_path / "packer"
    broken.mkdir()
    text = (REPO / "packer" / "pleaco.pkr.hcl").read_text().replace("disk_image       = true", "disk_imag = true")
    (broken / "pleaco.pkr.hcl").write_text(text)
    out = subprocess.run([*validate_args(tmp_path / "stage"), str(broken)],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0 and "disk_imag" in out.stdout + out.stderr


@pytest.mark.parametrize("path", USER_DATA, ids=lambda p: str(p.relative_to(CLOUD_INIT)))
def test_each_cloud_init_example_is_valid_and_configures_pleaco(path: Path, tmp_path: Path) -> None:
    assert path.read_text().startswith("#cloud-config\n")
    schema_check(path)
    cfg = load_toml(pleaco_toml_of(yaml.safe_load(path.read_text()), path.name), tmp_path)
    if path.name == "first-node.yaml":
        assert cfg.bootstrap == "first" and not cfg.join_token
    elif path.name == "join-node.yaml":
        assert cfg.join_token and cfg.seeds and cfg.discovery == "seeds"
    else:
        assert cfg.discovery == "mdns" and cfg.bootstrap == "auto" and len(cfg.bootstrap_secret) >= 8


def cloud_init_network(text: str) -> str:
    """What cloud-init's own parser (Debian's python3-cloud-init, in the system Python) makes
    of a network config: its routes' gateways and its addresses; a failure if it refuses it."""
    script = ("import sys, yaml; from cloudinit.net.network_state import parse_net_config_data; "
              "s = parse_net_config_data(yaml.safe_load(sys.stdin.read())); "
              "print(s.version, [r['gateway'] for r in s.iter_routes()], "
              "[a['address'] for i in s.iter_interfaces() for a in i['subnets']])")
    out = subprocess.run(["/usr/bin/python3", "-c", script], input=text, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_static_network_config_is_cloud_init_network_v2() -> None:
    parsed = cloud_init_network((CLOUD_INIT / "static-network" / "network-config.yaml").read_text())
    assert "192.168.50.1" in parsed and "192.168.50.13" in parsed, parsed


def test_a_cloud_init_example_with_a_bad_setting_is_caught(tmp_path: Path) -> None:
    """What the loader says when user data writes a key pleaco does not have."""
    data = yaml.safe_load((CLOUD_INIT / "mdns-lan.yaml").read_text())
    text = pleaco_toml_of(data, "mdns-lan.yaml").replace("bootstrap = ", "bootstarp = ")
    with pytest.raises(config.ConfigError, match="unknown setting 'bootstarp'"):
        load_toml(text, tmp_path)


def _blocks(path: Path, kind: str) -> dict[str, dict[str, Any]]:
    with path.open() as f:
        data = hcl2.load(f)
    return {name.strip('"'): body for block in data.get(kind, []) for name, body in block.items()}


def render(template: Path, values: dict[str, str]) -> str:
    """Terraform's templatefile for the plain ``${name}`` interpolations our templates use
    (a directive or an expression would be left and fail the checks after)."""
    text = template.read_text()
    assert "%{" not in text
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text)


def test_the_terraform_module_parses_and_declares_its_interface() -> None:
    tf_files = sorted(TERRAFORM.glob("*.tf"))
    assert {p.name for p in tf_files} >= {"main.tf", "variables.tf", "outputs.tf", "versions.tf"}
    for path in tf_files:
        with path.open() as f:
            hcl2.load(f)  # raises on a syntax error
    variables = _blocks(TERRAFORM / "variables.tf", "variable")
    assert set(variables) >= {"image_path", "nodes", "name_prefix", "memory_mb", "vcpus", "network_cidr",
                              "bootstrap_secret"}
    assert all(v.get("description") for v in variables.values()), "every variable is described"
    assert "default" not in variables["image_path"]  # required: there is no sensible default
    assert variables["bootstrap_secret"].get("sensitive") is True
    outputs = _blocks(TERRAFORM / "outputs.tf", "output")
    assert set(outputs) >= {"api_endpoints", "first_node_address"}
    main = (TERRAFORM / "main.tf").read_text()
    # Every variable the templates use is passed by main.tf's templatefile calls.
    for template in TERRAFORM.glob("*.tftpl"):
        assert f'"${{path.module}}/{template.name}"' in main
        for name in set(re.findall(r"\$\{(\w+)\}", template.read_text())):
            assert re.search(rf"\b{name}\s*=", main), f"{template.name} uses {name}, main.tf never passes it"


def test_the_terraform_modules_user_data_is_valid_and_configures_pleaco(tmp_path: Path) -> None:
    rendered = tmp_path / "user-data"
    rendered.write_text(render(TERRAFORM / "user-data.tftpl",
                               {"name": "pleaco-2", "address": "192.168.150.12", "bootstrap_secret": "s" * 32}))
    schema_check(rendered)
    cfg = load_toml(pleaco_toml_of(yaml.safe_load(rendered.read_text()), "user-data.tftpl"), tmp_path)
    assert (cfg.name, cfg.advertise, cfg.bootstrap, cfg.discovery) == ("pleaco-2", "192.168.150.12", "auto", "mdns")
    parsed = cloud_init_network(render(TERRAFORM / "network-config.tftpl",
                                       {"address": "192.168.150.12", "prefix": "24", "gateway": "192.168.150.1"}))
    assert "192.168.150.1" in parsed and "192.168.150.12" in parsed, parsed
