"""The consent stage's faust wiring: the contact agent, the reminder clock and the web pages.

Where each piece of state lives, and why:
- `consent-contacts` (table, key `{tenant}/{contact}`): each contact's statuses and double opt-in
  cycles (`rules` state). Orders, commands and this stage's own fan-out topic are co-partitioned
  by that key, so one agent owns a contact's state on one worker.
- `consent-history` (table, same key): every `consent.changed` data of the contact, in order: the
  proof of consent `GET .../consents/proof` answers with. A topic cannot be read by key, so the
  table holds what `consent.log` holds, and is recovered from `consent.log` itself rather than from
  a changelog of its own (see `workers/consent/history.py`).
- `consent-schedule` (table, same key): when the contact's next reminder or expiry is due. It is
  changelogged, so reminders survive restarts and move with their partitions (see `Schedule`).
- The contacts' and the schedule's changes go out with the stage's other records, batched (see
  `ContactTable`).
- Configuration (`ticketing.config`) and segment membership (`segments.members`) are read whole by
  every worker into memory. Membership has to be: the topic is keyed `{tenant}/{message}/{contact}`,
  so one message's members are spread over every partition, while a `consent.bulk-set` for that
  segment arrives on one worker and must reach them all. The topic is compacted, one small record
  per member, so the index stays modest; a bulk change uses the membership the worker has read
  when the command is handled.

A bulk command is fanned out per contact to `usher.consent.fanout`, keyed `{tenant}/{contact}`, so
each contact's change is made by the agent that owns the contact. The reminder clock works the same
way: a timer finds due contacts of this worker's partitions and sends each an internal
`usher.consent-due` record there, so the change happens in the agent, in the record's partition,
with the edge's at-least-once handling.
"""
from __future__ import annotations

import csv
import heapq
import io
import ipaddress
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import faust
from faust.web import Request, Response, View

from workers import envelope
from workers.consent import pages, rules, tokens
from workers.consent.history import History
from workers.edge import Accepted, Edge, produce
from workers.owners import Owners, active_partitions
from workers.tables import ContactTable
from workers.stage import StageContext

# Created with the contract's topics (workers/topics.py); keyed {tenant}/{contact}.
FANOUT = "usher.consent.fanout"
DUE = "usher.consent-due"
CLOCK_SOURCE = "/usher/consent/clock"
# How often the timer looks for due reminders and expiries.
TICK_EVERY_S = 1.0
# A due contact is handed out again if still due this long after (its record was lost).
RETICK_AFTER = timedelta(seconds=30)
# Sorts before any due time: an entry computed with outdated settings is looked at at once.
AT_ONCE = datetime.min.replace(tzinfo=timezone.utc)

PROOF_COLUMNS = ("contact", "optin", "from", "to", "method", "channel", "ip", "user_agent", "user", "note", "at")
EVIDENCE_COLUMNS = ("order", "text_shown", "version", "prechecked", "bulk", "request")
# A spreadsheet runs a cell starting with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def timing(settings: Mapping[str, Any] | None) -> list[float]:
    """The settings a due time is computed from; a schedule entry remembers them."""
    policy = rules.DoiPolicy.from_settings(settings)
    return [policy.remind_every.total_seconds(), policy.max_reminders, policy.expire_after.total_seconds()]


_DEFAULT_TIMING = timing(None)


@dataclass
class Tenant:
    """One tenant's configuration, as far as consent goes (`config.settings` and `config.optin` data),
    and the `timing` of its settings, worked out when they change rather than for every record."""

    settings: dict[str, Any] | None = None
    optins: dict[str, dict[str, Any]] = field(default_factory=dict)
    timing: list[float] = field(default_factory=lambda: _DEFAULT_TIMING)


