"""Which (tenant, source, id) a stage has already handled: the edge's dedupe.

A changelogged table entry per record would double what a stage writes to
Kafka, and faust sends table changes one at a time. So the log keeps one
entry per partition per batch, `"{partition}/{seq}" -> [dedupe keys]`, and an
in-memory index over them. A record and its repeats share a key and so a
partition, which is all the dedupe needs.

The window is bounded: once a partition holds more than `window` ids, its
oldest entries are deleted. A repeat arriving later than that is not caught
here; the stages' rules are idempotent by event time and derived ids, and
the messages stage keeps its own ledger of request ids before any send.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import faust

if TYPE_CHECKING:
    from workers.edge import Accepted


@dataclass
class _PartitionLog:
    ids: set[str] = field(default_factory=set)
    # (table key, its ids), oldest first
    entries: deque[tuple[str, list[str]]] = field(default_factory=deque)
    next_seq: int = 0


class SeenLog:
    def __init__(self, app: faust.App, stage: str, window: int) -> None:
        self.app = app
        self.table = app.Table(f"{stage}-seen", default=None)
        self.window = window
        self._logs: dict[int, _PartitionLog] = {}
        self._generation: int | None = None

    def _log(self, partition: int) -> _PartitionLog:
        # A rebalance may have moved partitions: rebuild from the recovered table.
        generation = self.app.consumer_generation_id
        if generation != self._generation:
            self._logs.clear()
            self._generation = generation
        log = self._logs.get(partition)
        if log is None:
            log = self._logs[partition] = _PartitionLog()
            prefix = f"{partition}/"
            for key, ids in sorted((k, v) for k, v in self.table.items() if k.startswith(prefix) and v):
                log.entries.append((key, ids))
                log.ids.update(ids)
                log.next_seq = int(key[len(prefix):]) + 1
        return log

    def contains(self, partition: int, dedupe_key: str) -> bool:
        return dedupe_key in self._log(partition).ids

    def add(self, handled: Iterable[tuple["Accepted", str]]) -> None:
        """Record handled (record, dedupe key) pairs: one table entry per partition."""
        by_partition: dict[int, list[tuple["Accepted", str]]] = {}
        for item, dedupe_key in handled:
            by_partition.setdefault(item.record.message.partition, []).append((item, dedupe_key))
        for partition, items in by_partition.items():
            log = self._log(partition)
            key = f"{partition}/{log.next_seq:012d}"
            ids = [dedupe_key for _, dedupe_key in items]
            log.next_seq += 1
            # Table writes go to the changelog partition of the current record.
            with items[0][0].context():
                self.table[key] = ids
                log.entries.append((key, ids))
                log.ids.update(ids)
                while len(log.ids) > self.window and len(log.entries) > 1:
                    old_key, old_ids = log.entries.popleft()
                    log.ids.difference_update(old_ids)
                    del self.table[old_key]
