"""Event messages: who is in a message's segment, and when each member is sent the message.

A message (`message.defined`) targets the buyers of one event. Membership is judged per
(message, contact) over the contact's live (not cancelled) orders for that event, as the contract's
`segment.member` rules say, and kept as a `SegmentEntry` per `{tenant}/{message}/{contact}` (the
key of its `segments.members` record): `{"member": bool, "orders": [order ids], "language": str,
"requested": <request id of the event-message sent, or None>}`. A `segment.member` record goes out
only when membership, orders or language change; a contact who never was a member has no entry.

Functions take the latest record of the message's key on `ticketing.messages` and of the event's
key on `ticketing.events` (`message_record`, `event_record`), so a cancellation is seen by its type.

Choices where the contract is silent:
- Consent `all` with no opt-in in the event's set (nor a default set) admits nobody: a marketing
  send with no consent to check is the wrong way to fail.
- `selection`: names and filters are criteria on the contact (a listed name equals the first,
  last or full name, case- and accent-insensitively; any listed `filter:item` on the profile);
  ticket types, price ranks, rows and seats on the ticket; `audience.products`, when given, on the
  ticket's order. A contact without a language has the tenant's default language.
- Sending: each member is sent the message once, inside the send window, whenever they are a member
  there. The window opens at `send_at` and closes, for `before_start`, when the event starts (late
  buyers still get the practical information they need); for `now`, when the event ends; for
  `after_end`, `AFTER_END_WINDOW` after it opened (a "thank you" weeks late is worse than none).
  A window always stays open at least `DISPATCH_GRACE` (the document's "within 15 minutes"), so a
  message defined close to its send time still goes out.
- A message updated after it fired is not sent again to a member who got it (the request id is
  derived from tenant, message and contact, so even a repeated decision is one request downstream).
  A cancelled message or event sends nothing more and freezes its segment.
- A member without an address for the message's channel (e-mail, or phone for SMS) is not sent
  the message (a request needs one); they are once they have one, while the window is open.
- `vars.marketing` is true when the message filters on consent (`all`, `select`): those are
  marketing mails and get an unsubscribe link downstream; `ignore` is service information to
  every ticket holder.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from workers.envelope import (
    OUTBOX,
    SEGMENTS_MEMBERS,
    Out,
    contact_key,
    isotime,
    key,
    make_event,
    parse_time,
    stable_id,
)
from workers.segments.profiles import SOURCE, Outcome, caused, fold

AFTER_END_WINDOW = timedelta(days=1)
DISPATCH_GRACE = timedelta(minutes=15)
# Selection criterion -> the ticket attribute it matches.
TICKET_CRITERIA = {"ticket_types": "type", "price_ranks": "price_rank", "rows": "row", "seats": "seat"}
# Message channel -> the profile detail it is sent to.
CHANNEL_ADDRESS = {"email": "email", "sms": "phone"}

SegmentEntry = dict[str, Any]


def event_optins(event: Mapping[str, Any] | None, optin_sets: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The opt-ins of the event's set, else of the tenant's default set (also when the event's set
    does not exist), else none. `optin_sets` maps set id to `config.optin-set` data."""
    chosen = optin_sets.get((event or {}).get("optin_set") or "")
    if chosen is None:
        chosen = next((data for data in optin_sets.values() if data.get("default")), None)
    return list(chosen["optins"]) if chosen else []


def _contact_selected(selection: Mapping[str, Any], profile: Mapping[str, Any]) -> bool:
    names = selection.get("names") or []
    known = {
        fold(profile["first_name"]),
        fold(profile["last_name"]),
        fold(f"{profile['first_name'] or ''} {profile['last_name'] or ''}"),
    }
    if names and not {fold(name) for name in names} & (known - {""}):
        return False
    filters = selection.get("filters") or []
    return not filters or bool(set(filters) & set(profile["filters"]))


def _ticket_selected(selection: Mapping[str, Any], ticket: Mapping[str, Any]) -> bool:
    return all(
        str(ticket.get(attribute)) in map(str, selection[criterion])
        for criterion, attribute in TICKET_CRITERIA.items()
        if selection.get(criterion)
    )


