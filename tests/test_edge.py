"""The shared edge, driven through a faust agent with faust's test context."""
from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import faust
import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner

from workers import edge as edge_module
from workers import envelope
from workers.edge import Accepted, Edge, partition_of
from workers.transport import App


class EdgeRig:
    """An Edge on an unstarted App; what it would produce is collected instead."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, handler: Any) -> None:
        self.produced: list[envelope.Out] = []

        async def collect(app: faust.App, outs: Any, stage: str) -> None:
            self.produced.extend(outs)

        monkeypatch.setattr(edge_module, "produce", collect)
        self.app = App(f"edge-test-{id(self)}", fetch_max_wait_ms=50, store="memory://", autodiscover=False, topic_partitions=4)
        self.edge = Edge(self.app, "probe", batch_size=50, batch_within_s=0.01, dedupe_window=1000)
        self.edge.subscribe("orders", [envelope.ORDERS], on_record=handler)
        self.agent = self.app.agents["probe.orders"]

    def rejected(self) -> list[dict[str, Any]]:
        return [out.event["data"] | {"tenant": out.event["tenant"]} for out in self.produced if out.topic == envelope.DEAD_LETTERS]

    def passed(self) -> list[dict[str, Any]]:
        return [out.event for out in self.produced if out.topic == "probe.out"]


def cancelled(tenant: str = "t1", *, id_: str = "evt-1", source: str = "/shop") -> bytes:
    return orjson.dumps(envelope.make_event("order.cancelled", tenant, {"order": "o-1"}, source=source, id_=id_))


def forward(item: Accepted) -> list[envelope.Out]:
    return [envelope.Out("probe.out", item.key, item.event)]


async def settle(ctx: Any) -> None:
    """Let the take buffer flush (it waits `batch_within_s` for more records)."""
    await asyncio.sleep(0.1)


@pytest.fixture
async def rig(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[EdgeRig, Any]]:
    rig = EdgeRig(monkeypatch, forward)
    async with rig.agent.test_context() as ctx:
        yield rig, ctx


async def test_rejected_records_become_dead_letters_and_valid_ones_pass(rig: tuple[EdgeRig, Any]) -> None:
    edge_rig, ctx = rig
    await ctx.put(b"\xff\xfe not json", key=b"t9/c-1")
    await ctx.put(orjson.dumps({**orjson.loads(cancelled()), "type": "order.shipped"}), key=b"t1/c-1")
    invalid = orjson.loads(cancelled())
    invalid["data"] = {}
    await ctx.put(orjson.dumps(invalid), key=b"t1/c-1")
    await ctx.put(cancelled(), key=b"t1/c-1")
    await settle(ctx)

    reasons = [letter["reason"] for letter in edge_rig.rejected()]
    assert reasons[0] == "not valid JSON: not UTF-8 text (byte 0xff at position 0)"
    assert reasons[1] == "unknown type 'order.shipped'"
    assert reasons[2] == "order.cancelled: missing 'data.order'"
    first = edge_rig.rejected()[0]
    # No tenant inside garbage: the key's first part names it; the raw bytes are kept.
    assert first["tenant"] == "t9" and first["key"] == "t9/c-1" and first["topic"] == envelope.ORDERS
    assert base64.b64decode(first["raw_base64"]) == b"\xff\xfe not json"
    assert [event["data"]["order"] for event in edge_rig.passed()] == ["o-1"]


async def test_a_repeat_of_tenant_source_and_id_has_its_effect_once(rig: tuple[EdgeRig, Any]) -> None:
    edge_rig, ctx = rig
    await ctx.put(cancelled(), key=b"t1/c-1")
    await ctx.put(cancelled(), key=b"t1/c-1")
    await settle(ctx)
    await ctx.put(cancelled(), key=b"t1/c-1")  # in a later batch too
    await ctx.put(cancelled(source="/box-office"), key=b"t1/c-1")  # same id, other source
    await ctx.put(cancelled("t2"), key=b"t2/c-1")  # same id and source, other tenant
    await settle(ctx)
    assert [(e["tenant"], e["source"]) for e in edge_rig.passed()] == [("t1", "/shop"), ("t1", "/box-office"), ("t2", "/shop")]
    assert edge_rig.rejected() == []


async def test_a_failing_handler_parks_the_record_and_the_stage_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    failing = {"evt-bad"}

    def handler(item: Accepted) -> list[envelope.Out]:
        if item.event["id"] in failing:
            raise KeyError("no such opt-in")
        return forward(item)

    edge_rig = EdgeRig(monkeypatch, handler)
    async with edge_rig.agent.test_context() as ctx:
        await ctx.put(cancelled(id_="evt-bad"), key=b"t1/c-1")
        await ctx.put(cancelled(id_="evt-good"), key=b"t1/c-1")
        await settle(ctx)
        assert [letter["reason"] for letter in edge_rig.rejected()] == ["handler error: KeyError: 'no such opt-in'"]
        assert [event["id"] for event in edge_rig.passed()] == ["evt-good"]
        # Once fixed, the parked record can be replayed: it was not marked as seen.
        failing.clear()
        await ctx.put(cancelled(id_="evt-bad"), key=b"t1/c-1")
        await settle(ctx)
    assert [event["id"] for event in edge_rig.passed()] == ["evt-good", "evt-bad"]


async def test_a_batch_of_records_carrying_many_items_each_holds_about_a_batch_size_of_items(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage's batch size counts items: a history record carries hundreds of statuses."""
    async def nothing_to_produce(app: faust.App, outs: Any, stage: str) -> None:
        assert list(outs) == []

    monkeypatch.setattr(edge_module, "produce", nothing_to_produce)
    sizes: list[int] = []

    async def handle(items: list[Accepted]) -> list[envelope.Out]:
        sizes.append(len(items))
        return []

    app = App("edge-test-items", fetch_max_wait_ms=50, store="memory://", autodiscover=False, topic_partitions=4)
    edge = Edge(app, "probe", batch_size=50, batch_within_s=0.05, dedupe_window=1000)
    edge.subscribe("statuses", [envelope.ORDERS], on_batch=handle, items_per_record=25)
    async with app.agents["probe.statuses"].test_context() as ctx:
        for number in range(5):
            await ctx.put(cancelled(id_=f"evt-{number}"), key=b"t1/c-1")
        await settle(ctx)
    assert sizes == [2, 2, 1]


