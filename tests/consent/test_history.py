"""The consent history: entries added to by the agent and rebuilt from `consent.log`, without a broker."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import faust
import pytest
import orjson
from faust.types import TP

from workers import envelope
from workers.consent.history import History
from workers.edge import AsCurrentEvent, Delivered, Edge, handling_batch

PARTITIONS = 6


def changed(contact: str, number: int) -> dict:
    data = {"contact": contact, "optin": "newsletter", "from": "unknown", "to": "opted_in", "n": number}
    return envelope.make_event("consent.changed", "t1", data, source="/usher/consent")


@pytest.fixture(params=["memory://", "rocksdb://"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path]:
    return request.param, tmp_path


def history(name: str, store: tuple[str, Path]) -> History:
    url, datadir = store
    app = faust.App(f"test-{name}", broker="kafka://localhost:1", store=url, datadir=str(datadir), topic_partitions=PARTITIONS,
                    autodiscover=False)
    return History(Edge(app, "consent", batch_size=100, batch_within_s=0.01, dedupe_window=100), "consent-history")


def log_records(events: list[dict], partition: int = 2, first_offset: int = 0) -> list[SimpleNamespace]:
    """`consent.log` records as faust's recovery hands them to a table."""
    tp = TP(envelope.CONSENT_LOG, partition)
    return [
        SimpleNamespace(message=SimpleNamespace(key=f"t1/{event['data']['contact']}".encode(), value=orjson.dumps(event),
                                                tp=tp, partition=partition, offset=first_offset + number))
        for number, event in enumerate(events)
    ]


def test_the_history_is_recovered_from_the_consent_log_in_order(store: tuple[str, Path]) -> None:
    found = history("recovery", store)
    events = [changed("c-1", 0), changed("c-2", 0), changed("c-1", 1), changed("c-1", 2)]
    found.table.apply_changelog_batch(log_records(events[:2]))
    found.table.apply_changelog_batch(log_records(events[2:], first_offset=2))
    assert found.changes("t1/c-1") == [events[0]["data"], events[2]["data"], events[3]["data"]]
    assert found.changes("t1/c-2") == [events[1]["data"]]
    assert found.changes("t1/c-3") == []


def test_records_read_again_are_each_kept_once(store: tuple[str, Path]) -> None:
    """Recovery resumes where the last one ended, so it reads again what the agent stored since."""
    found = history("again", store)
    events = [changed("c-1", n) for n in range(4)]
    found.table.apply_changelog_batch(log_records(events[:1]))
    # The agent stores the next two as it produces them, then a recovery reads the log from the start.
    with handling_batch(), AsCurrentEvent(Delivered(log_records(events[1:2])[0].message)):
        found.append("t1/c-1", events[1:3])
    found.entries.write()  # as the edge does once the batch's records are in Kafka
    found.table.apply_changelog_batch(log_records(events))
    found.table.apply_changelog_batch(log_records(events[2:], first_offset=2))
    assert found.changes("t1/c-1") == [event["data"] for event in events]


def test_a_record_that_is_no_consent_change_is_left_out(store: tuple[str, Path]) -> None:
    found = history("junk", store)
    [good] = log_records([changed("c-1", 0)])
    junk = SimpleNamespace(message=SimpleNamespace(**{**vars(good.message), "value": b"not json", "offset": 1}))
    other = SimpleNamespace(message=SimpleNamespace(**{**vars(good.message), "value": b'{"type": "consent.status"}', "offset": 2}))
    found.table.apply_changelog_batch([good, junk, other])
    assert found.changes("t1/c-1") == [changed("c-1", 0)["data"]]


def test_changes_whose_records_never_reached_kafka_leave_the_history_as_it_was(store: tuple[str, Path]) -> None:
    found = history("discarded", store)
    events = [changed("c-1", n) for n in range(3)]
    found.table.apply_changelog_batch(log_records(events[:1]))
    with handling_batch(), AsCurrentEvent(Delivered(log_records(events[1:2])[0].message)):
        found.append("t1/c-1", events[1:])
        assert found.changes("t1/c-1") == [event["data"] for event in events]
    found.entries.discard()  # as the edge does when the batch could not be produced
    assert found.changes("t1/c-1") == [events[0]["data"]]
