"""Each contact's consent history, the proof of consent: a table whose changelog is `consent.log`.

The contract's `consent.log` already holds every change, keyed `{tenant}/{contact}` as the
stage's other topics are, so the history is not written to Kafka a second time (it was a quarter
of the bytes the stage produced). The agent stores a contact's changes as it produces them to
`consent.log`; recovery, after every restart and rebalance, adds each `consent.log` record of the
worker's partitions to its contact's entry. So `consent.log` must keep its records for ever, as a
record of consent has to be kept anyway (`workers/topics.py` creates it so).

An entry is `[[event id, consent.changed data], ...]`, in the log's order. The agent appends to
the stored JSON's bytes without decoding them: an entry grows with every change of its contact,
and decoding and encoding it again for each change cost more than the change. Recovery can read
records an entry already holds: faust resumes a partition where its last recovery ended and does
not see the agent's own writes. A record whose id the entry holds is passed over, so an entry
holds each of its contact's records once, whatever is read again.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import faust
import orjson
from faust.stores import rocksdb as faust_rocksdb
from faust.stores.memory import Store as MemoryStore
from faust.types import TP, EventT

from workers import envelope
from workers.tables import Entries

if TYPE_CHECKING:
    from workers.edge import Edge

log = logging.getLogger(__name__)

Entry = list[list[Any]]


class LogTable(faust.Table):
    """A table recovered from a topic of `consent.changed` events: a record is added to its
    contact's entry, unless the entry holds its id already, rather than replacing the entry."""

    def apply_changelog_batch(self, batch: Iterable[EventT]) -> None:
        # key -> (entry, its ids, the last record added to it or None)
        entries: dict[bytes, tuple[Entry, set[str], Any]] = {}
        offsets: dict[TP, int] = {}
        for event in batch:
            message = event.message
            offsets[message.tp] = max(message.offset, offsets.get(message.tp, -1))
            change = _change_of(message)
            if change is None:
                continue
            if message.key not in entries:
                entry = self._stored(message.key, message.partition) or []
                entries[message.key] = (entry, {id_ for id_, _ in entry}, None)
            entry, ids, _ = entries[message.key]
            if change["id"] not in ids:
                ids.add(change["id"])
                entry.append([change["id"], change["data"]])
                entries[message.key] = (entry, ids, message)
        # The store's own batch write, with each entry read as the record to apply.
        store = self.data
        store.apply_changelog_batch(
            [SimpleNamespace(key=key, value=entry, message=SimpleNamespace(
                key=key, value=_encoded(store, entry), partition=message.partition, tp=message.tp, offset=message.offset))
             for key, (entry, _, message) in entries.items() if message is not None],
            to_key=self._to_key,
            to_value=self._to_value,
        )
        # Where the next recovery resumes, records passed over included.
        for tp, offset in offsets.items():
            store.set_persisted_offset(tp, offset)

    def _stored(self, key: bytes, partition: int) -> Any:
        store = self.data
        if isinstance(store, MemoryStore):
            return store.data.get(key)
        # Not the store's own get: outside a record's context it looks in every partition's DB.
        raw = store._db_for_partition(partition).get(key)
        return None if raw is None else store._decode_value(raw)


def _encoded(store: Any, entry: Entry) -> Any:
    # A memory store keeps values as they are; RocksDB writes the record's value bytes.
    return store._encode_value(entry) if isinstance(store, faust_rocksdb.Store) else entry


def _change_of(message: Any) -> dict[str, Any] | None:
    """The `consent.changed` event a `consent.log` record holds; None (and a warning) for one that
    holds none, which the stage never writes."""
    try:
        event = orjson.loads(message.value) if message.value is not None else None
        if isinstance(event, dict) and event.get("type") == "consent.changed" and isinstance(event.get("data"), dict) and "id" in event:
            return event
    except orjson.JSONDecodeError:
        pass
    log.warning("consent history: %s[%s]@%s is not a consent.changed event; left out", message.tp.topic, message.partition, message.offset)
    return None


class History:
    """Every `consent.changed` data of each contact, in order (see the module's docstring). The
    agent writes the table's store only, once the edge has the batch's records acknowledged:
    its records on `consent.log` are the changelog."""

    def __init__(self, edge: Edge, name: str) -> None:
        app = edge.app
        changelog = app.topic(envelope.CONSENT_LOG, key_type=bytes, value_type=bytes)
        self.table = app.tables.add(LogTable(app, name=name, default=None, key_type=bytes, changelog_topic=changelog, beacon=app.tables.beacon))
        self.entries = Entries(self.table)

    def changes(self, key: str) -> list[dict[str, Any]]:
        """The contact's changes so far, oldest first."""
        return [data for _, data in self.entries.get(key.encode()) or ()]

    def append(self, key: str, events: list[dict[str, Any]]) -> None:
        """Call in the contact's record context with the `consent.changed` events produced for it.
        Not checked against the entry's ids: the rules never make a change twice (a record handled
        again finds its change already made), and the check would cost a scan of the contact's ids."""
        self.entries.extend(key.encode(), [[event["id"], event["data"]] for event in events])
