"""A stack's services by name (pleaco.net.names with pleaco.reconcile.names.stack_app):
``SERVICE.STACK.internal`` answers for app ``STACK-SERVICE`` only when that app is the
stack's service; any other deeper name still goes to the host's resolvers."""

from __future__ import annotations

from pathlib import Path

from pleaco import apps as appsmod
from pleaco.apps import AppStore
from pleaco.identity import Identity
from pleaco.net.names import NameServer
from pleaco.reconcile.names import stack_app
from pleaco.store import Store
from tests.unit.test_names_unit import parse, query

ADDRESSES = {"shop-db": ["10.210.0.7"], "shop-web": ["10.210.0.8"], "other-db": ["10.210.0.9"]}


def test_service_of_a_stack_resolves_under_the_stack(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db", Identity.generate())
    try:
        apps = AppStore(store, max_replicas=3)
        apps.deploy("shop-db", {"image": "x", "port": 5432}, stack="shop")
        apps.deploy("shop-web", {"image": "x", "port": 80}, stack="shop")
        apps.deploy("other-db", {"image": "x", "port": 5432})  # a plain app, no stack
        s = NameServer("127.0.0.1", 0, ADDRESSES.get, "internal", [], clients=["127.0.0.0/8"],
                       stack_app=stack_app(apps))
        assert parse(s.answer(query("db.shop.internal"), 512) or b"")["a"] == ["10.210.0.7"]
        assert parse(s.answer(query("DB.Shop.internal."), 512) or b"")["a"] == ["10.210.0.7"]
        assert parse(s.answer(query("shop-db.internal"), 512) or b"")["a"] == ["10.210.0.7"]  # the app's own name
        # Not a stack's service: the host's resolvers' (the proxy's host names live there too).
        for name in ("db.other.internal", "ghost.shop.internal", "web.pleaco.internal", "x.db.shop.internal"):
            assert s.answer(query(name), 512) is None, name
    finally:
        store.close()


def test_spec_keeps_its_stack_through_the_store() -> None:
    spec = appsmod.AppSpec("shop-web", "x", stack="shop", command=("a", "b"), entrypoint=("sh", "-c"))
    again = appsmod.AppSpec.from_value("shop-web", spec.to_value())
    assert again == spec and again.same_release(spec)
    assert not again.same_release(appsmod.AppSpec("shop-web", "x", stack="shop", command=("a",)))
