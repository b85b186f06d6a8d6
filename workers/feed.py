"""Compacted reference topics read whole by every worker of a stage.

Configuration, events and message definitions are keyed by their own ids,
not by contact, so a worker holding some contacts' partitions needs all of
them. Each worker therefore reads these topics from the beginning with its
own group-less consumer and keeps the state in memory (they are small and
compacted); the stage's partitioned agents wait until the feed has caught up.

A record the stage rejects is dead-lettered only if it arrived after this
worker started, so a restart does not repeat old rejections. Every worker of
a stage reports the same rejection with the same CloudEvent id and source,
which is what a reader of the dead letters dedupes on.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition

from workers import envelope
from workers.edge import Delivered, inspect_record, produce, rejection
from workers.metrics import CONSUMED, DEAD_LETTERS

log = logging.getLogger(__name__)

# (topic, key, event or None for a tombstone) -> a reason to reject, or None.
FeedHandler = Callable[[str, str, "dict[str, Any] | None"], "str | None"]


class _Message:
    """Enough of a faust Message for the edge's inspection and rejection."""

    __slots__ = ("topic", "partition", "offset", "key", "value", "timestamp")

    def __init__(self, record: Any) -> None:
        self.topic, self.partition, self.offset = record.topic, record.partition, record.offset
        self.key, self.value, self.timestamp = record.key, record.value, record.timestamp / 1000


class Feed:
    def __init__(self, app: faust.App, stage: str, topics: Sequence[str], handler: FeedHandler, bootstrap_servers: str) -> None:
        self.app, self.stage, self.topics, self.handler = app, stage, tuple(topics), handler
        self.bootstrap_servers = bootstrap_servers
        self.ready = asyncio.Event()
        self.started_at = time.time()
        app.task(self.run)

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap_servers, enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        try:
            partitions = [TopicPartition(topic, p) for topic in self.topics for p in sorted(consumer.partitions_for_topic(topic) or ())]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            end = await consumer.end_offsets(partitions)
            pending = {tp for tp, offset in end.items() if offset > 0}
            if not pending:
                self.ready.set()
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=5000)
                outs = [out for records in batches.values() for record in records for out in self.apply(record)]
                if outs:
                    await produce(self.app, outs, self.stage)
                if not self.ready.is_set():
                    pending = {tp for tp in pending if await consumer.position(tp) < end[tp]}
                    if not pending:
                        log.info("%s: feed caught up on %s", self.stage, ", ".join(self.topics))
                        self.ready.set()
        finally:
            await consumer.stop()

    def apply(self, raw: Any) -> list[envelope.Out]:
        record = Delivered(_Message(raw))
        CONSUMED.labels(self.stage, raw.topic).inc()
        key = raw.key.decode("utf-8", "replace") if raw.key else ""
        event, problem = inspect_record(record)
        if problem == "tombstone":
            event, problem = None, None
        if problem is None:
            try:
                problem = self.handler(raw.topic, key, event)
            except Exception as exc:  # a bug must not stop the feed; report the record
                log.exception("%s: feed handler failed", self.stage)
                problem = f"handler error: {type(exc).__name__}: {exc}"
        if problem is None or record.message.timestamp < self.started_at:
            return []
        DEAD_LETTERS.labels(self.stage, raw.topic).inc()
        log.warning("%s: rejected %s[%s]@%s: %s", self.stage, raw.topic, raw.partition, raw.offset, problem)
        return [rejection(problem, record, event, stage=self.stage)]
