"""Inputs for the messages stage's tests, shaped as the consent and segments stages write them."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from workers.consent.rules import Links
from workers.envelope import make_event

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
LINKS = Links(secret="test-secret", base_url="https://usher.test")
SETTINGS = {
    "default_language": "en",
    "languages": ["en", "nl"],
    "sender": {"email": "tickets@venue.example", "name": "Venue"},
    "sms_sender": "VENUE",
}
EVENT = {
    "event": "ev-1",
    "name": "Hamlet",
    "starts_at": "2026-12-01T19:30:00+01:00",
    "ends_at": "2026-12-01T22:00:00+01:00",
    "timezone": "Europe/Brussels",
}


def message_requested(
    *,
    kind: str = "event-message",
    channel: str = "email",
    to: dict[str, str] | None = None,
    contact: str = "c-42",
    request: str = "req-1",
    message: str | None = "msg-1",
    layout: str | None = None,
    language: str = "en",
    tenant: str = "t1",
    **request_vars: Any,
) -> dict[str, Any]:
    """A `message.requested`; an event message carries what the segments stage puts in `vars`."""
    if kind == "event-message":
        request_vars = {
            "custom_text": "Doors open at 19:00",
            "first_name": "Ann",
            "last_name": "Peeters",
            "event": EVENT,
            "orders": ["o-1", "o-2"],
            "marketing": True,
        } | request_vars
    data = {
        "request": request,
        "kind": kind,
        "message": message if kind in ("event-message", "test") else None,
        "contact": contact,
        "channel": channel,
        "to": to if to is not None else {"email": "ann@example.com", "phone": "+32470000000"},
        "layout": layout or kind,
        "language": language,
        "vars": request_vars,
    }
    return make_event("message.requested", tenant, data, source="/usher/segments", id_=request, time="2026-11-30T12:00:00Z")