class Reference:
    """What the feed keeps in memory: each tenant's settings and opt-ins, each message's segment."""

    def __init__(self, on_timing_change: Callable[[str], None]) -> None:
        self.tenants: dict[str, Tenant] = defaultdict(Tenant)
        self.members: dict[tuple[str, str], set[str]] = defaultdict(set)
        self._on_timing_change = on_timing_change

    def tenant(self, tenant: str) -> Tenant:
        return self.tenants.get(tenant) or Tenant()

    def apply(self, topic: str, key: str, event: dict[str, Any] | None) -> str | None:
        if topic == envelope.SEGMENTS_MEMBERS:
            return self._apply_member(key, event)
        return self._apply_config(key, event)

    def _apply_config(self, key: str, event: dict[str, Any] | None) -> str | None:
        tenant, _, rest = key.partition("/")
        kind, _, id_ = rest.partition("/")
        if event is not None:
            if event["type"] not in ("config.settings", "config.optin"):
                return None
            expected = (event["tenant"], event["type"].removeprefix("config."), event["data"].get("id", id_))
            if (tenant, kind, id_) != expected:
                return f"key {key!r} is not {'/'.join(expected)!r}"
        config = self.tenants[tenant]
        if kind == "settings":
            before = config.timing
            config.settings = None if event is None else event["data"]
            config.timing = timing(config.settings)
            if config.timing != before:
                self._on_timing_change(tenant)
        elif kind == "optin":
            if event is None:
                config.optins.pop(id_, None)
            else:
                config.optins[id_] = event["data"]
        return None

    def _apply_member(self, key: str, event: dict[str, Any] | None) -> str | None:
        tenant, message, contact = (key.split("/", 2) + ["", ""])[:3]
        if event is not None:
            data = event["data"]
            if (tenant, message, contact) != (event["tenant"], data["message"], data["contact"]):
                return f"key {key!r} is not {event['tenant']}/{data['message']}/{data['contact']}"
        members = self.members[(tenant, message)]
        if event is not None and event["data"]["member"]:
            members.add(contact)
        else:
            members.discard(contact)
        return None


class Schedule:
    """When each contact's next reminder or expiry is due.

    The table is the truth: `{tenant}/{contact}` -> `{"due", "partition", "timing"}`, written by
    the agent in the contact's record context, so it is changelogged with the contact's partition.
    The table also holds standby copies of other workers' partitions, so each entry names its
    partition and the timer only looks at those this worker is active for. An in-memory heap over
    those finds what is due without a scan; it is rebuilt from the table after every recovery.
    An entry computed with settings that have since changed is due at once: the agent recomputes it.
    """

    def __init__(self, edge: Edge, stage: str) -> None:
        self.app = edge.app
        self.table = ContactTable(edge, f"{stage}-schedule")
        self._entries: dict[str, tuple[datetime, list[float]]] = {}
        self._heap: list[tuple[datetime, str]] = []
        self._rebuild = True
        self._changed_tenants: set[str] = set()
        self.table.on_recover(self._recovered)

    async def _recovered(self) -> None:
        self._rebuild = True

    def set(self, key: str, partition: int, due: datetime | None, settings_timing: list[float]) -> list[envelope.Out]:
        """Call in the contact's record context with the due time `rules.next_due_at` computed from
        settings whose `timing` is `settings_timing`; returns the table change to produce, if any."""
        value = None if due is None else {"due": envelope.isotime(due), "partition": partition, "timing": settings_timing}
        if self.table.get(key) == value:
            return []
        if value is None:
            self._entries.pop(key, None)
            return [self.table.delete(key)]
        self._entries[key] = (envelope.parse_time(value["due"]), value["timing"])
        heapq.heappush(self._heap, (self._entries[key][0], key))
        return [self.table.set(key, value)]

    def settings_changed(self, tenant: str) -> None:
        self._changed_tenants.add(tenant)

    def take_due(self, now: datetime, timing_of: Callable[[str], list[float]]) -> list[str]:
        """Keys due at `now`, each handed out again after `RETICK_AFTER` while still due."""
        if self._rebuild:
            self._load(timing_of)
        elif self._changed_tenants:
            for key, (_, entry_timing) in self._entries.items():
                tenant = key.split("/", 1)[0]
                if tenant in self._changed_tenants and entry_timing != timing_of(tenant):
                    heapq.heappush(self._heap, (AT_ONCE, key))
        self._changed_tenants.clear()
        due = []
        while self._heap and self._heap[0][0] <= now:
            _, key = heapq.heappop(self._heap)
            entry = self._entries.get(key)
            # A stale heap item: the entry is gone, or rescheduled (its own item is in the heap).
            if entry is None or (entry[0] > now and entry[1] == timing_of(key.split("/", 1)[0])):
                continue
            due.append(key)
            heapq.heappush(self._heap, (now + RETICK_AFTER, key))
        return due

    def _load(self, timing_of: Callable[[str], list[float]]) -> None:
        active = active_partitions(self.app, envelope.ORDERS)
        self._entries = {
            key: (envelope.parse_time(value["due"]), value["timing"])
            for key, value in self.table.items()
            if value is not None and value["partition"] in active
        }
        self._heap = [
            (due if entry_timing == timing_of(key.split("/", 1)[0]) else AT_ONCE, key)
            for key, (due, entry_timing) in self._entries.items()
        ]
        heapq.heapify(self._heap)
        self._rebuild = False


