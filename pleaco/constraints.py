"""Node labels and the placement constraints over them: ``node.labels.KEY==VALUE`` and
``node.labels.KEY!=VALUE`` (Docker Swarm's syntax and meaning: ``!=`` also holds on a node
without the label). Pure parsing and matching; the labels live in the store
(pleaco.stacks.labels), the constraints in the app's spec (pleaco.apps), and placement
(pleaco.placement) places an app's replicas only on the live nodes that meet all of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pleaco.errors import InvalidInput

# Docker's label keys, lower case: letters, digits, '.', '-' and '_', starting and ending
# with a letter or digit. Values: up to 63 such characters (upper case too), or empty.
LABEL_KEY = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^[A-Za-z0-9._-]{0,63}$")
# At most this many labels per node and constraints per app: enough for any real use,
# and both fit in one record with room to spare.
MAX_LABELS = 64
MAX_CONSTRAINTS = 16
OPERATORS = ("==", "!=")
_EXPR = re.compile(r"^\s*node\.labels\.([^=!\s]*)\s*(==|!=)\s*(\S*)\s*$")


class ConstraintError(InvalidInput, ValueError):
    """A constraint or a label that is not valid; the message names it and says why."""


@dataclass(frozen=True)
class Constraint:
    key: str
    op: str  # "==" or "!="
    value: str

    def __str__(self) -> str:
        return f"node.labels.{self.key}{self.op}{self.value}"

    def matches(self, labels: Mapping[str, str]) -> bool:
        equal = labels.get(self.key) == self.value
        return equal if self.op == "==" else not equal


def check_key(key: str, where: str) -> str:
    if not LABEL_KEY.fullmatch(key):
        raise ConstraintError(f"{where}: label key {key!r} is not valid (lower-case letters, digits, '.', '-', "
                              "'_', starting and ending with a letter or digit, at most 63)")
    return key


def check_value(value: str, where: str) -> str:
    if not LABEL_VALUE.fullmatch(value):
        raise ConstraintError(f"{where}: label value {value!r} is not valid (letters, digits, '.', '-', '_', "
                              "at most 63)")
    return value


def parse(text: object) -> Constraint:
    """One constraint from its text, ``node.labels.disk==ssd``."""
    if not isinstance(text, str):
        raise ConstraintError(f"constraint {text!r}: expected a string such as node.labels.disk==ssd")
    m = _EXPR.fullmatch(text)
    if m is None:
        raise ConstraintError(f"constraint {text!r}: expected node.labels.KEY==VALUE or node.labels.KEY!=VALUE")
    where = f"constraint {text!r}"
    return Constraint(check_key(m[1], where), m[2], check_value(m[3], where))


def parse_all(texts: object) -> tuple[Constraint, ...]:
    """An app's constraints (a list of texts), in a canonical order without repeats."""
    if not isinstance(texts, list | tuple):
        raise ConstraintError("constraints: expected a list such as [\"node.labels.disk==ssd\"]")
    if len(texts) > MAX_CONSTRAINTS:
        raise ConstraintError(f"constraints: {len(texts)} given, at most {MAX_CONSTRAINTS}")
    found = {parse(t) for t in texts}
    return tuple(sorted(found, key=str))


def meets(constraints: Iterable[Constraint], labels: Mapping[str, str]) -> bool:
    return all(c.matches(labels) for c in constraints)


def eligible(constraints: Sequence[Constraint], nodes: Sequence[str],
             labels: Mapping[str, Mapping[str, str]]) -> list[str]:
    """The nodes of ``nodes`` whose labels meet every constraint (all of them, with none)."""
    if not constraints:
        return list(nodes)
    return [n for n in nodes if meets(constraints, labels.get(n, {}))]


def parse_label_changes(args: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``KEY=VALUE`` (set) and ``KEY-`` (remove) arguments, as (set, remove)."""
    if not args:
        raise ConstraintError("labels: give at least one KEY=VALUE or KEY-")
    sets: dict[str, str] = {}
    removes: list[str] = []
    for arg in args:
        if not isinstance(arg, str):
            raise ConstraintError(f"label {arg!r}: expected KEY=VALUE or KEY-")
        key, sep, value = arg.partition("=")
        if sep:
            sets[check_key(key, f"label {arg!r}")] = check_value(value, f"label {arg!r}")
        elif arg.endswith("-"):
            removes.append(check_key(arg[:-1], f"label {arg!r}"))
        else:
            raise ConstraintError(f"label {arg!r}: expected KEY=VALUE to set it or KEY- to remove it")
    if both := sorted(set(sets) & set(removes)):
        raise ConstraintError(f"label {both[0]!r} is both set and removed")
    return sets, removes
