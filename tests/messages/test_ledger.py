"""The ledger, without a broker: a row per request, and a contact's rows read back by their prefix."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import faust
import pytest

from workers.edge import Accepted, Delivered
from workers.envelope import make_event
from workers.messages import app as messages_app


def requested(contact: str, request: str, partition: int) -> Accepted:
    event = make_event("message.requested", "t1", {"contact": contact, "request": request}, source="/test")
    message = SimpleNamespace(topic="messages.outbox", partition=partition, offset=0, key=f"t1/{contact}".encode(), value=None)
    return Accepted(event, f"t1/{contact}", Delivered(message))


def row(request: str, at: str, outcome_at: str | None = None) -> dict:
    found = {"request": request, "message": "m-1", "contact": "c", "channel": "email", "kind": "event-message", "status": "sent", "at": at}
    return found | ({"outcome": {"status": "sent", "at": outcome_at}} if outcome_at else {})


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
def test_a_contacts_rows_are_its_own_requests_oldest_outcome_first(store: str, tmp_path: Path) -> None:
    app = faust.App(f"test-ledger-{store[:3]}", broker="kafka://localhost:1", store=store, datadir=str(tmp_path), topic_partitions=6,
                    autodiscover=False)
    ledger = messages_app.Ledger(messages_app.batched_table(app, "messages-ledger"))
    ann, ann_again, ann_10 = requested("c-1", "r2", 2), requested("c-1", "r1", 2), requested("c-10", "r3", 5)
    # A later status (opened) does not move a row: rows are in the order of their own outcome.
    ledger.put(ann, ann.key, row("r2", at="2026-12-01T10:00:00Z", outcome_at="2026-12-01T09:00:00Z"))
    ledger.put(ann_again, ann_again.key, row("r1", at="2026-12-01T08:30:00Z", outcome_at="2026-12-01T08:30:00Z"))
    ledger.put(ann_10, ann_10.key, row("r3", at="2026-12-01T07:00:00Z", outcome_at="2026-12-01T07:00:00Z"))

    assert ledger.row(ann, ann.key, "r1")["request"] == "r1" and ledger.row(ann, ann.key, "r3") is None
    assert [found["request"] for found in ledger.rows_of("t1/c-1")] == ["r1", "r2"]
    assert [found["request"] for found in ledger.rows_of("t1/c-10")] == ["r3"]
    assert ledger.rows_of("t1/c-2") == []