def proof_csv(changes: Iterable[Mapping[str, Any]]) -> str:
    """The proof of consent as CSV: a header, then one row per change (evidence as `evidence.*`)."""
    changes = list(changes)
    extra = sorted({name for change in changes for name in change.get("evidence") or {}} - set(EVIDENCE_COLUMNS))
    evidence_columns = [*EVIDENCE_COLUMNS, *extra]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*PROOF_COLUMNS, *(f"evidence.{name}" for name in evidence_columns)])
    for change in changes:
        evidence = change.get("evidence") or {}
        writer.writerow([*(_cell(change.get(c)) for c in PROOF_COLUMNS), *(_cell(evidence.get(c)) for c in evidence_columns)])
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    # Quoted so a spreadsheet shows the text rather than running it; the JSON proof stays exact.
    return "'" + text if text.startswith(_FORMULA_START) else text


def _client_ip(request: Request) -> str | None:
    """The peer's address when it is an IP (the contract's records only take an IP)."""
    try:
        return str(ipaddress.ip_address(request.remote or ""))
    except ValueError:
        return None


def _browser_language(request: Request) -> str | None:
    """The visitor's first preferred language, for pages shown before a token tells us who they are."""
    first = request.headers.get("Accept-Language", "").split(",")[0].split(";")[0].strip()
    return first or None


def _page(view: View, page: pages.Page) -> Response:
    # A link's page is about one person: never cached on the way.
    return view.html(page.html, status=page.status, headers={"Cache-Control": "no-store"})


