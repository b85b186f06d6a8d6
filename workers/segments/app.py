"""The segments stage's faust wiring: contact profiles, friends and family, segments and sending.

Where each piece of state lives, and why:
- `segments-contacts`, `segments-consents`, `segments-memberships` (tables keyed `{tenant}/{contact}`):
  the contact's `profiles.ContactState`, its latest `consent.status` data, and its
  `audience.SegmentEntry` per message id. One agent consumes every topic keyed by contact (orders,
  commands, `consent.state`, this stage's fan-out topic): they are co-partitioned, so all of a
  contact's records meet its state on one worker, one at a time, and membership is judged where
  the profile and the consents are.
- `segments-emails` (table keyed `{tenant}/{email}`): the friends-and-family e-mail index, kept by
  the agent on `usher.segments.by-email`.
- Configuration, events and messages are read whole by every worker into memory (`Reference`).
- `Local`: in-memory indexes over the contacts of this worker's active partitions, rebuilt from the
  tables after every rebalance: who bought for which event, each message's members, and members
  waiting for their message's send window to open.

Judging: a contact's memberships are judged again whenever its profile or consents change. When a
message changes (or its event, or the tenant's opt-in sets or settings), the clock sends every
contact of the message's event on this worker a `segments.judge` record on the fan-out topic, so the
change is made by the agent, in order with the contact's other records. When a send window opens,
each waiting member gets one too, which sends the message (`audience.due_request`: its request id
is derived from tenant, message and contact, so a repeated decision is still one request). What
changed while the stage was down is not known, so at start-up every message read is judged again,
except those whose send window has closed.

HTTP: a contact's profile is answered by the worker active for its partition (another worker passes
the request on). The export and a message's recipients span every partition: the worker asked adds
each other worker's part, asked for with `X-Usher-Part: local`.
"""
from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import faust
from faust.types import EventT
from faust.web import Request, Response, View
from yarl import URL

from workers import envelope, web
from workers.edge import Accepted, produce, rejection
from workers.fields import MESSAGE_FALLBACK_LANGUAGE, shown_in
from workers.owners import Owners, active_partitions, not_settled
from workers.segments import audience, family, profiles, rules
from workers.stage import StageContext
from workers.tables import ContactTable

JUDGE = "segments.judge"
CLOCK_SOURCE = "/usher/segments/clock"
# How often the clock looks for changed messages and opened send windows.
TICK_EVERY_S = 2.0
# Records the contact agent takes; other types on its topics belong to other stages.
CONTACT_RECORDS = rules.CONTACT_TYPES | {"consent.status", JUDGE}
# Configuration kinds this stage keeps, and those that can change who is in a segment.
CONFIG_KINDS = ("settings", "custom-field", "filter", "optin-set")
AUDIENCE_CONFIG_KINDS = ("settings", "optin-set")
# A worker's request to another for the part of an answer that worker's partitions hold.
PART_HEADER = "X-Usher-Part"
PART_TIMEOUT = aiohttp.ClientTimeout(total=30)

Record = dict[str, Any]


@dataclass
class Tenant:
    settings: dict[str, Any] | None = None
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)
    filters: dict[str, dict[str, Any]] = field(default_factory=dict)
    optin_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The latest record of each event and message id (cancellations included).
    events: dict[str, Record] = field(default_factory=dict)
    messages: dict[str, Record] = field(default_factory=dict)
    messages_of_event: defaultdict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    @property
    def default_language(self) -> str:
        return (self.settings or {}).get("default_language") or MESSAGE_FALLBACK_LANGUAGE

    def message_and_event(self, message: str) -> tuple[Record | None, Record | None]:
        record = self.messages.get(message)
        event = record["data"].get("event") if record else None
        return record, self.events.get(event) if event else None

    def window(self, message: str) -> tuple[datetime, datetime] | None:
        """When the message goes out; None while it cannot (cancelled, or its event not known)."""
        record, event = self.message_and_event(message)
        if record is None or event is None or not audience.live(record, event):
            return None
        return audience.send_window(record["data"], event["data"], envelope.parse_time(record["time"]))


