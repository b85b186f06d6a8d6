"""The whole pipeline against the real (embedded) broker."""
from __future__ import annotations

import base64
import json

from harness import Kafka, WorkerProcess, event

from workers import envelope


def order(tenant: str, contact: str, order_id: str, *, answer: bool = True) -> dict:
    return event(
        "order.placed",
        tenant,
        {
            "order": order_id,
            "event": "ev-1",
            "channel": "web",
            "ip": "203.0.113.7",
            "user_agent": "pytest",
            "contact": {"id": contact, "email": f"{contact}@example.com", "first_name": "Ann", "last_name": "Peeters", "language": "nl"},
            "tickets": [{"type": "adult", "price_rank": "A", "row": "5", "seat": "12"}],
            "products": [],
            "optins": [{"optin": "newsletter", "answer": answer, "prechecked": False, "text_shown": "Send me the newsletter", "version": 3}],
        },
    )


def test_bad_records_are_dead_lettered_and_the_next_valid_one_is_processed(usher: WorkerProcess, kafka: Kafka, tenant: str) -> None:
    key = f"{tenant}/c-1"
    kafka.send(envelope.ORDERS, key, b"\x00\xffnot json at all")
    kafka.send(envelope.ORDERS, key, event("order.shipped", tenant, {"order": "o-0"}))
    invalid = order(tenant, "c-1", "o-1")
    del invalid["data"]["contact"]["id"]
    kafka.send(envelope.ORDERS, key, invalid)
    kafka.send(envelope.ORDERS, key, order(tenant, "c-1", "o-2"))

    def rejected_by_consent(found: list[dict]) -> list[dict]:
        return [r for r in found if r["data"]["topic"] == envelope.ORDERS]

    # Garbage has no tenant inside: the key's first part names it.
    letters = kafka.wait_for(envelope.DEAD_LETTERS, tenant, lambda f: len({r["data"]["offset"] for r in rejected_by_consent(f)}) >= 3)
    reasons = {r["data"]["offset"]: r["data"] for r in rejected_by_consent(letters)}
    by_reason = sorted(reasons.values(), key=lambda d: d["offset"])
    assert by_reason[0]["reason"].startswith("not valid JSON")
    assert base64.b64decode(by_reason[0]["raw_base64"]) == b"\x00\xffnot json at all"
    assert "unknown type 'order.shipped'" in by_reason[1]["reason"]
    assert "contact" in by_reason[2]["reason"] and "id" in by_reason[2]["reason"]
    assert json.loads(base64.b64decode(by_reason[2]["raw_base64"]))["data"]["order"] == "o-1"
    for letter in by_reason:
        assert letter["key"] == key and letter["topic"] == envelope.ORDERS and letter["partition"] >= 0

    # The valid order after them still had its effect.
    states = kafka.wait_for(envelope.CONSENT_STATE, tenant, lambda f: f, type_="consent.status")
    assert states[-1]["data"]["optins"]["newsletter"]["status"] == "opted_in"
    assert states[-1]["data"]["optins"]["newsletter"]["evidence"]["order"] == "o-2"


def test_a_record_delivered_twice_has_its_effect_once(usher: WorkerProcess, kafka: Kafka, tenant: str) -> None:
    placed = order(tenant, "c-2", "o-9", answer=False)
    kafka.send(envelope.ORDERS, f"{tenant}/c-2", placed)
    kafka.send(envelope.ORDERS, f"{tenant}/c-2", placed)
    kafka.wait_for(envelope.CONSENT_LOG, tenant, lambda f: f, type_="consent.changed")
    # A later record proves the repeat was read before we count.
    kafka.send(envelope.ORDERS, f"{tenant}/c-2", order(tenant, "c-2", "o-10", answer=True))
    changes = kafka.wait_for(envelope.CONSENT_LOG, tenant, lambda f: any(c["data"]["to"] == "opted_in" for c in f))
    assert [c["data"]["to"] for c in changes] == ["opted_out", "opted_in"]
