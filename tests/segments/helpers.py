"""Builders for segments-stage tests, and a stand-in for its agents that routes records by key."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from workers import envelope, schemas
from workers.segments import family, profiles, rules

SETTINGS = {"default_language": "en", "friends_family_channels": ["web"]}
FIELDS = {
    "diet": {
        "id": "diet",
        "type": "dropdown",
        "label": {"en": "Diet"},
        "choices": ["vegan", "vegetarian"],
        "select": {"mode": "single"},
        "show_in": ["checkout", "profile"],
    },
    "newsletter_source": {"id": "newsletter_source", "type": "text", "label": {"en": "Source"}},
}
FILTERS = {
    "audience": {"id": "audience", "name": "Audience", "applies_to": "buyer", "items": [{"id": "vip", "name": "VIP"}]}
}

_counter = iter(range(1, 1_000_000))


def ev(
    type_: str, data: dict[str, Any], *, tenant: str = "t1", time: str = "2026-11-01T10:00:00Z", id_: str | None = None
) -> dict[str, Any]:
    return envelope.make_event(type_, tenant, data, source="/tests", id_=id_ or f"evt-{next(_counter)}", time=time)


def order(
    contact: str = "c-1",
    order_id: str = "o-1",
    *,
    event: str = "ev-1",
    tenant: str = "t1",
    time: str = "2026-11-01T10:00:00Z",
    email: str | None = "ann@example.com",
    first_name: str | None = "Ann",
    last_name: str | None = "Peeters",
    phone: str | None = "+32470000000",
    language: str | None = "nl",
    products: list[str] | None = None,
    tickets: list[dict[str, str]] | None = None,
    fields: dict[str, Any] | None = None,
) -> dict[str, Any]:
    data = {
        "order": order_id,
        "event": event,
        "channel": "web",
        "contact": {
            "id": contact,
            "email": email,
            "first_name": first_name,
            "last_name": last_name,
            "phone": phone,
            "language": language,
        },
        "tickets": tickets if tickets is not None else [{"type": "adult", "price_rank": "A", "row": "5", "seat": "12"}],
        "products": products or [],
    }
    if fields is not None:
        data["fields"] = fields
    return ev("order.placed", data, tenant=tenant, time=time)


def assert_contract(outs: list[envelope.Out]) -> None:
    """Every record for another stage or upstream fits the contract's schema of its type."""
    for out in outs:
        if out.topic not in (profiles.FANOUT, profiles.BY_EMAIL):
            assert schemas.problem(out.event) is None, schemas.problem(out.event)


def of_topic(outs: list[envelope.Out], topic: str) -> list[envelope.Out]:
    return [out for out in outs if out.topic == topic]


class Stage:
    """The segments stage's keyed state in dicts, fed the way its agents will feed it: every
    record produced on an internal topic is handled under its key, like a repartitioned stream."""

    def __init__(self) -> None:
        self.contacts: dict[str, Any] = {}
        self.emails: dict[str, Any] = {}
        self.produced: defaultdict[str, list[envelope.Out]] = defaultdict(list)
        self.rejections: list[str] = []

    def send(self, record_key: str, event: dict[str, Any]) -> None:
        pending = [(record_key, event)]
        while pending:
            record_key, event = pending.pop(0)
            if event["type"] == "contact.filter":
                outcome = profiles.fan_out_filter(event, FILTERS)
            elif event["type"] in rules.CONTACT_TYPES:
                outcome = rules.apply_contact_record(
                    self.contacts.get(record_key), event, settings=SETTINGS, fields_config=FIELDS
                )
                self.contacts[record_key] = outcome.state
            else:
                outcome = family.apply_email_index(self.emails.get(record_key), event)
                self.emails[record_key] = outcome.state
            self.rejections += outcome.rejections
            assert_contract(outcome.outs)
            for out in outcome.outs:
                if out.topic in (profiles.FANOUT, profiles.BY_EMAIL):
                    pending.append((out.key, out.event))
                else:
                    self.produced[out.topic].append(out)

    def place(self, order_event: dict[str, Any]) -> None:
        self.send(envelope.contact_key(order_event["tenant"], order_event["data"]["contact"]["id"]), order_event)

    def command(
        self, type_: str, data: dict[str, Any], *, tenant: str = "t1", id_: str | None = None
    ) -> dict[str, Any]:
        event = ev(type_, data, tenant=tenant, id_=id_)
        self.send(envelope.contact_key(tenant, data["contact"]), event)
        return event

    def profile(self, tenant: str, contact: str) -> dict[str, Any]:
        return self.contacts[envelope.contact_key(tenant, contact)]["profile"]

    def replies(self) -> list[dict[str, Any]]:
        return [out.event["data"] for out in self.produced[envelope.CONTACTS_REPLIES]]
