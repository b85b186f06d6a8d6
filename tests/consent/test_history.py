"""The consent history table's pages, without a broker."""
from __future__ import annotations

import faust
from aiokafka.partitioner import murmur2

from workers.consent.app import HISTORY_PAGE, History

PARTITIONS = 6


def partition(key: str) -> int:
    return (murmur2(key.encode()) & 0x7FFFFFFF) % PARTITIONS


def history(name: str) -> History:
    app = faust.App(f"test-{name}", broker="kafka://localhost:1", store="memory://", topic_partitions=PARTITIONS, autodiscover=False)
    return History(app, "consent-history")


def test_history_keeps_every_change_in_order_and_writes_pages_once() -> None:
    found = history("pages")
    key, kept, writes = "t1/c-42", [], []
    for number in range(5 * HISTORY_PAGE + 3):
        changes = [{"n": number, "k": k} for k in range(number % 3)]
        if changes:
            kept += changes
            writes += found.append(key, changes)
        assert found.changes(key) == kept
    salts = found.table.get(key)["pages"]
    assert len(salts) == len(kept) // HISTORY_PAGE - (len(kept) % HISTORY_PAGE == 0)
    # Each page is written once, full; the contact's own entry stays small.
    assert [out.key for out in writes if out.key != key] == [f"{key}#{n}.{salt}" for n, salt in enumerate(salts)]
    assert all(len(out.event["changes"]) == HISTORY_PAGE for out in writes if out.key != key)
    assert all(len(out.event["changes"]) <= HISTORY_PAGE for out in writes if out.key == key)
    # Every page is in the contact's partition, so it recovers and moves with the contact.
    assert {partition(out.key) for out in writes} == {partition(key)}


def test_an_entry_without_pages_reads_as_it_is_and_overflows_into_pages() -> None:
    found = history("legacy")
    key = "t1/c-7"
    older = [{"n": n} for n in range(3 * HISTORY_PAGE + 1)]
    found.table.set(key, {"changes": older})
    assert found.changes(key) == older
    found.append(key, [{"n": "new"}])
    assert found.changes(key) == [*older, {"n": "new"}]
    assert len(found.table.get(key)["changes"]) <= HISTORY_PAGE
    assert history("empty").changes(key) == []
