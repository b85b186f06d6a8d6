"""Faust tables whose changes a stage produces itself, batched with its other records."""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import faust

from workers import envelope


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

    def get(self, key: str) -> dict[str, Any] | None:
        # Through the store: faust's Table.get (key events, __missing__) costs more than a rule.
        return self.table.data.get(key.encode())

    def items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return ((key.decode(), value) for key, value in self.table.items())

    def on_recover(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Call `callback` whenever the table has been recovered, after every rebalance."""
        self.table.on_recover(callback)

    def set(self, key: str, value: dict[str, Any]) -> envelope.Out:
        self.table.data[key.encode()] = value
        return envelope.Out(self.changelog, key, value)

    def delete(self, key: str) -> envelope.Out:
        del self.table.data[key.encode()]
        return envelope.Out(self.changelog, key, None)
