"""The replicated store: signed, HLC-stamped, last-writer-wins records in SQLite."""

from pleaco.store.db import Store
from pleaco.store.hlc import HLC, Timestamp
from pleaco.store.record import (
    KINDS,
    MAX_RECORD_BYTES,
    PACKET_RECORD_BYTES,
    Record,
    RecordError,
    RecordTooLarge,
    UnknownOrigin,
    merge,
)

__all__ = ["HLC", "KINDS", "MAX_RECORD_BYTES", "PACKET_RECORD_BYTES", "Record", "RecordError", "RecordTooLarge",
           "Store", "Timestamp", "UnknownOrigin", "merge"]
