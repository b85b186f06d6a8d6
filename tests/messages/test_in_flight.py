"""The sender's in-flight entries, without a broker: what a batch handed to a provider and has not
recorded in the ledger is found by the next batch, whichever contact and partition."""
from __future__ import annotations

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


async def test_a_request_stays_in_flight_until_its_outcome_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    app = faust.App("test-in-flight", broker="kafka://localhost:1", store="memory://", topic_partitions=6, autodiscover=False)
    table = messages_app.batched_table(app, "messages-in-flight")

    async def nothing_to_flush() -> None:  # no changelog without a broker: the store holds the entries
        return None

    monkeypatch.setattr(table, "flush", nothing_to_flush)
    ann, bob, cas = requested("ann", "r1", 0), requested("bob", "r2", 3), requested("cas", "r3", 3)
    first = messages_app.InFlight(table)
    assert first.provider_of(ann, ann.key, "r1") is None
    await first.hand_over([(ann, ann.key, "r1", "sendgrid"), (bob, bob.key, "r2", "sns"), (cas, cas.key, "r3", "sns")])
    await first.recorded([(ann, ann.key, "r1", "sendgrid"), (cas, cas.key, "r3", "sns")])

    # The batch recorded two outcomes and stopped before the third: the next batch finds it.
    again = messages_app.InFlight(table)
    assert [again.provider_of(item, item.key, request) for item, request in ((ann, "r1"), (bob, "r2"), (cas, "r3"))] == [
        None, "sns", None]
