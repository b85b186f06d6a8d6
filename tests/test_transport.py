"""The transport's record hand-off (same outcome as faust's wait_first, without its tasks when nothing
waits) and its record batches."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from harness import Kafka, WorkerProcess, embedded_broker, event, unique
from faust.types import TP
from faust.types.tuples import ConsumerMessage
from mode import Service

from workers import envelope
from workers.broker import free_port
from workers.transport import Consumer, RecordBatch, records_of


def bare_consumer() -> Consumer:
    """A Consumer with just its Service parts, enough for wait_first (no app or broker)."""
    consumer = Consumer.__new__(Consumer)
    Service.__init__(consumer)
    return consumer


async def test_a_delivery_that_does_not_wait_completes_at_once_and_the_other_wait_is_closed() -> None:
    delivered = []

    async def deliver() -> str:
        delivered.append(1)
        return "done"

    suspended = asyncio.Event()
    other = suspended.wait()
    results = await bare_consumer().wait_first(deliver(), other)
    assert len(results.done) == 1 and results.results == ["done"] and not results.stopped and delivered == [1]
    assert other.cr_frame is None  # closed, not left to warn "never awaited"


async def test_a_delivery_that_waits_is_carried_on_until_it_completes() -> None:
    room = asyncio.Event()
    steps = []

    async def deliver() -> str:
        steps.append("started")
        await room.wait()
        steps.append("put")
        return "done"

    suspended = asyncio.Event()
    waiting = asyncio.ensure_future(bare_consumer().wait_first(deliver(), suspended))
    await asyncio.sleep(0.01)
    assert steps == ["started"] and not waiting.done()
    room.set()
    results = await asyncio.wait_for(waiting, 1)
    assert steps == ["started", "put"] and "done" in results.results


async def test_a_waiting_delivery_gives_way_when_the_flow_is_suspended() -> None:
    async def deliver() -> None:
        await asyncio.Event().wait()  # a buffer that never gets room

    suspended = asyncio.Event()
    waiting = asyncio.ensure_future(bare_consumer().wait_first(deliver(), suspended))
    await asyncio.sleep(0.01)
    suspended.set()
    results = await asyncio.wait_for(waiting, 1)
    assert results.done == [suspended]


async def test_an_error_in_a_delivery_propagates() -> None:
    async def deliver() -> None:
        raise ValueError("bad record")

    with pytest.raises(ValueError, match="bad record"):
        await bare_consumer().wait_first(deliver(), asyncio.Event())


class RecordingConsumer:
    """What a RecordBatch's final ack uses of faust's consumer: its unacked set and `ack`."""

    def __init__(self, generation: int = 7) -> None:
        self.app = SimpleNamespace(consumer_generation_id=generation)
        self.unacked: set = set()
        self.acked: list[int] = []

    def ack(self, message: ConsumerMessage) -> bool:
        self.acked.append(message.offset)
        return True


def consumer_message(offset: int, partition: int = 3) -> ConsumerMessage:
    return ConsumerMessage("ticketing.orders", partition, offset, 0.0, 0, None, b"t1/c-1", b"{}", None,
                           tp=TP("ticketing.orders", partition), generation_id=7)


def test_a_batch_acknowledges_its_records_only_when_every_channel_is_done_with_it() -> None:
    batch = RecordBatch([consumer_message(offset) for offset in (10, 11, 13)])
    assert (batch.tp, batch.offset, batch.generation_id) == (TP("ticketing.orders", 3), 10, 7)
    consumer = RecordingConsumer()
    consumer.unacked.add(batch)  # as the stream tracks it
    batch.incref(2)  # two channels subscribe to the topic, as the conductor counts them
    assert not batch.ack(consumer) and consumer.acked == [] and batch in consumer.unacked
    assert batch.ack(consumer)
    # Every record's offset is acknowledged (so the commit may pass them), and nothing waits on the batch.
    assert consumer.acked == [10, 11, 13] and batch not in consumer.unacked
    assert not batch.ack(consumer) and consumer.acked == [10, 11, 13]  # a second ack changes nothing


def test_a_batch_fetched_before_a_rebalance_acknowledges_none_of_its_records() -> None:
    # faust's stream skips an event of an older generation and acknowledges it unhandled.
    batch = RecordBatch([consumer_message(offset) for offset in (10, 11)])
    consumer = RecordingConsumer(generation=8)
    consumer.unacked.add(batch)
    batch.incref()
    assert batch.ack(consumer) and consumer.acked == [] and batch not in consumer.unacked


def test_an_event_carries_its_batch_or_its_one_record() -> None:
    records = [consumer_message(offset) for offset in (1, 2)]
    assert records_of(SimpleNamespace(message=RecordBatch(records))) == records
    assert records_of(SimpleNamespace(message=records[0])) == [records[0]]


class SeekingThread:
    """The consumer thread's side of a seek: the committed offsets it reads, and the seeks it makes."""

    def __init__(self, committed: dict[TP, int]) -> None:
        self.committed = committed
        self.sought: list[dict[TP, int | None]] = []

    async def committed_offsets(self) -> dict[TP, int]:
        return dict(self.committed)

    async def seek_assigned(self, offsets: dict[TP, int | None]) -> set[TP]:
        self.sought.append(dict(offsets))
        return set(self.committed)


