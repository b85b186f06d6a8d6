"""Tables whose writes wait for the batch's records: read at once, stored once Kafka has them."""
from __future__ import annotations

import asyncio
import tracemalloc
from datetime import date, datetime, timezone
from uuid import UUID
from pathlib import Path
from types import SimpleNamespace

import pytest
from faust.utils import json as faust_json

from workers import edge as edge_module
from workers import envelope
from workers.edge import Accepted, Delivered, Edge
from workers.tables import ContactTable, json_bytes, use_stage_rocksdb
from workers.transport import App

PARTITIONS = 4


def order(contact: str, id_: str, partition: int = 1) -> Delivered:
    event = envelope.make_event("order.cancelled", "t1", {"order": "o-1"}, source="/shop", id_=id_)
    return Delivered(SimpleNamespace(topic=envelope.ORDERS, partition=partition, offset=0, key=f"t1/{contact}".encode(),
                                     value=envelope.dumps(event)))


@pytest.fixture(params=["memory://", "rocksdb://"])
def rig(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """An edge on an unstarted app whose handler counts each contact's orders in a ContactTable;
    `fail` makes the next produce fail as a lost broker would (`fail_changes`: the next produce of
    table changes); `in_kafka` is every record produced, in order."""
    rig = SimpleNamespace(produced=[], in_kafka=[], fail=False, fail_changes=False)

    async def produce(app: object, outs: list[envelope.Out], stage: str) -> None:
        if rig.fail or (rig.fail_changes and any(out.table_change for out in outs)):
            rig.fail = rig.fail_changes = False
            raise ConnectionError("broker gone")
        rig.in_kafka.extend(outs)
        rig.produced.extend(out for out in outs if out.topic == "probe.counted")

    monkeypatch.setattr(edge_module, "produce", produce)
    app = App(f"tables-{request.param[:3]}", fetch_max_wait_ms=50, store=request.param, datadir=str(tmp_path),
              autodiscover=False, topic_partitions=PARTITIONS)
    rig.edge = Edge(app, "probe", batch_size=50, batch_within_s=0.01, dedupe_window=1000)
    rig.counts = ContactTable(rig.edge, "probe-counts")
    use_stage_rocksdb(app)

    def count(item: Accepted) -> list[envelope.Out]:
        seen = rig.counts.get(item.key) or {"orders": 0}
        if rig.in_handler:
            rig.in_handler(item)
        state = {"orders": seen["orders"] + 1}
        return [rig.counts.set(item.key, state), envelope.Out("probe.counted", item.key, state)]

    rig.in_handler = None
    rig.count = count
    return rig


def stored(rig: SimpleNamespace, key: str) -> object:
    """What the table's store itself holds (not the writes still waiting)."""
    store = rig.counts.table.data
    if hasattr(store, "_db_for_partition"):
        raw = store._db_for_partition(1).get(key.encode())
        return None if raw is None else envelope.loads(raw)
    return store.data.get(key.encode())


async def test_a_change_is_stored_once_its_records_are_in_kafka_and_read_at_once_before(rig: SimpleNamespace) -> None:
    def looks(item: Accepted) -> None:
        # The second order of the batch sees the first's change; the store does not have it yet.
        if item.event["id"] == "e2":
            assert rig.counts.get("t1/ann") == {"orders": 1} and stored(rig, "t1/ann") is None
            assert dict(rig.counts.items()) == {"t1/ann": {"orders": 1}}

    rig.in_handler = looks
    await rig.edge.process([order("ann", "e1"), order("ann", "e2")], on_record=rig.count)

    assert [out.event for out in rig.produced] == [{"orders": 1}, {"orders": 2}]
    assert stored(rig, "t1/ann") == {"orders": 2}


async def test_a_change_whose_records_never_reached_kafka_is_made_again(rig: SimpleNamespace) -> None:
    rig.fail = True
    with pytest.raises(ConnectionError):
        await rig.edge.process([order("bob", "e1")], on_record=rig.count)
    assert rig.counts.get("t1/bob") is None and stored(rig, "t1/bob") is None

    # The record is read again (its offset was never committed): its change and records come now.
    await rig.edge.process([order("bob", "e1")], on_record=rig.count)
    assert [out.event for out in rig.produced] == [{"orders": 1}]
    assert stored(rig, "t1/bob") == {"orders": 1}


@pytest.mark.parametrize("rig", ["rocksdb://"], indirect=True)  # a memory store is its own entries at hand
async def test_once_partitions_have_moved_an_entry_is_read_as_recovery_stored_it(rig: SimpleNamespace) -> None:
    """An entry is kept at hand once read or written; recovery after a rebalance writes the store
    directly, so what was kept from before goes."""
    await rig.edge.process([order("ann", "e1")], on_record=rig.count)
    # e.g. changes another worker made while it owned the partition
    rig.counts.table.data._db_for_partition(1)[b"t1/ann"] = envelope.dumps({"orders": 5})
    rig.edge.app.consumer_generation_id += 1

    await rig.edge.process([order("ann", "e2")], on_record=rig.count)
    assert [out.event for out in rig.produced] == [{"orders": 1}, {"orders": 6}]


async def test_a_handler_that_raises_leaves_no_change_behind(rig: SimpleNamespace) -> None:
    def fails_after_writing(item: Accepted) -> list[envelope.Out]:
        rig.count(item)  # the change is staged, then the handler fails: its outputs are dropped
        raise RuntimeError("bug")

    # Ann's first order counts; the second's handler fails after writing; Bob's only write fails.
    outcomes = {"e1": rig.count, "e2": fails_after_writing, "e3": fails_after_writing}
    await rig.edge.process([order("ann", "e1"), order("ann", "e2"), order("bob", "e3")],
                           on_record=lambda item: outcomes[item.event["id"]](item))

    assert [out.event for out in rig.produced] == [{"orders": 1}]
    assert stored(rig, "t1/ann") == {"orders": 1} and stored(rig, "t1/bob") is None
    assert rig.counts.get("t1/bob") is None


async def test_a_change_goes_to_its_changelog_only_once_its_records_are_in_kafka(rig: SimpleNamespace) -> None:
    changelog = rig.counts.changelog
    await rig.edge.process([order("ann", "e1"), order("bob", "e2")], on_record=rig.count)
    assert [out.topic for out in rig.in_kafka] == ["probe.counted", "probe.counted", changelog, changelog]

    # The records are in, the change is not: the order is handled again and its record comes twice.
    rig.fail_changes = True
    with pytest.raises(ConnectionError):
        await rig.edge.process([order("ann", "e3")], on_record=rig.count)
    assert stored(rig, "t1/ann") == {"orders": 1}
    await rig.edge.process([order("ann", "e3")], on_record=rig.count)
    assert [out.event for out in rig.produced] == [{"orders": 1}, {"orders": 1}, {"orders": 2}, {"orders": 2}]
    assert stored(rig, "t1/ann") == {"orders": 2}


async def test_a_batch_writes_only_its_own_tables_changes(rig: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two subscriptions of one stage: the one done first does not store the other's changes."""
    answers = ContactTable(rig.edge, "probe-answers")
    counting_sent, slow_acknowledged = asyncio.Event(), asyncio.Event()

    async def produce(app: object, outs: list[envelope.Out], stage: str) -> None:
        if any(out.topic == "probe.counted" for out in outs):
            counting_sent.set()
            await slow_acknowledged.wait()  # the counting batch's records are slow to be acknowledged

    monkeypatch.setattr(edge_module, "produce", produce)

    def answer(item: Accepted) -> list[envelope.Out]:
        return [answers.set(item.key, {"answered": True})]

    counting = asyncio.create_task(rig.edge.process([order("ann", "e1")], on_record=rig.count))
    await counting_sent.wait()  # its change is staged, its records not yet acknowledged
    await rig.edge.process([order("bob", "e2")], on_record=answer)
    assert stored(rig, "t1/ann") is None  # its records are not acknowledged yet

    slow_acknowledged.set()
    await counting
    assert stored(rig, "t1/ann") == {"orders": 1}


@pytest.mark.parametrize("value", [
    "t1/c-1", {"b": [1, 2.5, None, True], "a": "Zoë 🎫"}, {1: "a non-string key"},
    {"at": datetime(2026, 12, 1, 19, 30, tzinfo=timezone.utc), "on": date(2026, 12, 1)}, {"id": UUID(int=7)},
])
def test_table_values_are_encoded_as_fausts_json_codec_encodes_them(value: object) -> None:
    """Stores and changelogs written by faust and by the stages hold the same bytes for a value."""
    assert json_bytes(value) == faust_json.dumps(value)


def test_an_encoded_value_takes_the_memory_of_its_length() -> None:
    """orjson's output comes in a buffer of 4 KB or more; what the stages keep must not."""
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        kept = [json_bytes(f"t1/c-{number}") for number in range(1000)]
        grown = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
    assert len(kept) == 1000 and grown < 1000 * 200
