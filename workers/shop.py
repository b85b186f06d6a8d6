"""A simulated ticket shop for a sample venue, publishing what upstream systems do.

Used by `usher demo` and the benchmark. Everything is deterministic for a
given seed, so a run can be repeated.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from workers import envelope
from workers.envelope import Out, isotime, make_event

SOURCE = "/shop/demo"
FIRST_NAMES = ["Ann", "Bram", "Charlotte", "Dirk", "Eva", "Femke", "Gert", "Hanne", "Ines", "Jonas", "Kari", "Lukas"]
LAST_NAMES = ["Peeters", "Janssens", "Maes", "Jacobs", "Hansen", "Berg", "Schmidt", "Weber", "Dubois", "Claes"]
LANGUAGES = ["en", "nl", "de", "no"]


class Shop:
    def __init__(self, tenant: str = "demo-venue", *, seed: int = 7, contacts: int = 200, start: datetime | None = None) -> None:
        self.tenant = tenant
        self.random = random.Random(seed)
        self.contacts = contacts
        self.start = start or envelope.utcnow()
        self.orders = 0
        self.checkouts = 0

    def _event(self, type_: str, data: dict[str, Any]) -> dict[str, Any]:
        return make_event(type_, self.tenant, data, source=SOURCE)

    def _config(self, kind: str, id_: str, type_: str, data: dict[str, Any]) -> Out:
        return Out(envelope.CONFIG, envelope.key(self.tenant, kind, id_), self._event(type_, data))

    def setup(self, public_url: str | None = None) -> list[Out]:
        """Venue settings, opt-ins, a custom field, a filter, an event and its two messages."""
        starts = self.start + timedelta(minutes=2)
        settings: dict[str, Any] = {
            "double_opt_in": True,
            "doi_optins": ["newsletter"],
            "doi_reminder_every_days": 3,
            "doi_max_reminders": 2,
            "doi_expire_after_days": 14,
            "default_language": "en",
            "languages": LANGUAGES,
            "login_required_for_purchase": False,
            "friends_family_channels": ["web"],
            "sender": {"email": "tickets@venue.example", "name": "Grand Venue"},
            "sms_sender": "VENUE",
        }
        if public_url:
            settings["public_url"] = public_url
        text = {
            "newsletter": {"en": "Send me the newsletter", "nl": "Stuur mij de nieuwsbrief", "de": "Schickt mir den Newsletter", "no": "Send meg nyhetsbrevet"},
            "sms-alerts": {"en": "Text me about my events", "nl": "Stuur mij sms'jes over mijn voorstellingen", "de": "SMS zu meinen Veranstaltungen", "no": "Send meg SMS om arrangementene mine"},
        }
        return [
            self._config("settings", "default", "config.settings", settings),
            self._config("optin", "newsletter", "config.optin", {"id": "newsletter", "kind": "optional", "purpose": "email", "text": text["newsletter"], "version": 3, "channels": ["web", "box-office"], "active": True}),
            self._config("optin", "sms-alerts", "config.optin", {"id": "sms-alerts", "kind": "mandatory", "purpose": "sms", "text": text["sms-alerts"], "version": 1, "channels": ["web"], "active": True}),
            self._config("optin-set", "default", "config.optin-set", {"id": "default", "optins": ["newsletter", "sms-alerts"], "default": True}),
            self._config("custom-field", "diet", "config.custom-field", {"id": "diet", "type": "dropdown", "label": {"en": "Diet", "nl": "Dieet"}, "choices": ["vegan", "vegetarian", "none"], "select": {"mode": "single"}, "required": False, "show_in": ["checkout", "profile"]}),
            self._config("filter", "audience", "config.filter", {"id": "audience", "name": "Audience", "applies_to": "buyer", "items": [{"id": "vip", "name": "VIP", "color": "#c0392b"}]}),
            Out(envelope.EVENTS, envelope.key(self.tenant, "ev-hamlet"), self._event("event.scheduled", {
                "event": "ev-hamlet", "name": "Hamlet", "starts_at": isotime(starts), "ends_at": isotime(starts + timedelta(hours=3)),
                "timezone": "Europe/Brussels", "optin_set": None, "products": [{"id": "parking", "name": "Parking"}]})),
            Out(envelope.MESSAGES, envelope.key(self.tenant, "msg-doors"), self._event("message.defined", {
                "message": "msg-doors", "event": "ev-hamlet", "channel": "email", "layout": "event-message",
                "custom_text": "Doors open 30 minutes before the show. Parking P2 is reserved for you.",
                "audience": {"type": "with_product", "products": ["parking"]},
                "consent": {"mode": "ignore"}, "language": {"only": None, "send_in": "customer"},
                # a minute before the start: fires while the demo runs
                "send": {"when": "before_start", "hours": 1 / 60}})),
            Out(envelope.MESSAGES, envelope.key(self.tenant, "msg-news"), self._event("message.defined", {
                "message": "msg-news", "event": "ev-hamlet", "channel": "email", "layout": "event-message",
                "custom_text": "Our new season is out: members book first.",
                "audience": {"type": "all"}, "consent": {"mode": "select", "include": ["newsletter"], "exclude": []},
                "language": {"only": None, "send_in": "customer"}, "send": {"when": "now"}})),
        ]

    def contact(self, number: int) -> dict[str, Any]:
        rng = random.Random(number)
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        return {
            "id": f"c-{number}",
            "email": f"{first.lower()}.{last.lower()}.{number}@example.com",
            "first_name": first,
            "last_name": last,
            "phone": f"+3247{number:07d}",
            "language": rng.choice(LANGUAGES),
        }

    def checkout(self) -> Out:
        self.checkouts += 1
        anonymous = self.random.random() < 0.2
        contact = None if anonymous else f"c-{self.random.randrange(self.contacts)}"
        checkout_id = f"co-{self.checkouts}"
        key = envelope.key(self.tenant, f"~{checkout_id}" if contact is None else contact)
        return Out(envelope.CHECKOUTS, key, self._event("checkout.started", {
            "checkout": checkout_id, "event": "ev-hamlet", "channel": "web", "contact": contact,
            "language": self.random.choice(LANGUAGES)}))

    def order(self) -> Out:
        self.orders += 1
        contact = self.contact(self.random.randrange(self.contacts))
        tickets = [{"type": self.random.choice(["adult", "child", "senior"]), "price_rank": self.random.choice("AB"),
                    "row": str(self.random.randint(1, 20)), "seat": str(self.random.randint(1, 30))}
                   for _ in range(self.random.randint(1, 4))]
        optins = [
            {"optin": "newsletter", "answer": self.random.random() < 0.6, "prechecked": True, "text_shown": "Send me the newsletter", "version": 3},
            {"optin": "sms-alerts", "answer": self.random.random() < 0.4, "prechecked": False, "text_shown": "Text me about my events", "version": 1},
        ]
        return Out(envelope.ORDERS, envelope.key(self.tenant, contact["id"]), self._event("order.placed", {
            "order": f"o-{self.orders}", "event": "ev-hamlet", "channel": "web", "ip": "203.0.113.7",
            "user_agent": "Mozilla/5.0 (demo)", "contact": contact, "tickets": tickets,
            "products": ["parking"] if self.random.random() < 0.3 else [], "optins": optins,
            "fields": {"diet": [self.random.choice(["vegan", "vegetarian", "none"])]}}))

    def revoke(self) -> Out:
        contact = f"c-{self.random.randrange(self.contacts)}"
        return Out(envelope.COMMANDS, envelope.key(self.tenant, contact), self._event("consent.revoke", {
            "contact": contact, "optin": "newsletter", "channel": "portal", "ip": "198.51.100.4", "user_agent": "Mozilla/5.0 (demo)"}))

    def bad_records(self) -> list[tuple[str, str, bytes]]:
        """What a buggy upstream might send: each must land in the dead letters, nothing else."""
        broken_order = self.order().event
        assert broken_order is not None
        broken_order["data"]["contact"].pop("id")
        return [
            (envelope.ORDERS, envelope.key(self.tenant, "c-0"), b"\x00garbage, not JSON"),
            (envelope.ORDERS, envelope.key(self.tenant, "c-0"), envelope.dumps(self._event("order.shipped", {"order": "o-x"}))),
            (envelope.ORDERS, envelope.key(self.tenant, "c-0"), envelope.dumps(broken_order)),
        ]

    def traffic(self) -> Iterator[Out]:
        """An endless mix of checkouts, orders and the odd revocation."""
        while True:
            roll = self.random.random()
            if roll < 0.45:
                yield self.checkout()
            elif roll < 0.95:
                yield self.order()
            else:
                yield self.revoke()