async def test_after_a_rebalance_the_fetch_loop_seeks_to_the_committed_offsets_before_its_next_fetch() -> None:
    checkouts = TP("ticketing.checkouts", 2)
    consumer = bare_consumer()
    consumer._thread = SeekingThread({checkouts: 2961})
    consumer._read_offset, consumer._committed_offset = {checkouts: 3408}, {}
    await consumer.perform_seek()
    # Commits count from the committed offset at once; the records the fetch loop still holds
    # are measured against the read offset they were fetched after, not against the seek's.
    assert consumer._committed_offset == {checkouts: 2961}
    assert consumer._read_offset == {checkouts: 3408} and consumer._thread.sought == []
    await consumer._seek_pending()
    assert consumer._thread.sought == [{checkouts: 2961}] and consumer._read_offset == {checkouts: 2961}
    assert consumer._pending_seek is None


def test_a_stage_scaled_out_and_back_in_under_load_answers_every_record(tmp_path: Path) -> None:
    """Batches are acknowledged only once handled: while partitions move to a second worker
    and back, every checkout still gets its prompt (at least once)."""
    tenant, published = unique("t"), []

    def publish(kafka: Kafka, count: int) -> None:
        for _ in range(count):
            checkout = unique("co")
            data = {"checkout": checkout, "event": "ev-1", "channel": "web", "contact": None, "language": "en"}
            value = json.dumps(event("checkout.started", tenant, data, source="/shop/web")).encode()
            kafka.producer.send(envelope.CHECKOUTS, key=f"{tenant}/~{checkout}".encode(), value=value)
            published.append(checkout)
        kafka.producer.flush()

    with embedded_broker(partitions=4) as broker:
        kafka = Kafka(broker.removeprefix("kafka://"))
        first = WorkerProcess("prompts", broker, free_port(), tmp_path / "first").start()
        second = WorkerProcess("prompts", broker, free_port(), tmp_path / "second")
        try:
            publish(kafka, 3000)
            second.start()  # the group rebalances while the first worker is busy
            publish(kafka, 3000)
            first.stop()  # and again: the second worker takes every partition
            publish(kafka, 3000)
            try:
                kafka.wait_for(envelope.PROMPTS, tenant, lambda found: {p["data"]["checkout"] for p in found} >= set(published),
                               timeout=90, type_="checkout.prompted")
            except AssertionError:
                prompted = {p["data"]["checkout"] for p in kafka.events(envelope.PROMPTS, tenant, "checkout.prompted")}
                raise AssertionError(f"{len(set(published) - prompted)} of {len(published)} checkouts never prompted") from None
        finally:
            first.stop()
            second.stop()
            kafka.close()