class Reference:
    """Configuration, events and messages per tenant, and the messages whose segments must be
    judged again since the clock last looked."""

    def __init__(self) -> None:
        self.tenants: dict[str, Tenant] = defaultdict(Tenant)
        # (tenant, message) -> whether every change to it was read while catching up at start-up.
        self.changed: dict[tuple[str, str], bool] = {}
        # Set once the feed has read what was there at start-up (the feed's own event, once it exists).
        self.caught_up = asyncio.Event()

    def tenant(self, tenant: str) -> Tenant:
        return self.tenants.get(tenant) or Tenant()

    def apply(self, topic: str, key: str, event: Record | None) -> str | None:
        tenant_id, _, rest = key.partition("/")
        if event is not None and event["tenant"] != tenant_id:
            return f"key {key!r} is not of tenant {event['tenant']!r}"
        tenant = self.tenants[tenant_id]
        if topic == envelope.CONFIG:
            return self._apply_config(tenant_id, tenant, rest, event)
        if topic == envelope.EVENTS:
            return self._apply_event(tenant_id, tenant, rest, event)
        return self._apply_message(tenant_id, tenant, rest, event)

    def _apply_config(self, tenant_id: str, tenant: Tenant, kind_and_id: str, event: Record | None) -> str | None:
        kind, _, id_ = kind_and_id.partition("/")
        if kind not in CONFIG_KINDS:
            return None
        if event is not None:
            expected = (event["type"].removeprefix("config."), event["data"].get("id", id_))
            if (kind, id_) != expected:
                return f"key {tenant_id}/{kind_and_id} is not {tenant_id}/{'/'.join(expected)}"
        if kind == "settings":
            tenant.settings = event and event["data"]
        else:
            kept = {"custom-field": tenant.fields, "filter": tenant.filters, "optin-set": tenant.optin_sets}[kind]
            if event is None:
                kept.pop(id_, None)
            else:
                kept[id_] = event["data"]
        if kind in AUDIENCE_CONFIG_KINDS:
            self._mark(tenant_id, tenant.messages)
        return None

    def _apply_event(self, tenant_id: str, tenant: Tenant, event_id: str, event: Record | None) -> str | None:
        if event is not None and event["data"]["event"] != event_id:
            return f"key {tenant_id}/{event_id} is not {tenant_id}/{event['data']['event']}"
        if event is None:
            tenant.events.pop(event_id, None)
        else:
            tenant.events[event_id] = event
        self._mark(tenant_id, tenant.messages_of_event.get(event_id, ()))
        return None

    def _apply_message(self, tenant_id: str, tenant: Tenant, message: str, event: Record | None) -> str | None:
        if event is not None and event["data"]["message"] != message:
            return f"key {tenant_id}/{message} is not {tenant_id}/{event['data']['message']}"
        before = tenant.messages.get(message)
        if before is not None and "event" in before["data"]:
            tenant.messages_of_event[before["data"]["event"]].discard(message)
        if event is None:
            tenant.messages.pop(message, None)
            return None
        tenant.messages[message] = event
        if "event" in event["data"]:
            tenant.messages_of_event[event["data"]["event"]].add(message)
        self._mark(tenant_id, [message])
        return None

    def _mark(self, tenant_id: str, messages: Iterable[str]) -> None:
        for message in messages:
            key = (tenant_id, message)
            self.changed[key] = self.changed.get(key, True) and not self.caught_up.is_set()

    def take_changed(self) -> dict[tuple[str, str], bool]:
        changed, self.changed = self.changed, {}
        return changed


class Local:
    """Indexes over the contacts of this worker's active partitions."""

    def __init__(self) -> None:
        self.clear()
        self.stale = True

    def clear(self) -> None:
        self.buyers: defaultdict[tuple[str, str], set[str]] = defaultdict(set)  # (tenant, event) -> contacts
        self.members: defaultdict[tuple[str, str], dict[str, int]] = defaultdict(dict)  # (tenant, message) -> contact -> orders
        # (tenant, message) -> members not sent the message whose send window has not opened yet
        self.waiting: defaultdict[tuple[str, str], set[str]] = defaultdict(set)

    def note_profile(self, tenant: str, profile: Record) -> None:
        for order in profile["orders"]:
            self.buyers[(tenant, order["event"])].add(profile["contact"])

    def note_entry(self, tenant: str, contact: str, message: str, entry: audience.SegmentEntry | None, waiting: bool) -> None:
        if entry and entry["member"]:
            self.members[(tenant, message)][contact] = len(entry["orders"])
        elif contact in self.members.get((tenant, message), {}):
            del self.members[(tenant, message)][contact]
        if waiting:
            self.waiting[(tenant, message)].add(contact)
        elif contact in self.waiting.get((tenant, message), ()):
            self.waiting[(tenant, message)].discard(contact)


