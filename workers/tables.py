"""Faust tables whose changes a stage produces itself, batched with its other records."""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from functools import cached_property
from typing import Any

import faust
from faust.stores.memory import Store as MemoryStore

from workers import envelope


def entries_of(table: faust.Table) -> MutableMapping[bytes, Any]:
    """Where a table's entries are read and written directly: its store, not faust's `Table` (its
    key events and `__missing__` cost more than a rule). A memory store's own dict is used as it
    is, since the store's `get` is `Mapping.get`, a few Python calls and, for a key not there (a
    contact's first record), a raised KeyError. Call it once the app is configured (the store is
    made on first use)."""
    store = table.data
    return store.data if isinstance(store, MemoryStore) else store


class ContactTable:
    """A faust table keyed `{tenant}/{contact}` whose changes are produced with the stage's other
    records, in one batch per partition, instead of by faust one send at a time (which costs more
    than the consent rules themselves). Call `set`/`delete` in the record's context and return
    their `Out` with the handler's. Keys are kept as bytes, which faust serializes raw, so a change
    lands in the changelog partition of the record's own partition (the key's, murmur2 as
    everywhere), as faust's would; recovery and standbys read that changelog as usual."""

    def __init__(self, app: faust.App, name: str) -> None:
        self.table = app.Table(name, default=None, key_type=bytes)
        self.changelog = self.table.changelog_topic.get_topic_name()

    @cached_property
    def _values(self) -> MutableMapping[bytes, Any]:
        return entries_of(self.table)

    def get(self, key: str) -> dict[str, Any] | None:
        return self._values.get(key.encode())

    def items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return ((key.decode(), value) for key, value in self.table.items())

    def on_recover(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Call `callback` whenever the table has been recovered, after every rebalance."""
        self.table.on_recover(callback)

    def set(self, key: str, value: dict[str, Any]) -> envelope.Out:
        self._values[key.encode()] = value
        return envelope.Out(self.changelog, key, value)

    def delete(self, key: str) -> envelope.Out:
        del self._values[key.encode()]
        return envelope.Out(self.changelog, key, None)
