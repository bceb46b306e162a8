"""The replicated store: signed, HLC-stamped, last-writer-wins records in SQLite."""

from pleaco.store.db import Store
from pleaco.store.hlc import HLC, Timestamp
from pleaco.store.record import KINDS, Record, RecordError, merge

__all__ = ["HLC", "KINDS", "Record", "RecordError", "Store", "Timestamp", "merge"]
