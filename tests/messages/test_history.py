from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import faust
import pytest

from workers.edge import Accepted, Delivered
from workers.envelope import DELIVERIES, Out, make_event
from workers.messages import app as messages_app
from workers.schemas import problem
from workers.messages.rules import (
    contact_history_key,
    contact_history_page,
    fold_recipient,
    fold_status,
    history_key,
    history_page,
)


def status(request: str, contact: str, name: str, at: str, orders: int = 1, kind: str = "event-message") -> dict[str, Any]:
    return {"request": request, "message": "msg-1", "contact": contact, "channel": "email", "status": name,
            "provider": "sendgrid", "provider_id": None, "at": f"2026-11-30T{at}.000Z", "error": None,
            "kind": kind, "orders": orders}


def fold(statuses: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """The message's summary and rows, as the agent's tables would hold them."""
    summary, rows = None, {}
    for item in statuses:
        summary, rows[item["request"]] = fold_status(summary, rows.get(item["request"]), item)
    return summary, rows


SENDING = [
    status("r1", "c-1", "sent", "12:00:02", orders=2),
    status("r2", "c-2", "sent", "12:00:01"),
    status("r3", "c-3", "failed", "12:00:00", orders=3),
    status("r1", "c-1", "delivered", "12:01:00", orders=2),
    status("r1", "c-1", "opened", "12:05:00", orders=2),
    status("r1", "c-1", "opened", "12:05:00", orders=2),  # the same callback twice
    status("r1", "c-1", "opened", "13:00:00", orders=2),  # opened again later
    status("r1", "c-1", "delivered", "12:00:59", orders=2),  # a late, older callback
    status("r2", "c-2", "deferred", "12:02:00"),
    status("r2", "c-2", "bounced", "12:30:00"),
    status("r4", "c-4", "sent", "12:00:03"),
]


def test_the_history_counts_recipients_orders_and_each_status_once_per_recipient() -> None:
    summary, rows = fold(SENDING)

    page = history_page(summary, rows.values())

    assert page["message"] == "msg-1" and page["sent_at"] == "2026-11-30T12:00:01.000Z"
    assert (page["recipients"], page["orders"], page["total"]) == (4, 7, 4)
    assert page["statuses"] == {"sent": 3, "failed": 1, "delivered": 1, "opened": 1, "deferred": 1, "bounced": 1}
    assert page["items"] == [
        {"contact": "c-1", "request": "r1", "status": "opened", "at": "2026-11-30T13:00:00.000Z"},
        {"contact": "c-2", "request": "r2", "status": "bounced", "at": "2026-11-30T12:30:00.000Z"},
        {"contact": "c-3", "request": "r3", "status": "failed", "at": "2026-11-30T12:00:00.000Z"},
        {"contact": "c-4", "request": "r4", "status": "sent", "at": "2026-11-30T12:00:03.000Z"},
    ]


def test_folding_the_same_records_again_changes_nothing() -> None:
    once = fold(SENDING)
    assert fold(SENDING + SENDING) == once


def test_the_history_is_paged() -> None:
    summary, rows = fold(SENDING)

    first = history_page(summary, iter(rows.values()), page=1, size=3)
    second = history_page(summary, iter(rows.values()), page=2, size=3)
    beyond = history_page(summary, iter(rows.values()), page=3, size=3)

    assert [item["request"] for item in first["items"]] == ["r1", "r2", "r3"]
    assert [item["request"] for item in second["items"]] == ["r4"]
    assert beyond["items"] == [] and beyond["total"] == 4


@pytest.mark.parametrize(("page", "size"), [(0, 10), (1, 0), (1, 1001)])
def test_a_page_outside_the_limits_is_refused(page: int, size: int) -> None:
    with pytest.raises(ValueError, match="page must be 1 or more"):
        history_page(None, [], page=page, size=size)


def test_a_message_not_sent_yet_has_an_empty_history() -> None:
    assert history_page(None, [], message="msg-9") == {
        "message": "msg-9", "sent_at": None, "recipients": 0, "orders": 0, "statuses": {}, "total": 0, "items": [],
    }


def test_only_a_messages_own_mails_are_in_its_history() -> None:
    assert history_key("t1", status("r1", "c-1", "sent", "12:00:00")) == "t1/msg-1"
    assert history_key("t1", status("r9", "c-1", "sent", "12:00:00", kind="test")) is None
    assert history_key("t1", status("r8", "c-1", "sent", "12:00:00", kind="doi-confirmation")) is None


def delivery(data: dict[str, Any]) -> Out:
    return Out(DELIVERIES, "t1/msg-1", make_event("delivery.status", "t1", data, source="/usher/messages",
                                                  id_=f"{data['request']}-{data['status']}"))


def test_a_batchs_statuses_reach_the_history_as_one_record_per_message_of_its_own_mails() -> None:
    outs = [delivery(status("r1", "c-1", "sent", "12:00:00")), delivery(status("r9", "c-1", "sent", "12:00:00", kind="test")),
            delivery(status("r2", "c-2", "failed", "12:00:01", orders=3)),
            delivery(status("r3", "c-3", "sent", "12:00:02") | {"message": "msg-2"})]

    records = messages_app.history_records(outs)

    assert [(record.topic, record.key) for record in records] == [(messages_app.BY_MESSAGE, "t1/msg-1"),
                                                                  (messages_app.BY_MESSAGE, "t1/msg-2")]
    assert all(problem(record.event) is None for record in records)
    assert records[0].event["data"]["statuses"] == [
        {"request": "r1", "message": "msg-1", "contact": "c-1", "channel": "email", "kind": "event-message", "orders": 1,
         "status": "sent", "at": "2026-11-30T12:00:00.000Z"},
        {"request": "r2", "message": "msg-1", "contact": "c-2", "channel": "email", "kind": "event-message", "orders": 3,
         "status": "failed", "at": "2026-11-30T12:00:01.000Z"},
    ]


def test_a_large_batch_is_split_and_a_batch_handled_again_gives_the_same_records() -> None:
    outs = [delivery(status(f"r{n}", f"c-{n}", "sent", "12:00:00")) for n in range(1200)]

    records = messages_app.history_records(outs)

    assert [len(record.event["data"]["statuses"]) for record in records] == [500, 500, 200]
    assert all(problem(record.event) is None for record in records)
    assert [record.event["id"] for record in messages_app.history_records(outs)] == [record.event["id"] for record in records]
    assert len({record.event["id"] for record in records}) == 3


def test_a_contact_sees_its_own_messages_including_tests_and_opt_in_mails() -> None:
    statuses = [
        status("r1", "c-1", "sent", "12:00:00"),
        status("r1", "c-1", "clicked", "12:10:00"),
        status("r8", "c-1", "delivered", "09:00:00", kind="doi-confirmation"),
    ]
    rows: dict[str, dict[str, Any]] = {}
    for item in statuses:
        row_key = contact_history_key({"tenant": "t1", "data": item})
        rows[row_key] = fold_recipient(rows.get(row_key), item)

    page = contact_history_page("c-1", list(rows.values()), size=1)

    assert list(rows) == ["t1/c-1/r1", "t1/c-1/r8"]
    assert page == {
        "contact": "c-1",
        "total": 2,
        "items": [{"request": "r1", "message": "msg-1", "kind": "event-message", "channel": "email",
                   "status": "clicked", "at": "2026-11-30T12:10:00.000Z"}],
    }


async def test_pages_follow_the_order_statuses_came_in_across_order_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's tables, without a broker: rows in chunks of two, pages of three."""
    monkeypatch.setattr(messages_app, "ORDER_CHUNK", 2)
    agent = history_agent(monkeypatch, "test-history-order")
    sent = [status(f"r{n}", f"c-{n}", "sent", f"12:00:0{n}") for n in (5, 3, 1, 4, 2)]
    later = [status("r3", "c-3", "delivered", "12:01:00"), status("r6", "c-6", "failed", "12:02:00")]

    await agent.handle([accepted(sent[:3])])
    await agent.handle([accepted(sent[3:5]), accepted(later + sent[:1])])

    pages = [agent.page("t1", "msg-1", page, 3) for page in (1, 2, 3)]
    assert [[(item["request"], item["status"]) for item in page["items"]] for page in pages] == [
        [("r5", "sent"), ("r3", "delivered"), ("r1", "sent")], [("r4", "sent"), ("r2", "sent"), ("r6", "failed")], []]
    assert {page["total"] for page in pages} == {6} and pages[0]["statuses"] == {"sent": 5, "delivered": 1, "failed": 1}
    assert [item["request"] for item in agent.page("t1", "msg-1", 2, 2)["items"]] == ["r1", "r4"]


async def test_a_record_not_keyed_by_its_statuses_message_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    agent = history_agent(monkeypatch, "test-history-key", edge=SimpleNamespace(reject=lambda reason, item: reason))

    outs = await agent.handle([accepted([status("r1", "c-1", "sent", "12:00:00")], key="t1/msg-2"),
                               accepted([status("r2", "c-2", "sent", "12:00:01")])])

    assert outs == ["record key 't1/msg-2' is not t1/{message} of each status"]
    assert (agent.page("t1", "msg-2", 1, 10)["total"], agent.page("t1", "msg-1", 1, 10)["total"]) == (0, 1)


def history_agent(monkeypatch: pytest.MonkeyPatch, name: str, edge: Any = None) -> messages_app.History:
    """The agent on its table, without a broker."""
    app = faust.App(name, broker="kafka://localhost:1", store="memory://", topic_partitions=6, autodiscover=False)
    table = messages_app.batched_table(app, "messages-history")
    monkeypatch.setattr(table, "flush", _nothing_to_flush)
    return messages_app.History(SimpleNamespace(edge=edge), table)


async def _nothing_to_flush() -> None:
    """No changelog without a broker: the table's store holds what the agent wrote."""


def accepted(statuses: list[dict[str, Any]], key: str = "t1/msg-1") -> Accepted:
    event = make_event(messages_app.STATUSES, "t1", {"statuses": statuses}, source="/usher/messages")
    message = SimpleNamespace(topic=messages_app.BY_MESSAGE, partition=0, offset=0, key=key.encode(), value=None)
    return Accepted(event, key, Delivered(message))
