"""The edge every stage shares: decode, validate, dedupe, dead-letter, produce.

A stage subscribes a handler to its input topics; the edge hands it only
valid, first-seen CloudEvents and produces what it returns. Anything rejected,
including a handler that raised, becomes a `record.rejected` on
`usher.dead-letters`, and the stage carries on with the next record.
"""
from __future__ import annotations

import asyncio
import base64
import inspect
import logging
import weakref
from collections import defaultdict
from contextlib import contextmanager
from contextvars import ContextVar
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from functools import lru_cache
from time import monotonic
from dataclasses import dataclass
from typing import Any, Protocol

import faust
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2
from faust.streams import _current_event
from faust.types import Message

from workers import envelope, schemas
from workers.transport import BatchTopic, records_of
from workers.dedupe import SeenLog
from workers.metrics import CONSUMED, DEAD_LETTERS, DUPLICATES, PRODUCED

log = logging.getLogger(__name__)


class Delivered:
    """One consumed record as the edge and faust's tables read it: its `message` (topic,
    partition, offset, key, value, timestamp). Table writes made while it is faust's current
    event go to the changelog partition of its `message.partition`."""

    __slots__ = ("message", "__weakref__")

    def __init__(self, message: Message) -> None:
        self.message = message


@dataclass(slots=True)
class Accepted:
    """A valid, first-seen record and where it came from."""

    event: dict[str, Any]
    key: str
    record: Delivered

    @property
    def data(self) -> dict[str, Any]:
        return self.event["data"]

    @property
    def tenant(self) -> str:
        return self.event["tenant"]

    def context(self) -> AsCurrentEvent:
        """Make this record faust's current event, so table writes made while
        handling it go to the changelog partition of the record's own partition."""
        return AsCurrentEvent(self.record)


class AsCurrentEvent:
    """`with AsCurrentEvent(record):` makes `record` faust's current event. A class rather than
    a generator-based context manager: the messages stage enters one several times a record."""

    __slots__ = ("record", "token")

    def __init__(self, record: Delivered) -> None:
        self.record = record

    def __enter__(self) -> None:
        self.token = _current_event.set(weakref.ref(self.record))

    def __exit__(self, *exc_info: object) -> None:
        _current_event.reset(self.token)


class StagedWrites(Protocol):
    """Table writes a stage's handlers made for a batch, kept until its records are in Kafka."""

    name: str

    def handler_done(self) -> None: ...

    def undo_handler(self) -> None: ...

    def write(self) -> None: ...

    def discard(self) -> None: ...


class _Batch:
    """What one `Edge.process` call's handlers staged: the tables they wrote (see `workers.tables`).
    Each subscription's batches are its own: one subscription's records in Kafka say nothing of
    another's, so a batch writes only its own tables' changes."""

    __slots__ = ("tables",)

    def __init__(self) -> None:
        self.tables: list[StagedWrites] = []


_current_batch: ContextVar[_Batch | None] = ContextVar("usher_edge_batch", default=None)


@contextmanager
def handling_batch() -> Iterator[_Batch]:
    """The context a batch's handlers run in: the tables they write are the batch's."""
    batch = _Batch()
    entered = _current_batch.set(batch)
    try:
        yield batch
    finally:
        _current_batch.reset(entered)


def staging_in_batch(tables: StagedWrites) -> _Batch:
    """Call when `tables` stages a write: the batch being handled writes it once its records are
    in. Returns that batch."""
    batch = _current_batch.get()
    if batch is None:
        raise RuntimeError(f"table {tables.name} written outside a batch's handler")
    if tables not in batch.tables:
        batch.tables.append(tables)
    return batch


RecordHandler = Callable[[Accepted], "Iterable[envelope.Out] | Awaitable[Iterable[envelope.Out]]"]
BatchHandler = Callable[[list[Accepted]], Awaitable[Iterable[envelope.Out]]]


async def _call(handler: RecordHandler, item: Accepted) -> list[envelope.Out]:
    result = handler(item)
    if inspect.isawaitable(result):
        result = await result
    return list(result)