def test_records_go_to_the_partition_kafkas_default_partitioner_picks() -> None:
    partitions = list(range(6))
    for key in (b"t1/c-1", b"t1/c-2", b"venue/~co-9", b"t2/msg-1/c-42"):
        assert partition_of(key, 6) == DefaultPartitioner()(key, partitions, partitions)


def test_stable_ids_are_the_uuid5_they_always_were() -> None:
    # Output ids must not change across an upgrade: a redelivered input has to yield the same
    # ids as before, so the next stage drops the repeat.
    import uuid

    from workers.envelope import derived_id, stable_id

    for name in ("a", "usher:event-message:t1/msg-1/c-42", "é|ü" * 40):
        assert stable_id(name) == str(uuid.uuid5(uuid.NAMESPACE_URL, name))
    cause = {"tenant": "t1", "source": "/shop/web", "id": "evt-1"}
    assert derived_id(cause, "prompted") == str(uuid.uuid5(uuid.NAMESPACE_URL, "t1|/shop/web|evt-1|prompted"))
    for number in range(200):
        cause = {"tenant": f"t{number}", "source": "/shop/demo", "id": uuid.uuid4().hex}
        suffix = f"changed/c-{number}/newsletter"
        name = f"{cause['tenant']}|{cause['source']}|{cause['id']}|{suffix}"
        assert derived_id(cause, suffix) == str(uuid.uuid5(uuid.NAMESPACE_URL, name))


async def test_a_batch_of_records_is_acknowledged_without_waiting_out_the_producers_linger(broker: str) -> None:
    # The edge hands aiokafka finished batches: kept open, each waited out the producer's linger
    # before it went to the broker, and a stage awaits several acknowledgements a batch.
    from aiokafka import AIOKafkaProducer

    from workers.edge import produce_batches

    linger_s = 5.0
    producer = AIOKafkaProducer(bootstrap_servers=broker.removeprefix("kafka://"), linger_ms=int(linger_s * 1000))
    await producer.start()
    try:
        event = envelope.make_event("order.cancelled", "t1", {"order": "o-1"}, source="/shop", id_="evt-linger")
        started = asyncio.get_running_loop().time()
        await produce_batches(producer, [envelope.Out(envelope.ORDERS, "t1/c-1", event)])
        assert asyncio.get_running_loop().time() - started < linger_s / 2
    finally:
        await producer.stop()