def profile_view(profile: Record, fields_config: profiles.Config) -> Record:
    """The profile as the contact's profile page shows it: only custom fields shown there."""
    shown = {f: v for f, v in profile["fields"].items() if f in fields_config and shown_in(fields_config[f], "profile")}
    return profile | {"fields": shown}


def named_contact(event: Record) -> str | None:
    """The contact a contact-keyed record names in its data (None: it names none)."""
    data = event["data"]
    match event["type"]:
        case "order.placed":
            return data["contact"]["id"]
        case family.LINK_RESOLVED:
            return data["requester"]
        case family.LINK_PARENT:
            return data["child"]
    return data.get("contact")


def judge_record(tenant: str, contact: str, message: str, moment: datetime) -> envelope.Out:
    data = {"contact": contact, "message": message}
    event = envelope.make_event(JUDGE, tenant, data, source=CLOCK_SOURCE, time=envelope.isotime(moment))
    return envelope.Out(profiles.FANOUT, envelope.contact_key(tenant, contact), event)


def register(app: faust.App, ctx: StageContext) -> None:
    now = envelope.clock(ctx.settings.clock_offset_s)
    reference = Reference()
    feed = ctx.feed([envelope.CONFIG, envelope.EVENTS, envelope.MESSAGES], reference.apply)
    reference.caught_up = feed.ready
    contacts = ContactTable(ctx.edge, f"{ctx.name}-contacts")
    consents = ContactTable(ctx.edge, f"{ctx.name}-consents")
    memberships = ContactTable(ctx.edge, f"{ctx.name}-memberships")
    emails = ContactTable(ctx.edge, f"{ctx.name}-emails")
    local = Local()
    owners = Owners(app, ctx.edge.waits)

    def rejected(item: Accepted, reasons: list[str]) -> list[envelope.Out]:
        # One dead letter per record: its id is the record's position, which readers dedupe on.
        return [ctx.edge.reject("; ".join(reasons), item)] if reasons else []

    def judge(item: Accepted, tenant: Tenant, messages: Iterable[str] | None = None) -> list[envelope.Out]:
        """Judge the contact's membership of `messages` (None: every message of its events and every
        message it has an entry for) after `item`, and send what is due."""
        profile = profiles.profile_of(contacts.get(item.key))
        if profile is None:
            return []
        entries = memberships.get(item.key) or {}
        if messages is None:
            events = {order["event"] for order in profile["orders"]}
            messages = set(entries).union(*(tenant.messages_of_event.get(event, ()) for event in events))
        consent = consents.get(item.key)
        moment = now()
        updated, outs = dict(entries), []
        for message in messages:
            message_record, event_record = tenant.message_and_event(message)
            if message_record is None:
                continue
            judged = audience.update_membership(
                entries.get(message), message_record=message_record, event_record=event_record, profile=profile,
                consents=consent, optin_sets=tenant.optin_sets, default_language=tenant.default_language, cause=item.event,
            )
            sent = audience.due_request(judged.state, message_record=message_record, event_record=event_record, profile=profile, now=moment)
            outs += judged.outs + sent.outs
            entry = sent.state
            if entry is not None:
                updated[message] = entry
            window = tenant.window(message)
            waiting = bool(entry and entry["member"] and not entry["requested"] and window and moment < window[0])
            local.note_entry(item.tenant, profile["contact"], message, entry, waiting)
        if updated != entries:
            outs.append(memberships.set(item.key, updated))
        return outs

    def handle_contact(item: Accepted) -> list[envelope.Out]:
        kind = item.event["type"]
        tenant = reference.tenant(item.tenant)
        if kind == "contact.filter":
            fanned = profiles.fan_out_filter(item.event, tenant.filters)
            return fanned.outs + rejected(item, fanned.rejections)
        if kind not in CONTACT_RECORDS:
            return []  # consent commands are the consent stage's
        tenant_id, _, contact = item.key.partition("/")
        named = named_contact(item.event)
        if tenant_id != item.tenant or not contact or named not in (None, contact):
            return [ctx.edge.reject(f"record key {item.key!r} is not {item.tenant}/{named or '<contact>'}", item)]
        if kind == "consent.status":
            return [consents.set(item.key, item.data), *judge(item, tenant)]
        if kind == JUDGE:
            return judge(item, tenant, [item.data["message"]])
        before = contacts.get(item.key)
        outcome = rules.apply_contact_record(before, item.event, settings=tenant.settings, fields_config=tenant.fields)
        outs = outcome.outs + rejected(item, outcome.rejections)
        if outcome.state == before:
            return outs
        outs.append(contacts.set(item.key, outcome.state))
        profile = profiles.profile_of(outcome.state)
        if profile != profiles.profile_of(before):
            local.note_profile(item.tenant, profile)
            outs += judge(item, tenant)
        return outs

    def tombstone(record: EventT) -> list[envelope.Out]:
        """A deleted contact on `consent.state` has no consents; elsewhere a tombstone is no record."""
        key = (record.message.key or b"").decode()
        if record.message.topic != envelope.CONSENT_STATE:
            return [rejection("tombstone", record, stage=ctx.name)]
        return [consents.delete(key)] if consents.get(key) is not None else []

    ctx.edge.subscribe(
        "contacts",
        [envelope.ORDERS, envelope.COMMANDS, envelope.CONSENT_STATE, profiles.FANOUT],
        on_record=handle_contact,
        on_tombstone=tombstone,
    )

    def handle_email(item: Accepted) -> list[envelope.Out]:
        expected = envelope.key(item.tenant, item.data["email"])
        if item.key != expected:
            return [ctx.edge.reject(f"record key {item.key!r} is not {expected!r}", item)]
        before = emails.get(item.key)
        outcome = family.apply_email_index(before, item.event)
        if outcome.state == before:
            return outcome.outs
        change = emails.delete(item.key) if outcome.state is None else emails.set(item.key, outcome.state)
        return [*outcome.outs, change]

    ctx.edge.subscribe("emails", [profiles.BY_EMAIL], on_record=handle_email)

    def held_here(keys: Iterable[str]) -> list[str]:
        """The keys of this worker's active partitions (the tables also hold standby copies)."""
        active = active_partitions(app, envelope.ORDERS)
        return [key for key in keys if app.consumer.key_partition(envelope.ORDERS, key.encode()) in active]

    @app.on_rebalance_complete.connect
    async def partitions_moved(sender: Any, **kwargs: Any) -> None:
        local.stale = True

    def refresh() -> None:
        if not local.stale:
            return
        local.clear()
        states, entries = dict(contacts.items()), dict(memberships.items())
        for key in held_here(states):
            local.note_profile(key.split("/", 1)[0], states[key]["profile"])
        for key in held_here(entries):
            tenant, contact = key.split("/", 1)
            for message, entry in entries[key].items():
                # Whether a window is open is the clock's to find out: it judges them again.
                local.note_entry(tenant, contact, message, entry, waiting=entry["member"] and not entry["requested"])
        local.stale = False

    def due_judgements(moment: datetime) -> set[tuple[str, str, str]]:
        """(tenant, contact, message) to judge again: contacts of changed messages, and members
        whose send window has opened."""
        due = set()
        for (tenant_id, message), at_start in reference.take_changed().items():
            tenant = reference.tenant(tenant_id)
            record, event = tenant.message_and_event(message)
            if record is None or not audience.live(record, event):
                continue  # a cancelled message's segment stays as it was
            window = tenant.window(message)
            if at_start and window is not None and moment >= window[1]:
                continue
            concerned = local.buyers.get((tenant_id, record["data"]["event"]), set()) | set(local.members.get((tenant_id, message), {}))
            due.update((tenant_id, contact, message) for contact in concerned)
        for (tenant_id, message), waiting in list(local.waiting.items()):
            window = reference.tenant(tenant_id).window(message)
            if window is None or moment >= window[0]:
                if window is not None and moment < window[1]:
                    due.update((tenant_id, contact, message) for contact in waiting)
                del local.waiting[(tenant_id, message)]
        return due

    @app.timer(TICK_EVERY_S)
    async def segments_clock() -> None:
        if not owners.settled():
            return
        refresh()
        moment = now()
        outs = [judge_record(tenant, contact, message, moment) for tenant, contact, message in due_judgements(moment)]
        await produce(app, outs, ctx.name)

    async def other_parts(request: Request) -> list[bytes]:
        """The same GET answered by every other worker of the stage for its own partitions."""
        if request.headers.get(PART_HEADER) == "local":
            return []
        others = [url for url, topics in app.router.external_topics_metadata().items() if url != owners.here and topics.get(envelope.ORDERS)]
        headers = {name: value for name, value in request.headers.items() if name.lower() != "host"} | {PART_HEADER: "local"}

        async def part(url: str) -> bytes:
            async with app.http_client.get(URL(url).join(request.rel_url), headers=headers, timeout=PART_TIMEOUT) as response:
                response.raise_for_status()
                return await response.read()

        return await asyncio.gather(*(part(url) for url in others))

    def parts_failed(view: View, error: Exception) -> Response:
        return web.error(view, 502, "worker_unavailable", f"Another worker of the stage did not answer its part: {error}")

    # Registered before `/v1/contacts/{tenant}/{contact}`, which would otherwise take "export.csv" for a contact.
    @app.page("/v1/contacts/{tenant}/export.csv")
    class ContactExport(View):
        async def get(self, request: Request, tenant: str) -> Response:
            refused = web.authorize(self, request, ctx.settings, tenant)
            if refused is not None:
                return refused
            if not owners.settled():
                return not_settled(self)
            ids = request.query.getall("id", [])
            config = reference.tenant(tenant)
            keys = [envelope.contact_key(tenant, i) for i in ids] if ids else [k for k, _ in contacts.items() if k.startswith(f"{tenant}/")]
            selected = ((contacts.get(key), consents.get(key)) for key in sorted(held_here(keys)))
            text = profiles.export_rows(
                ((state["profile"], consent) for state, consent in selected if state),
                field_columns=sorted(config.fields), filter_columns=sorted(config.filters),
                filters=request.query.getall("filter", []), consents=request.query.getall("consent", []), ids=ids,
            )
            try:
                parts = await other_parts(request)
            except aiohttp.ClientError as error:
                return parts_failed(self, error)
            # Each part starts with the same header row (column names hold no line break).
            text += "".join(part.decode().split("\r\n", 1)[1] for part in parts)
            disposition = f'attachment; filename="contacts-{tenant}.csv"'
            return self.bytes(text.encode(), content_type="text/csv", headers={"Content-Disposition": disposition})

    @app.page("/v1/contacts/{tenant}/{contact}")
    class ContactProfile(View):
        async def get(self, request: Request, tenant: str, contact: str) -> Response:
            key = envelope.contact_key(tenant, contact)

            def answer() -> Response:
                profile = profiles.profile_of(contacts.get(key))
                if profile is None:
                    return web.error(self, 404, "unknown_contact", f"Tenant {tenant!r} has no contact {contact!r}.")
                if request.query.get("view") == "profile":
                    return self.json(profile_view(profile, reference.tenant(tenant).fields))
                return self.json(profile)

            return await owners.answer_for_tenant(self, request, ctx.settings, tenant, envelope.ORDERS, key, answer)

    @app.page("/v1/messages/{tenant}/{message}/recipients")
    class MessageRecipients(View):
        async def get(self, request: Request, tenant: str, message: str) -> Response:
            refused = web.authorize(self, request, ctx.settings, tenant)
            if refused is not None:
                return refused
            if message not in reference.tenant(tenant).messages:
                return web.error(self, 404, "unknown_message", f"Tenant {tenant!r} has no message {message!r}.")
            if not owners.settled():
                return not_settled(self)
            refresh()
            items = [{"contact": c, "orders": n} for c, n in local.members.get((tenant, message), {}).items()]
            try:
                parts = await other_parts(request)
            except aiohttp.ClientError as error:
                return parts_failed(self, error)
            items = sorted([*items, *(item for part in parts for item in envelope.loads(part)["items"])], key=lambda item: item["contact"])
            if request.headers.get(PART_HEADER) == "local":
                return self.json({"message": message, "total": len(items), "items": items})
            page, size = web.paging(request)
            return self.json({"message": message, "total": len(items), "items": web.page_of(items, page, size)})
