"""Node labels and placement constraints: the parser, and placement honouring them."""

from __future__ import annotations

from collections import Counter

import pytest

from pleaco.apps import AppSpec, ValidationError, validate_deploy
from pleaco.constraints import Constraint, ConstraintError, parse, parse_all, parse_label_changes
from pleaco.placement import Demand, plan

NODES = [f"node{i}" for i in range(5)]


def test_parse_both_operators_and_canonical_text() -> None:
    assert parse("node.labels.disk==ssd") == Constraint("disk", "==", "ssd")
    assert parse(" node.labels.zone != eu-1 ") == Constraint("zone", "!=", "eu-1")
    assert str(parse("node.labels.zone != eu-1")) == "node.labels.zone!=eu-1"
    assert parse("node.labels.gpu==") == Constraint("gpu", "==", "")  # the label present and empty
    # Sorted, without repeats: the same constraints in any order are the same spec.
    assert parse_all(["node.labels.b==1", "node.labels.a==2", "node.labels.b==1"]) == (
        Constraint("a", "==", "2"), Constraint("b", "==", "1"))


@pytest.mark.parametrize(("text", "named"), [
    ("disk==ssd", "node.labels.KEY"),
    ("node.labels.disk=ssd", "node.labels.KEY"),
    ("node.labels.disk>ssd", "node.labels.KEY"),
    ("node.labels.Disk==ssd", "label key 'Disk'"),
    ("node.labels.==ssd", "label key ''"),
    ("node.labels.disk==s s", "node.labels.KEY"),
    ("node.labels.disk==a/b", "label value 'a/b'"),
    ("node.hostname==x", "node.labels.KEY"),
])
def test_bad_expressions_are_named(text: str, named: str) -> None:
    with pytest.raises(ConstraintError, match=f"constraint {text!r}.*") as err:
        parse(text)
    assert named in str(err.value)


def test_deploy_validates_and_keeps_constraints() -> None:
    spec, _ = validate_deploy("web", {"image": "img", "constraints": ["node.labels.disk == ssd"]}, 10)
    assert spec.constraints == ("node.labels.disk==ssd",)
    assert AppSpec.from_value("web", spec.to_value()) == spec
    with pytest.raises(ValidationError, match="constraints: constraint 'disk=ssd'"):
        validate_deploy("web", {"image": "img", "constraints": ["disk=ssd"]}, 10)
    with pytest.raises(ValidationError, match="constraints: expected a list"):
        validate_deploy("web", {"image": "img", "constraints": "node.labels.disk==ssd"}, 10)


def test_label_changes() -> None:
    assert parse_label_changes(["disk=ssd", "zone=", "gpu-"]) == ({"disk": "ssd", "zone": ""}, ["gpu"])
    for bad, named in [(["disk"], "KEY=VALUE"), (["Disk=ssd"], "'Disk'"), (["disk=ssd", "disk-"], "both"),
                       ([], "at least one"), (["-"], "''")]:
        with pytest.raises(ConstraintError, match=named):
            parse_label_changes(bad)


def test_placement_filters_candidates_first() -> None:
    labels = {"node1": {"disk": "ssd"}, "node3": {"disk": "ssd"}, "node4": {"disk": "hdd"}}
    ssd = (parse("node.labels.disk==ssd"),)
    placed = plan([Demand("db", 6, constraints=ssd), Demand("web", 6)], NODES, labels=labels)
    assert set(placed["db"]) == {"node1", "node3"} and Counter(placed["db"]) == {"node1": 3, "node3": 3}
    # An app without constraints places as it always did.
    assert placed["web"] == plan([Demand("web", 6)], NODES)["web"]
    not_ssd = plan([Demand("db", 4, constraints=(parse("node.labels.disk!=ssd"),))], NODES, labels=labels)["db"]
    assert set(not_ssd) <= {"node0", "node2", "node4"} and None not in not_ssd  # != holds without the label
    # No node meets them: every replica unplaced (the app says so), none on a wrong node.
    assert plan([Demand("db", 2, constraints=(parse("node.labels.disk==nvme"),))], NODES, labels=labels) == {
        "db": [None, None]}


def test_placement_with_constraints_and_memory() -> None:
    labels = {"node1": {"disk": "ssd"}, "node2": {"disk": "ssd"}}
    memory = dict.fromkeys(NODES, 1 << 30)
    placed = plan([Demand("db", 3, memory=512 << 20, constraints=(parse("node.labels.disk==ssd"),))], NODES,
                  memory=memory, labels=labels)["db"]
    # Two ssd nodes with room for two each: three replicas fit, only there.
    assert Counter(placed) == {"node1": 2, "node2": 1} or Counter(placed) == {"node1": 1, "node2": 2}
