"""Fixtures for the segments stage's broker-backed tests: a driver that publishes what a ticket shop
and its back office would and reads back what the stage published."""
from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from harness import Kafka, StageDriver, WorkerProcess, event, unique

from workers import envelope, schemas

SETTINGS = {"default_language": "en", "languages": ["en", "nl"], "friends_family_channels": ["web"]}
FIELDS = {
    "diet": {"id": "diet", "type": "dropdown", "label": {"en": "Diet"}, "choices": ["vegan", "vegetarian"],
             "select": {"mode": "single"}, "show_in": ["checkout", "profile"]},
    "notes": {"id": "notes", "type": "text", "label": {"en": "Notes"}},
}


class SegmentsDriver(StageDriver):
    """The segments stage of the shared worker, seen from outside: Kafka in and out, and its web port."""

    stage = "segments"

    def configure(self, tenant: str, *, fields: dict[str, dict[str, Any]] = FIELDS, optin_set: list[str] | None = None,
                  filters: dict[str, list[str]] | None = None) -> None:
        """Settings, custom fields (id -> data), a default opt-in set and filters (id -> item ids)."""
        records = [(envelope.CONFIG, f"{tenant}/settings/default", event("config.settings", tenant, SETTINGS))]
        records += [(envelope.CONFIG, f"{tenant}/custom-field/{f}", event("config.custom-field", tenant, data)) for f, data in fields.items()]
        if optin_set is not None:
            for optin in optin_set:
                data = {"id": optin, "kind": "optional", "purpose": "email", "text": {"en": f"Send me {optin}"}, "version": 1,
                        "channels": ["web"], "active": True}
                records.append((envelope.CONFIG, f"{tenant}/optin/{optin}", event("config.optin", tenant, data)))
            data = {"id": "default", "optins": optin_set, "default": True}
            records.append((envelope.CONFIG, f"{tenant}/optin-set/default", event("config.optin-set", tenant, data)))
        for filter_id, items in (filters or {}).items():
            data = {"id": filter_id, "name": filter_id.title(), "applies_to": "buyer", "items": [{"id": i, "name": i} for i in items]}
            records.append((envelope.CONFIG, f"{tenant}/filter/{filter_id}", event("config.filter", tenant, data)))
        self.publish_and_wait(records)

    def schedule_event(self, tenant: str, event_id: str, *, starts_in: timedelta = timedelta(days=30)) -> None:
        starts = envelope.utcnow() + starts_in
        data = {"event": event_id, "name": "Hamlet", "starts_at": envelope.isotime(starts),
                "ends_at": envelope.isotime(starts + timedelta(hours=3)), "timezone": "Europe/Brussels",
                "optin_set": None, "products": [{"id": "parking", "name": "Parking"}]}
        self.publish_and_wait([(envelope.EVENTS, f"{tenant}/{event_id}", event("event.scheduled", tenant, data))])

    def define_message(self, tenant: str, message: str, event_id: str, *, audience: dict[str, Any] | None = None,
                       consent: dict[str, Any] | None = None, when: str = "before_start", send_in: str = "customer") -> dict[str, Any]:
        data = {"message": message, "event": event_id, "channel": "email", "layout": "event-info",
                "custom_text": "Doors open at 19:00", "audience": audience or {"type": "all"},
                "consent": consent or {"mode": "ignore"}, "language": {"only": None, "send_in": send_in},
                "send": {"when": when, "hours": 24}}
        defined = event("message.defined", tenant, data)
        self.publish_and_wait([(envelope.MESSAGES, f"{tenant}/{message}", defined)])
        return defined

    def order(self, tenant: str, contact: str, *, event_id: str = "ev-1", products: list[str] | None = None,
              tickets: list[dict[str, str]] | None = None, fields: dict[str, Any] | None = None,
              first_name: str = "Ann", last_name: str = "Peeters", email: str | None = None) -> dict[str, Any]:
        data = {"order": unique("o"), "event": event_id, "channel": "web", "ip": "203.0.113.7", "user_agent": "Shop/1.0",
                "contact": {"id": contact, "email": email or f"{contact}@example.com", "first_name": first_name,
                            "last_name": last_name, "phone": "+32470000000", "language": "nl"},
                "tickets": tickets or [{"type": "adult", "price_rank": "A", "row": "5", "seat": "12"}],
                "products": products or [], "optins": []}
        if fields is not None:
            data["fields"] = fields
        placed = event("order.placed", tenant, data)
        self.kafka.send(envelope.ORDERS, f"{tenant}/{contact}", placed)
        return placed

    def cancel(self, tenant: str, contact: str, placed: dict[str, Any]) -> None:
        cancelled = event("order.cancelled", tenant, {"order": placed["data"]["order"]})
        self.kafka.send(envelope.ORDERS, f"{tenant}/{contact}", cancelled)

    def command(self, tenant: str, type_: str, data: dict[str, Any], *, key: str | None = None) -> dict[str, Any]:
        sent = event(type_, tenant, data, source="/shop/backoffice")
        self.kafka.send(envelope.COMMANDS, key or f"{tenant}/{data['contact']}", sent)
        return sent

    def wait(self, topic: str, tenant: str, type_: str, predicate: Callable[[list[dict[str, Any]]], Any],
             timeout: float = 30) -> list[dict[str, Any]]:
        """The `data` of every `type_` record of the tenant on `topic`, once `predicate` holds for them;
        each record must fit the contract's schema of its type."""
        deadline = time.monotonic() + timeout
        while True:
            events = self.kafka.events(topic, tenant, type_)
            found = [e["data"] for e in events]
            if predicate(found):
                assert [schemas.problem(e) for e in events] == [None] * len(events)
                return found
            assert time.monotonic() < deadline, f"timed out on {topic} ({type_}) for {tenant}; found {found}"
            time.sleep(0.2)

    def profile(self, tenant: str, contact: str, predicate: Callable[[dict[str, Any]], Any] = bool) -> dict[str, Any]:
        """The contact's newest `contact.profile` data once it satisfies `predicate`."""
        def newest_matches(found: list[dict[str, Any]]) -> bool:
            mine = [p for p in found if p["contact"] == contact]
            return bool(mine) and predicate(mine[-1])

        found = self.wait(envelope.CONTACTS_STATE, tenant, "contact.profile", newest_matches)
        return [p for p in found if p["contact"] == contact][-1]

    def reply(self, tenant: str, command: dict[str, Any]) -> dict[str, Any]:
        """The `contact.replied` data answering `command`."""
        def answered(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [r for r in found if r["request"] == command["id"]]

        return answered(self.wait(envelope.CONTACTS_REPLIES, tenant, "contact.replied", answered))[0]

    def membership(self, tenant: str, message: str, contact: str, predicate: Callable[[dict[str, Any]], Any]) -> list[dict[str, Any]]:
        """Every `segment.member` data of (message, contact), once the newest satisfies `predicate`."""
        def of_pair(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [m for m in found if (m["message"], m["contact"]) == (message, contact)]

        return of_pair(self.wait(envelope.SEGMENTS_MEMBERS, tenant, "segment.member", lambda f: of_pair(f) and predicate(of_pair(f)[-1])))

    def rejections(self, tenant: str, predicate: Callable[[list[dict[str, Any]]], Any]) -> list[dict[str, Any]]:
        """The segments stage's `record.rejected` data for the tenant, once `predicate` holds for them."""
        def by_segments(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [e["data"] for e in found if e["source"] == "/usher/segments"]

        deadline = time.monotonic() + 30
        while True:
            found = by_segments(self.kafka.events(envelope.DEAD_LETTERS, tenant, "record.rejected"))
            if predicate(found):
                return found
            assert time.monotonic() < deadline, f"timed out waiting for the segments stage's rejections; found {found}"
            time.sleep(0.2)


@pytest.fixture
def segments(usher: WorkerProcess, kafka: Kafka) -> SegmentsDriver:
    return SegmentsDriver(kafka, usher)
