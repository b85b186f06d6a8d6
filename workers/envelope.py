"""CloudEvents envelopes, record keys and the records a stage emits.

Every stage's pure rules take CloudEvent dicts in and return `Out` records; the
agents around them only move bytes. Keeping this in one place keeps the
contract's spelling in one place too.
"""
from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any, ClassVar

import orjson

SPECVERSION = "1.0"
ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# Topics of the contract (../shared/CONTRACT.md); nothing else spells them.
CONFIG = "ticketing.config"
EVENTS = "ticketing.events"
MESSAGES = "ticketing.messages"
CHECKOUTS = "ticketing.checkouts"
ORDERS = "ticketing.orders"
COMMANDS = "ticketing.commands"
CALLBACKS = "provider.callbacks"
PROMPTS = "checkout.prompts"
CONSENT_STATE = "consent.state"
CONSENT_LOG = "consent.log"
CONTACTS_STATE = "contacts.state"
CONTACTS_REPLIES = "contacts.replies"
SEGMENTS_MEMBERS = "segments.members"
OUTBOX = "messages.outbox"
DELIVERIES = "messages.deliveries"
DEAD_LETTERS = "usher.dead-letters"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def clock(offset_s: float = 0.0) -> Callable[[], datetime]:
    """A stage's "now": the wall clock, shifted by `offset_s` (`USHER_CLOCK_OFFSET_S`, so tests
    can see days of reminders and send windows pass; 0 in production)."""
    offset = timedelta(seconds=offset_s)
    return lambda: utcnow() + offset


def isotime(moment: datetime | None = None) -> str:
    """RFC 3339 in UTC with a `Z`, the form every Usher record carries."""
    moment = (moment or utcnow()).astimezone(timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@lru_cache(maxsize=16384)
def isotime_of(moment: datetime) -> str:
    """`isotime(moment)`, remembered: a batch writes its moment and a contact's marks many times."""
    return isotime(moment)


@lru_cache(maxsize=16384)  # a contact's marks and an input's time are read repeatedly
def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def make_event(
    type_: str,
    tenant: str,
    data: dict[str, Any],
    *,
    source: str,
    id_: str | None = None,
    time: str | None = None,
) -> dict[str, Any]:
    """A CloudEvent in structured mode. Pass `id_` when the event must be
    reproducible (a redelivered input yields the same output id, so the next
    stage's dedupe drops the repeat)."""
    return {
        "specversion": SPECVERSION,
        "id": id_ or os.urandom(16).hex(),  # as unique as uuid4, at a fifth of the cost
        "source": source,
        "type": type_,
        "time": time or isotime(),
        "tenant": tenant,
        "datacontenttype": "application/json",
        "data": data,
    }


_URL_NAMESPACE = uuid.NAMESPACE_URL.bytes


def stable_id(name: str) -> str:
    """`str(uuid.uuid5(uuid.NAMESPACE_URL, name))`, without building UUID objects (a third of
    the cost; stages make several ids a record). The same name always gives the same id."""
    h = hashlib.sha1(_URL_NAMESPACE + name.encode()).hexdigest()
    # Version 5 in the 13th hex digit; the RFC 4122 variant (binary 10..) in the 17th.
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT_DIGITS[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


_VARIANT_DIGITS = "89ab"


def derived_id(event: Mapping[str, Any], suffix: str) -> str:
    """A deterministic id for something caused by `event` (same input, same id)."""
    return stable_id(f"{event['tenant']}|{event['source']}|{event['id']}|{suffix}")


def key(*parts: str) -> str:
    return "/".join(parts)


def contact_key(tenant: str, contact: str) -> str:
    return key(tenant, contact)


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs more, and stages make several a record
class Out:
    """One record a stage wants produced. `event` None is a tombstone."""

    topic: str
    key: str
    event: dict[str, Any] | None
    # A table's changelog record: the edge produces it only once the batch's other records are in.
    table_change: ClassVar[bool] = False

    def value_bytes(self) -> bytes | None:
        return None if self.event is None else orjson.dumps(self.event)


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def loads(raw: bytes | str) -> Any:
    return orjson.loads(raw)