def _audience_orders(
    audience: Mapping[str, Any], profile: Mapping[str, Any], orders: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The live orders that put the contact in the audience (none: not in it)."""
    listed = set(audience.get("products") or [])
    kind = audience["type"]
    if kind == "all":
        return orders
    if kind == "with_product":
        return [order for order in orders if listed & set(order["products"])]
    if kind == "without_product":
        return [] if any(listed & set(order["products"]) for order in orders) else orders
    selection = audience.get("selection") or {}
    if not _contact_selected(selection, profile):
        return []
    return [
        order
        for order in orders
        if (not listed or listed & set(order["products"]))
        and any(_ticket_selected(selection, t) for t in order["tickets"])
    ]


def _consent_allows(consent: Mapping[str, Any], consents: Mapping[str, Any] | None, optins: list[str]) -> bool:
    opted_in = {
        optin for optin, status in ((consents or {}).get("optins") or {}).items() if status["status"] == "opted_in"
    }
    mode = consent["mode"]
    if mode == "ignore":
        return True
    if mode == "all":
        return bool(optins) and set(optins) <= opted_in
    return set(consent.get("include") or []) <= opted_in and not set(consent.get("exclude") or []) & opted_in


def member(
    message: Mapping[str, Any],
    event: Mapping[str, Any] | None,
    profile: Mapping[str, Any],
    consents: Mapping[str, Any] | None,
    optin_sets: Mapping[str, Mapping[str, Any]],
    default_language: str,
) -> tuple[bool, list[str], str]:
    """Whether the contact is in the message's segment, through which orders, and the language to
    write to them in. `message` is `message.defined` data, `event` the `event.scheduled` data (None
    while unknown: the default set applies), `consents` the contact's `consent.status` data."""
    language = profile["language"] or default_language
    wanted = message.get("language") or {}
    only = wanted.get("only")
    send_in = wanted.get("send_in") or "customer"
    orders = [order for order in profile["orders"] if order["event"] == message["event"] and not order["cancelled"]]
    chosen = _audience_orders(message["audience"], profile, orders)
    is_member = (
        bool(chosen)
        and _consent_allows(message["consent"], consents, event_optins(event, optin_sets))
        and (not only or language in only)
    )
    return (
        is_member,
        [order["order"] for order in chosen] if is_member else [],
        language if send_in == "customer" else send_in,
    )


def live(message_record: Mapping[str, Any], event_record: Mapping[str, Any] | None) -> bool:
    """Neither the message nor its event (None: not known yet) is cancelled."""
    return message_record["type"] == "message.defined" and (
        event_record is None or event_record["type"] == "event.scheduled"
    )


def update_membership(
    entry: SegmentEntry | None,
    *,
    message_record: Mapping[str, Any],
    event_record: Mapping[str, Any] | None,
    profile: Mapping[str, Any],
    consents: Mapping[str, Any] | None,
    optin_sets: Mapping[str, Mapping[str, Any]],
    default_language: str,
    cause: Mapping[str, Any],
) -> Outcome:
    """Re-judge one (message, contact) after `cause` (the record that changed the profile, the
    consents, the message or the event); emits `segment.member` when the judgement changed."""
    if not live(message_record, event_record):
        return Outcome(entry)
    message = message_record["data"]
    event = event_record["data"] if event_record else None
    is_member, orders, language = member(message, event, profile, consents, optin_sets, default_language)
    was_member = bool(entry and entry["member"])
    judged = {"member": is_member, "orders": orders, "language": language}
    if not (is_member or was_member) or (entry and {name: entry[name] for name in judged} == judged):
        return Outcome(entry)
    tenant, message_id, contact = cause["tenant"], message["message"], profile["contact"]
    data = {"message": message_id, "contact": contact, **judged}
    record = caused("segment.member", cause, data, f"member/{message_id}/{contact}")
    return Outcome(
        {**judged, "requested": (entry or {}).get("requested")},
        [Out(SEGMENTS_MEMBERS, key(tenant, message_id, contact), record)],
    )


def send_at(message: Mapping[str, Any], event: Mapping[str, Any], defined_at: datetime) -> datetime:
    """When a message goes out: hours before the event starts, hours after it ends, or (`now`) at
    `defined_at`, the time of its `message.defined` record."""
    send = message["send"]
    hours = timedelta(hours=send.get("hours") or 0)
    if send["when"] == "before_start":
        return parse_time(event["starts_at"]) - hours
    if send["when"] == "after_end":
        return parse_time(event["ends_at"]) + hours
    return defined_at


def send_window(
    message: Mapping[str, Any], event: Mapping[str, Any], defined_at: datetime
) -> tuple[datetime, datetime]:
    """[opens, closes): the time in which a member is sent the message."""
    opens = send_at(message, event, defined_at)
    when = message["send"]["when"]
    if when == "before_start":
        closes = parse_time(event["starts_at"])
    elif when == "after_end":
        closes = opens + AFTER_END_WINDOW
    else:
        closes = parse_time(event["ends_at"])
    return opens, max(closes, opens + DISPATCH_GRACE)


def event_message_request_id(tenant: str, message: str, contact: str) -> str:
    """The one request id a contact's copy of a message ever has."""
    return stable_id(f"usher:event-message:{tenant}/{message}/{contact}")


def due_request(
    entry: SegmentEntry | None,
    *,
    message_record: Mapping[str, Any],
    event_record: Mapping[str, Any] | None,
    profile: Mapping[str, Any],
    now: datetime,
) -> Outcome:
    """At `now`, the `message.requested` (kind `event-message`) for a member not yet sent the
    message, when the send window is open and neither message nor event is cancelled. Call it from a
    timer for the entries of every message whose window is open, and after each change to an entry
    or its contact's profile (a late buyer, a phone number added)."""
    if not (
        entry and entry["member"] and not entry["requested"] and event_record and live(message_record, event_record)
    ):
        return Outcome(entry)
    message, event = message_record["data"], event_record["data"]
    opens, closes = send_window(message, event, parse_time(message_record["time"]))
    if not opens <= now < closes or not profile[CHANNEL_ADDRESS[message["channel"]]]:
        return Outcome(entry)
    tenant, contact = message_record["tenant"], profile["contact"]
    request = event_message_request_id(tenant, message["message"], contact)
    data = {
        "request": request,
        "kind": "event-message",
        "message": message["message"],
        "contact": contact,
        "channel": message["channel"],
        "to": {name: profile[name] for name in CHANNEL_ADDRESS.values() if profile[name]},
        "layout": message["layout"],
        "language": entry["language"],
        "vars": {
            "custom_text": message.get("custom_text") or "",
            "first_name": profile["first_name"],
            "last_name": profile["last_name"],
            "event": {name: event.get(name) for name in ("event", "name", "starts_at", "ends_at", "timezone")},
            "orders": entry["orders"],
            "marketing": message["consent"]["mode"] != "ignore",
        },
    }
    record = make_event("message.requested", tenant, data, source=SOURCE, id_=request, time=isotime(now))
    return Outcome(entry | {"requested": request}, [Out(OUTBOX, contact_key(tenant, contact), record)])