def _handler_done(batch: _Batch) -> None:
    for tables in batch.tables:
        tables.handler_done()


def _undo_handler(batch: _Batch) -> None:
    # A parked record's outputs are dropped, and so are the table writes that went with them.
    for tables in batch.tables:
        tables.undo_handler()


def _handler_error(exc: Exception) -> str:
    return f"handler error: {type(exc).__name__}: {exc}"


def dedupe_key(event: dict[str, Any]) -> str:
    return f"{event['tenant']}/{event['source']}/{event['id']}"


def rejection(reason: str, record: Delivered, event: Any = None, *, stage: str = "edge") -> envelope.Out:
    """The `record.rejected` for a record, keyed as the bad record was; its
    source names the stage, as every stage reading the topic reports it."""
    message = record.message
    raw_key = message.key.decode("utf-8", "replace") if message.key else ""
    tenant = event.get("tenant") if isinstance(event, dict) else None
    if not (isinstance(tenant, str) and envelope.ID_PATTERN.match(tenant)):
        tenant = raw_key.split("/", 1)[0] if raw_key else ""
        tenant = tenant if envelope.ID_PATTERN.match(tenant) else "-"
    data = {
        "reason": reason,
        "topic": message.topic,
        "partition": message.partition,
        "offset": message.offset,
        "key": raw_key or None,
        "raw_base64": base64.b64encode(message.value or b"").decode("ascii"),
    }
    event_id = f"{message.topic}:{message.partition}:{message.offset}"
    return envelope.Out(
        envelope.DEAD_LETTERS,
        raw_key or "-",
        envelope.make_event("record.rejected", tenant, data, source=f"/usher/{stage}", id_=event_id),
    )


def inspect_record(record: Delivered) -> tuple[dict[str, Any] | None, str | None]:
    """Decode and validate one record: (event, None) or (maybe-partial event, reason)."""
    raw = record.message.value
    if raw is None:
        return None, "tombstone"
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            return None, f"not valid JSON: not UTF-8 text (byte 0x{raw[bad.start]:02x} at position {bad.start})"
        return None, f"not valid JSON: {exc}"
    problem = schemas.problem(event)
    return event, problem