def register(app: faust.App, ctx: StageContext) -> None:
    settings = ctx.settings
    now = envelope.clock(settings.clock_offset_s)
    links = rules.Links(secret=settings.secret, base_url=f"http://{settings.web_host}:{settings.web_port}")
    contacts = ContactTable(ctx.edge, f"{ctx.name}-contacts")
    history = History(ctx.edge, f"{ctx.name}-history")
    schedule = Schedule(ctx.edge, ctx.name)
    reference = Reference(on_timing_change=schedule.settings_changed)
    ctx.feed([envelope.CONFIG, envelope.SEGMENTS_MEMBERS], reference.apply)

    def timing_of(tenant: str) -> list[float]:
        return reference.tenant(tenant).timing

    def fan_out(item: Accepted) -> list[envelope.Out]:
        data = item.data
        members = data.get("contacts") or sorted(reference.members.get((item.tenant, data["segment"]), ()))
        return [
            envelope.Out(FANOUT, envelope.contact_key(item.tenant, contact), rules.bulk_for_contact(item.event, contact))
            for contact in members
        ]

    def handle(item: Accepted) -> list[envelope.Out]:
        event, kind = item.event, item.event["type"]
        if kind == "consent.bulk-set" and item.record.message.topic != FANOUT:
            return fan_out(item)
        if kind != DUE and kind not in rules.HANDLED_TYPES:
            return []  # contact.* commands are the segments stage's
        key = envelope.contact_key(item.tenant, item.data["contact"] if kind == DUE else rules.contact_of(event))
        if item.key != key:
            return [ctx.edge.reject(f"record key {item.key!r} is not {key!r}", item)]
        tenant = reference.tenant(item.tenant)
        before = contacts.get(key)
        if kind == DUE and before is None:
            state, outs = None, []
        elif kind == DUE:
            state, outs = rules.due(before, tenant.settings, tenant.optins, now(), links)
        else:
            state, outs = rules.apply(event, before, tenant.settings, tenant.optins, now(), links)
        if state is not before:  # the rules give the state they were given when nothing changed
            outs.append(contacts.set(key, state))
        changes = [out.event for out in outs if out.topic == envelope.CONSENT_LOG and out.event]
        if changes:
            history.append(key, changes)
        due = None if state is None else rules.next_due_at(state, tenant.settings)
        return outs + schedule.set(key, item.record.message.partition, due, tenant.timing)

    ctx.edge.subscribe("contacts", [envelope.ORDERS, envelope.COMMANDS, FANOUT], on_record=handle)

    owners = Owners(app, ctx.edge.waits)

    @app.timer(TICK_EVERY_S)
    async def consent_clock() -> None:
        if not owners.settled():
            return
        moment = now()
        outs = []
        for key in schedule.take_due(moment, timing_of):
            tenant, contact = key.split("/", 1)
            event = envelope.make_event(DUE, tenant, {"contact": contact}, source=CLOCK_SOURCE, time=envelope.isotime(moment))
            outs.append(envelope.Out(FANOUT, key, event))
        await produce(app, outs, ctx.name)

    async def from_owner(view: View, request: Request, key: str, answer: Callable[[], Response]) -> Response:
        """Answer a GET about a contact here if this worker owns it, else pass on the owner's answer."""
        return await owners.answer(view, request, envelope.ORDERS, key, answer)

    def owned_here(key: str) -> bool:
        return owners.owned_here(envelope.ORDERS, key)

    def read_confirm(token: str, moment: datetime) -> tuple[tokens.ConfirmClaims | None, str | None]:
        """(claims, None) or (None, why the link changes nothing). The age allowed depends on the
        token's tenant, so the token is first read for its claims, then for its age."""
        try:
            claims = tokens.read_confirm_token(token, settings.secret, None, moment)
            policy = rules.DoiPolicy.from_settings(reference.tenant(claims.tenant).settings)
            return tokens.read_confirm_token(token, settings.secret, policy.token_max_age_s, moment), None
        except tokens.TokenExpired:
            return None, rules.EXPIRED
        except tokens.TokenInvalid:
            return None, pages.INVALID

    def read_unsubscribe(token: str, moment: datetime) -> tokens.UnsubscribeClaims | None:
        try:
            claims = tokens.read_unsubscribe_token(token, settings.secret, None, moment)
        except tokens.TokenError:
            return None
        return claims if claims.purpose in ("email", "sms") else None

    @app.page("/doi/confirm")
    class ConfirmPage(View):
        """GET shows the one button and confirms nothing; its form's POST confirms."""

        async def get(self, request: Request) -> Response:
            moment = now()
            token = request.query.get("token", "")
            claims, problem = read_confirm(token, moment)
            if claims is None:
                return _page(self, pages.problem_page(problem, _browser_language(request)))

            def answer() -> Response:
                tenant = reference.tenant(claims.tenant)
                state = contacts.get(envelope.contact_key(claims.tenant, claims.contact))
                language = rules.contact_language(state, tenant.settings)
                problem = rules.confirmation_problem(state, tenant.settings, claims, moment)
                if problem is not None:
                    return _page(self, pages.problem_page(problem, language))
                policy = rules.DoiPolicy.from_settings(tenant.settings)
                text = rules.optin_text(tenant.optins.get(claims.optin, {}), language, policy.default_language)
                return _page(self, pages.confirm_page(token, language, text))

            return await from_owner(self, request, envelope.contact_key(claims.tenant, claims.contact), answer)

        async def post(self, request: Request) -> Response:
            moment = now()
            form = await request.post()
            claims, problem = read_confirm(str(form.get("token", "")), moment)
            if claims is None:
                return _page(self, pages.problem_page(problem, _browser_language(request)))
            tenant = reference.tenant(claims.tenant)
            key = envelope.contact_key(claims.tenant, claims.contact)
            # Only the owner's state is current; elsewhere the agent alone judges the confirmation
            # (the POST is not passed on: the click's IP is part of the proof).
            owned = owned_here(key)
            state = contacts.get(key) if owned else None
            language = rules.contact_language(state, tenant.settings)
            problem = rules.confirmation_problem(state, tenant.settings, claims, moment) if owned else None
            if problem is not None:
                return _page(self, pages.problem_page(problem, language))
            command = rules.confirm_command(claims, _client_ip(request), request.headers.get("User-Agent"), moment)
            await produce(app, [command], ctx.name)
            return _page(self, pages.confirmed_page(language))

    @app.page("/unsubscribe")
    class UnsubscribePage(View):
        """GET shows the one button; POST (the button, or a mail client's RFC 8058 one-click
        `List-Unsubscribe=One-Click`) revokes every opt-in of the link's channel purpose."""

        async def get(self, request: Request) -> Response:
            token = request.query.get("token", "")
            claims = read_unsubscribe(token, now())
            if claims is None:
                return _page(self, pages.problem_page(pages.INVALID, _browser_language(request)))
            key = envelope.contact_key(claims.tenant, claims.contact)

            def answer() -> Response:
                language = rules.contact_language(contacts.get(key), reference.tenant(claims.tenant).settings)
                return _page(self, pages.unsubscribe_page(token, language, claims.purpose))

            return await from_owner(self, request, key, answer)

        async def post(self, request: Request) -> Response:
            moment = now()
            claims = read_unsubscribe(request.query.get("token", ""), moment)
            if claims is None:
                return _page(self, pages.problem_page(pages.INVALID, _browser_language(request)))
            tenant = reference.tenant(claims.tenant)
            key = envelope.contact_key(claims.tenant, claims.contact)
            language = rules.contact_language(contacts.get(key) if owned_here(key) else None, tenant.settings)
            revokes = rules.unsubscribe_commands(claims, tenant.optins, _client_ip(request), request.headers.get("User-Agent"), moment)
            await produce(app, revokes, ctx.name)
            return _page(self, pages.unsubscribed_page(language, claims.purpose))

    @app.page("/v1/contacts/{tenant}/{contact}/consents")
    class Consents(View):
        async def get(self, request: Request, tenant: str, contact: str) -> Response:
            key = envelope.contact_key(tenant, contact)

            def answer() -> Response:
                state = contacts.get(key)
                return self.json(rules.public_status(state) if state else {"contact": contact, "optins": {}})

            return await owners.answer_for_tenant(self, request, settings, tenant, envelope.ORDERS, key, answer)

    @app.page("/v1/contacts/{tenant}/{contact}/consents/proof")
    class ConsentProof(View):
        async def get(self, request: Request, tenant: str, contact: str) -> Response:
            key = envelope.contact_key(tenant, contact)

            def answer() -> Response:
                changes = history.changes(key)
                if request.query.get("format") == "csv":
                    disposition = f'attachment; filename="consent-proof-{tenant}-{contact}.csv"'
                    return self.bytes(proof_csv(changes).encode(), content_type="text/csv", headers={"Content-Disposition": disposition})
                return self.json({"contact": contact, "changes": changes})

            return await owners.answer_for_tenant(self, request, settings, tenant, envelope.ORDERS, key, answer)