class Edge:
    """One stage's edge on a faust app: its dedupe table and its subscriptions."""

    def __init__(self, app: faust.App, stage: str, *, batch_size: int, batch_within_s: float, dedupe_window: int) -> None:
        self.app = app
        self.stage = stage
        self.batch_size = batch_size
        self.batch_within_s = batch_within_s
        # Changelogged, so a record redelivered after a crash or rebalance still has its effect once.
        self.seen = SeenLog(app, stage, dedupe_window)
        # Reference feeds this stage's handlers need before they can decide anything.
        self.waits: list[asyncio.Event] = []

    def subscribe(
        self,
        name: str,
        topics: Sequence[str],
        *,
        on_record: RecordHandler | None = None,
        on_batch: BatchHandler | None = None,
        on_tombstone: Callable[[Delivered], Iterable[envelope.Out]] | None = None,
        items_per_record: int = 1,
    ) -> None:
        """Consume `topics` with one agent; hand accepted records to the handler.

        A batch holds about the stage's batch size of items: of records, or, where a record carries
        up to `items_per_record` items (statuses, say), of those items."""
        if (on_record is None) == (on_batch is None):
            raise ValueError("give exactly one of on_record or on_batch")
        channel = BatchTopic(self.app, topics=list(topics))
        batch_size = max(1, self.batch_size // items_per_record)

        async def consume(stream: faust.StreamT) -> None:
            # Each event is a partition's records from one fetch (see workers/transport.py); they
            # are acknowledged here, once handled and their outputs acknowledged: at-least-once.
            # A batch never waits for a next event beyond its deadline: a rebalance clears the
            # queues and then waits for every event taken to be acknowledged.
            stream.enable_acks = False
            events = stream.events().__aiter__()
            upcoming = asyncio.ensure_future(events.__anext__())
            try:
                while True:
                    taken, size = [], 0
                    deadline = None
                    while size < batch_size:
                        if deadline is None:
                            await upcoming  # nothing taken yet: wait as long as it takes
                            deadline = monotonic() + self.batch_within_s
                        elif not (await asyncio.wait({upcoming}, timeout=max(0.0, deadline - monotonic())))[0]:
                            break
                        taken.append(upcoming.result())
                        size += len(records_of(taken[-1]))
                        upcoming = asyncio.ensure_future(events.__anext__())
                    records = [Delivered(message) for event in taken for message in records_of(event)]
                    await self.process(records, on_record=on_record, on_batch=on_batch, on_tombstone=on_tombstone)
                    for handled in taken:
                        await stream.ack(handled)
            except StopAsyncIteration:
                return  # the stream has stopped; what was taken and not handled is read again
            finally:
                upcoming.cancel()

        consume.__name__ = consume.__qualname__ = f"{self.stage}_{name}"
        self.app.agent(channel, name=f"{self.stage}.{name}")(consume)

    async def process(
        self,
        records: Sequence[Delivered],
        *,
        on_record: RecordHandler | None = None,
        on_batch: BatchHandler | None = None,
        on_tombstone: Callable[[Delivered], Iterable[envelope.Out]] | None = None,
    ) -> None:
        for ready in self.waits:
            await ready.wait()
        with handling_batch() as batch:
            outs, handled = await self._handle(records, on_record, on_batch, on_tombstone, batch)
        try:
            # The batch's records first, then its tables' changes: a crash or a failed produce in
            # between leaves the changes to be made again, their records coming twice with the same
            # ids, and never a change recovered from its changelog whose records were lost.
            await self.produce([out for out in outs if not out.table_change])
            await self.produce([out for out in outs if out.table_change])
        except BaseException:
            for tables in batch.tables:
                tables.discard()
            raise
        for tables in batch.tables:
            tables.write()
        # Only what was handled counts as seen: a parked record can be replayed once fixed.
        self.seen.add((item, dedupe_key(item.event)) for item in handled)

    async def _handle(
        self,
        records: Sequence[Delivered],
        on_record: RecordHandler | None,
        on_batch: BatchHandler | None,
        on_tombstone: Callable[[Delivered], Iterable[envelope.Out]] | None,
        batch: _Batch,
    ) -> tuple[list[envelope.Out], list[Accepted]]:
        """The batch's outputs, and the records handled (not parked)."""
        outs: list[envelope.Out] = []
        accepted: list[Accepted] = []
        batch_ids: set[str] = set()
        consumed: dict[str, int] = defaultdict(int)
        for record in records:
            consumed[record.message.topic] += 1
            event, problem = inspect_record(record)
            if problem == "tombstone" and on_tombstone is not None:
                outs.extend(self._guarded(record, lambda r=record: on_tombstone(r), batch))
                continue
            if problem is not None:
                outs.append(self._reject(problem, record, event))
                continue
            seen_key = dedupe_key(event)
            if seen_key in batch_ids or self.seen.contains(record.message.partition, seen_key):
                DUPLICATES.labels(self.stage).inc()
                continue
            batch_ids.add(seen_key)
            accepted.append(Accepted(event, (record.message.key or b"").decode("utf-8", "replace"), record))

        # Counted once a batch: a labelled counter costs more per record than the JSON decode.
        for topic, count in consumed.items():
            CONSUMED.labels(self.stage, topic).inc(count)

        handled: list[Accepted] = []
        if on_record is not None:
            for item in accepted:
                with item.context():
                    try:
                        outs.extend(await _call(on_record, item))
                        handled.append(item)
                        _handler_done(batch)
                    except Exception as exc:  # a bug in a stage must not stop it; park the record
                        log.exception("%s: handler failed on %s", self.stage, item.event.get("type"))
                        _undo_handler(batch)
                        outs.append(self._reject(_handler_error(exc), item.record, item.event))
        elif accepted:
            try:
                outs.extend(await on_batch(accepted))
                handled = accepted
                _handler_done(batch)
            except Exception as exc:  # a bug in a stage must not stop it; park the batch
                log.exception("%s: batch handler failed", self.stage)
                _undo_handler(batch)
                outs.extend(self._reject(_handler_error(exc), a.record, a.event) for a in accepted)
        return outs, handled

    def _guarded(self, record: Delivered, call: Callable[[], Iterable[envelope.Out]], batch: _Batch) -> list[envelope.Out]:
        try:
            outs = list(call())
            _handler_done(batch)
            return outs
        except Exception as exc:
            log.exception("%s: tombstone handler failed", self.stage)
            _undo_handler(batch)
            return [self._reject(_handler_error(exc), record)]

    def reject(self, reason: str, item: Accepted) -> envelope.Out:
        """A `record.rejected` for a valid record the stage cannot use (e.g. bad configuration)."""
        return self._reject(reason, item.record, item.event)

    def _reject(self, reason: str, record: Delivered, event: Any = None) -> envelope.Out:
        DEAD_LETTERS.labels(self.stage, record.message.topic).inc()
        log.warning("%s: rejected %s[%s]@%s: %s", self.stage, record.message.topic, record.message.partition, record.message.offset, reason)
        return rejection(reason, record, event, stage=self.stage)

    async def produce(self, outs: Iterable[envelope.Out]) -> None:
        """Send all records, then wait for every acknowledgement: the input
        offsets are committed only after this returns (at-least-once)."""
        await produce(self.app, outs, self.stage)


async def produce(app: faust.App, outs: Iterable[envelope.Out], stage: str) -> None:
    """Produce through the app's own Kafka producer; see `produce_batches`."""
    produced = await produce_batches(app.producer._ensure_producer(), outs)
    for topic, count in produced.items():
        PRODUCED.labels(stage, topic).inc(count)


async def produce_batches(producer: AIOKafkaProducer, outs: Iterable[envelope.Out]) -> dict[str, int]:
    """Produce in one batch per partition and wait for every acknowledgement.

    Per-record sends cost more than the stage logic; a batch per partition
    costs one future. Partitions are chosen exactly as Kafka's default
    partitioner does (murmur2 of the key), so co-partitioning holds.
    Returns how many records went to each topic.
    """
    by_partition: dict[tuple[str, int], list[envelope.Out]] = defaultdict(list)
    for out in outs:
        partitions = _PARTITIONS.get(out.topic) or await _partitions(producer, out.topic)
        by_partition[(out.topic, partition_of(out.key.encode(), partitions))].append(out)
    acknowledgements = []
    produced: dict[str, int] = defaultdict(int)
    for (topic, partition), items in by_partition.items():
        sent = await send_to_partition(producer, topic, partition, ((out.key.encode(), out.value_bytes()) for out in items))
        acknowledgements += [acknowledgement for acknowledgement, _ in sent]
        produced[topic] += len(items)
    if acknowledgements:
        await asyncio.gather(*acknowledgements)
    return produced


async def send_to_partition(producer: AIOKafkaProducer, topic: str, partition: int,
                            records: Iterable[tuple[bytes | None, bytes | None]]) -> list[tuple[asyncio.Future[Any], int]]:
    """Sends `records` (key, value) to one partition in as few batches as they fit; returns each
    batch's acknowledgement, with how many records it holds."""
    sent = []
    batch, count = producer.create_batch(), 0
    for key, value in records:
        if batch.append(key=key, value=value, timestamp=None) is None:  # full, and closed by that
            sent.append((await producer.send_batch(batch, topic, partition=partition), count))
            batch, count = producer.create_batch(), 0
            batch.append(key=key, value=value, timestamp=None)
        count += 1
    # Closed, it goes out at once: aiokafka holds an open batch for the producer's linger (2 ms)
    # in case more records come, and none will.
    batch.close()
    sent.append((await producer.send_batch(batch, topic, partition=partition), count))
    return sent


_PARTITIONS: dict[str, int] = {}


async def _partitions(producer: AIOKafkaProducer, topic: str) -> int:
    _PARTITIONS[topic] = len(await producer.partitions_for(topic))
    return _PARTITIONS[topic]


@lru_cache(maxsize=16384)  # keys repeat (contacts); murmur2 is pure Python
def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives `key` (murmur2), as every producer here uses."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
