"""The consent stage's decisions: one contact's opt-in statuses, their audit log and double opt-in.

Everything here is pure: (input record, the contact's state, tenant configuration, `now`) in,
(new state, records to produce) out. The agent keeps one state per contact in a table keyed
`{tenant}/{contact}` and produces the returned `Out`s.

State (JSON-able)::

    {"status": <consent.status data, published as is>,
     "private": {"tenant": "t1",
                 "reach": {"email", "phone", "language", "first_name", "at"},  # newest order's, for reminders
                 "optins": {"newsletter": {"mark": {"at", "event"}, "doi": {...}, "used": [request, ...]}}}}

Rules that are decisions rather than facts of the contract:
- Ordering: each opt-in remembers the (time, source|id) of the input that last changed it (`mark`).
  An input not strictly after that changes nothing and is not logged, since the log is the proof
  of consent and must only hold changes that happened. Equal times fall back to comparing
  source|id, so the outcome never depends on arrival order, and a repeat of the last change is a no-op.
  Inputs that change nothing (yes on opted_in) do not move the mark, so a confirmation click is
  never lost to a later, redundant yes.
- Expiry does not move the mark: a revocation made before the expiry but arriving after it still counts.
- A DOI cycle is identified by the request id of its first confirmation mail. Resends and reminders
  are mails with their own request ids whose links carry the cycle's id, so any of them confirms.
- `at` in a log record is when the change happened (the input's `time`; for an expiry the moment
  the cycle ran out); the envelope's `time` is when the record was produced.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from workers.consent.tokens import (
    CONFIRM_PATH,
    ConfirmClaims,
    UnsubscribeClaims,
    link,
    make_confirm_token,
)
from workers.envelope import (
    COMMANDS,
    CONSENT_LOG,
    CONSENT_STATE,
    OUTBOX,
    Out,
    contact_key,
    derived_id,
    isotime,
    isotime_of,
    make_event,
    parse_time,
)

SOURCE = "/usher/consent"
# Commands written by the consent stage's customer pages.
WEB_SOURCE = "/usher/consent/web"

UNKNOWN = "unknown"
PENDING = "pending"
OPTED_IN = "opted_in"
OPTED_OUT = "opted_out"
EXPIRED = "expired"

# Why a confirmation cannot be honoured (also picks the customer page to show).
USED = "used"

RESEND_AFTER = timedelta(days=1)
# Enough to recognise a reused link of the last few cycles; older ones read as expired.
USED_REQUESTS_KEPT = 10

Settings = Mapping[str, Any]
OptinConfigs = Mapping[str, Mapping[str, Any]]
Event = dict[str, Any]


@dataclass(frozen=True, slots=True)
class DoiPolicy:
    """A tenant's double opt-in settings (`config.settings` data), with the contract's defaults."""

    optins: frozenset[str]
    remind_every: timedelta
    max_reminders: int
    expire_after: timedelta
    default_language: str
    public_url: str | None

    @classmethod
    def from_settings(cls, settings: Settings | None) -> DoiPolicy:
        """The policy of `settings`; worked out once per settings mapping, which the agent asks
        for with every record (a changed mapping is worked out again)."""
        if not settings:
            return _DEFAULT_POLICY
        cached = _POLICIES.get(id(settings))
        # The mapping itself is kept, so its id is not reused; the snapshot catches a change in place.
        if cached is not None and cached[0] is settings and cached[1] == settings:
            return cached[2]
        policy = cls._work_out(settings)
        if len(_POLICIES) >= _POLICIES_KEPT:
            _POLICIES.clear()
        _POLICIES[id(settings)] = (settings, copy.deepcopy(settings), policy)
        return policy

    @classmethod
    def _work_out(cls, settings: Settings | None) -> DoiPolicy:
        settings = settings or {}

        def value(name: str, default: Any) -> Any:
            # An absent setting and an explicit null both mean the contract's default.
            found = settings.get(name)
            return default if found is None else found

        return cls(
            optins=frozenset(value("doi_optins", ())) if value("double_opt_in", False) else frozenset(),
            remind_every=timedelta(days=value("doi_reminder_every_days", 3)),
            max_reminders=int(value("doi_max_reminders", 2)),
            expire_after=timedelta(days=value("doi_expire_after_days", 14)),
            default_language=value("default_language", "en"),
            public_url=settings.get("public_url") or None,
        )

    def applies(self, optin: str) -> bool:
        return optin in self.optins

    @property
    def token_max_age_s(self) -> float:
        """How long a confirmation link stays valid (for `tokens.read_confirm_token`)."""
        return self.expire_after.total_seconds()


_DEFAULT_POLICY = DoiPolicy._work_out(None)
_POLICIES: dict[int, tuple[Settings, Settings, DoiPolicy]] = {}
# Tenants' settings mappings whose policy is kept (one per tenant in use).
_POLICIES_KEPT = 1024


@dataclass(frozen=True, slots=True)
class Links:
    """What confirmation links are made of: the signing secret (`USHER_SECRET`) and the consent
    stage's own web address, used when the tenant's settings have no `public_url`."""

    secret: str
    base_url: str


class _How(NamedTuple):
    """The details of one change, as the log and the status record them (a tuple: one is made
    for most inputs, and a tuple is the cheapest object to make)."""

    method: str
    evidence: dict[str, Any]
    channel: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    user: str | None = None
    note: str | None = None


def _evidence(
    order: Any = None, text_shown: Any = None, version: Any = None, prechecked: Any = None, **extra: Any
) -> dict[str, Any]:
    # Named parameters rather than a merge of `extra`: a checkout's evidence is made for most changes.
    evidence = {"order": order, "text_shown": text_shown, "version": version, "prechecked": prechecked}
    if extra:
        evidence.update(extra)
    return evidence


def _present(**fields: Any) -> dict[str, Any]:
    """The fields that have a value: the contract's schemas take an absent field, not a null one."""
    return {name: value for name, value in fields.items() if value is not None}


def _event_key(event: Event) -> str:
    return f"{event['source']}|{event['id']}"


def _origin(tenant: str, source: str, id_: str) -> Event:
    """Something that causes records without being a record itself (a DOI cycle, a page click),
    shaped so `derived_id` gives its outputs stable ids."""
    return {"tenant": tenant, "source": source, "id": id_}


def new_state(tenant: str, contact: str) -> dict[str, Any]:
    """The state of a contact never seen before: every opt-in unknown."""
    return {
        "status": {"contact": contact, "optins": {}},
        "private": {"tenant": tenant, "reach": {}, "optins": {}},
    }


def public_status(state: Mapping[str, Any]) -> dict[str, Any]:
    """The `consent.status` data of a contact (also the answer of `GET .../consents`)."""
    return state["status"]


class _Contact:
    """One contact's state while one input (or one `due` run) is applied, with what to publish.

    The state it is given is never changed. A part is copied when first changed (the statuses,
    the reach, the books, one opt-in's book with its DOI cycle), since most inputs change little,
    and `result` puts the new state together, sharing the parts left as they were."""

    __slots__ = ("before", "tenant", "contact", "policy", "optins", "now", "links", "key",
                 "statuses", "books", "reach", "_statuses_copied", "_books_copied", "_time", "changes", "mails")

    def __init__(
        self, state: dict[str, Any], policy: DoiPolicy, optins: OptinConfigs, now: datetime, links: Links
    ) -> None:
        private = state["private"]
        self.before = state
        self.tenant: str = private["tenant"]
        self.contact: str = state["status"]["contact"]
        self.policy = policy
        self.optins = optins
        self.now = now
        self.links = links
        self.key = contact_key(self.tenant, self.contact)
        self.statuses: dict[str, dict[str, Any]] = state["status"]["optins"]
        self.books: dict[str, dict[str, Any]] = private["optins"]
        self.reach: dict[str, Any] = private["reach"]
        self._statuses_copied = False
        # The opt-ins whose book is this run's own copy; None while `books` is the given state's.
        self._books_copied: set[str] | None = None
        self._time: str | None = None
        self.changes: list[Event] = []
        self.mails: list[Out] = []

    def status_of(self, optin: str) -> str:
        entry = self.statuses.get(optin)
        return UNKNOWN if entry is None else entry["status"]

    def book(self, optin: str) -> dict[str, Any]:
        """The opt-in's book, to change (created when missing)."""
        copied = self._books_copied
        if copied is None:
            self.books = dict(self.books)
            copied = self._books_copied = set()
        if optin not in copied:
            book = dict(self.books.get(optin, ()))
            cycle = book.get("doi")
            if cycle is not None:
                book["doi"] = {**cycle, "mails": list(cycle["mails"])}
            self.books[optin] = book
            copied.add(optin)
        return self.books[optin]

    def is_newer(self, optin: str, cause_key: str, at: datetime) -> bool:
        """Whether an input at `at` whose `_event_key` is `cause_key` comes after the opt-in's mark."""
        book = self.books.get(optin)
        mark = None if book is None else book.get("mark")
        if mark is None:
            return True
        mark_at = parse_time(mark["at"])
        return at > mark_at or (at == mark_at and cause_key > mark["event"])

    def change(
        self, optin: str, to: str, at: datetime, how: _How, cause: Event, moves_mark: bool = True
    ) -> None:
        """Set `optin` to `to` and log it; nothing when it already is `to`."""
        before = self.status_of(optin)
        if before == to:
            return
        book = self.book(optin)
        if before == PENDING:
            book.pop("doi", None)
        if moves_mark:
            book["mark"] = {"at": cause["time"], "event": _event_key(cause)}
        when = isotime_of(at)
        if not self._statuses_copied:
            self.statuses = dict(self.statuses)
            self._statuses_copied = True
        entry = self.statuses.get(optin)
        self.statuses[optin] = {
            "status": to,
            "method": how.method,
            "channel": how.channel,
            "ip": how.ip,
            "user": how.user,
            "note": how.note,
            "created": when if entry is None else entry.get("created", when),
            "modified": when,
            "evidence": how.evidence,
        }
        change = {
            "contact": self.contact,
            "optin": optin,
            "from": before,
            "to": to,
            "method": how.method,
            "channel": how.channel,
            "ip": how.ip,
            "user_agent": how.user_agent,
            "user": how.user,
            "note": how.note,
            "at": when,
            "evidence": how.evidence,
        }
        log_id = derived_id(cause, f"changed/{self.contact}/{optin}")
        self.changes.append(self._event("consent.changed", change, log_id))

    def remember_reach(self, person: Mapping[str, Any], at: datetime) -> None:
        """Keep the newest order's address and language, for mails sent later (reminders)."""
        reach, when = self.reach, isotime_of(at)
        # Both in `isotime`'s fixed form, whose text order is time order: no parsing needed.
        if reach and reach["at"] > when:
            return
        newest = {
            "email": person.get("email"),
            "phone": person.get("phone"),
            "language": person.get("language"),
            "first_name": person.get("first_name"),
            "at": when,
        }
        if newest != reach:
            self.reach = newest

    def start_doi(self, optin: str, cause: Event, at: datetime) -> None:
        request = derived_id(cause, f"doi/{self.contact}/{optin}")
        # `mails` lists every mail request of the cycle, so a redelivered input never mails twice.
        cycle: dict[str, Any] = {
            "request": request,
            "pending_since": isotime_of(at),
            "last_mail_at": None,
            "reminders": 0,
            "mails": [],
        }
        self.book(optin)["doi"] = cycle
        self.mail(optin, cycle, "doi-confirmation", request)

    def resend_if_quiet(self, optin: str, cause: Event) -> None:
        """Yes again while pending: a new confirmation mail, at most one a day."""
        cycle = self.books[optin]["doi"]
        if self.now - parse_time(cycle["last_mail_at"]) <= RESEND_AFTER:
            return
        request = derived_id(cause, f"doi-resend/{self.contact}/{optin}")
        if request not in cycle["mails"]:
            self.mail(optin, self.book(optin)["doi"], "doi-confirmation", request)

    def mail(self, optin: str, cycle: dict[str, Any], kind: str, request: str) -> None:
        """Mail `kind` for the DOI `cycle` (this run's own copy, which records the mail)."""
        claims = ConfirmClaims(self.tenant, self.contact, optin, cycle["request"])
        token = make_confirm_token(claims, self.links.secret, self.now)
        reach = self.reach
        language = _language_of(reach, self.policy)
        expires_at = parse_time(cycle["pending_since"]) + self.policy.expire_after
        data = {
            "request": request,
            "kind": kind,
            "message": None,
            "contact": self.contact,
            "channel": "email",
            "to": _present(email=reach.get("email"), phone=reach.get("phone")),
            "layout": kind,
            "language": language,
            "vars": {
                "confirm_url": link(self.policy.public_url or self.links.base_url, CONFIRM_PATH, token),
                "optin": optin,
                "optin_text": optin_text(self.optins.get(optin, {}), language, self.policy.default_language),
                "first_name": reach.get("first_name"),
                "expires_at": isotime_of(expires_at),
            },
        }
        cycle["mails"].append(request)
        cycle["last_mail_at"] = self.time()
        # Without an address there is nobody to mail; the cycle still runs its course to expiry,
        # so the next checkout asks again.
        if reach.get("email"):
            self.mails.append(Out(OUTBOX, self.key, self._event("message.requested", data, request)))

    def time(self) -> str:
        """`now` as records carry it (not remembered by `isotime_of`: each record has its own `now`)."""
        if self._time is None:
            self._time = isotime(self.now)
        return self._time

    def _event(self, type_: str, data: dict[str, Any], id_: str) -> dict[str, Any]:
        return make_event(type_, self.tenant, data, source=SOURCE, id_=id_, time=self.time())

    def state(self) -> dict[str, Any]:
        """The contact's state with this run's changes: the given state itself when there are none."""
        before = self.before
        private = before["private"]
        if not self._statuses_copied and self._books_copied is None and self.reach is private["reach"]:
            return before
        status = before["status"]
        return {
            **before,
            "status": {**status, "optins": self.statuses} if self._statuses_copied else status,
            "private": {**private, "reach": self.reach, "optins": self.books},
        }

    def result(self) -> tuple[dict[str, Any], list[Out]]:
        """The new state and what to produce: the log records, the contact's full statuses when
        anything changed, then the mails."""
        state = self.state()
        key = self.key
        outs = [Out(CONSENT_LOG, key, change) for change in self.changes]
        if outs:
            status_id = derived_id(self.changes[-1], "status")
            outs.append(Out(CONSENT_STATE, key, self._event("consent.status", state["status"], status_id)))
        outs.extend(self.mails)
        return state, outs


def _language_of(reach: Mapping[str, Any], policy: DoiPolicy) -> str:
    return reach.get("language") or policy.default_language


def contact_language(state: Mapping[str, Any] | None, settings: Settings | None) -> str:
    """The language to address a contact in: their newest order's, else the tenant default."""
    policy = DoiPolicy.from_settings(settings)
    return policy.default_language if state is None else _language_of(state["private"]["reach"], policy)


def optin_text(config: Mapping[str, Any], language: str, default_language: str) -> str | None:
    """An opt-in's question (`config.optin` data) in `language`, else the tenant's, else English."""
    texts = config.get("text") or {}
    for candidate in (language, default_language, "en"):
        if candidate in texts:
            return texts[candidate]
    return next(iter(texts.values()), None)


def _on_order(run: _Contact, event: Event, at: datetime) -> None:
    data = event["data"]
    run.remember_reach(data["contact"], at)
    cause_key = _event_key(event)
    for answer in data.get("optins") or ():
        optin = answer["optin"]
        yes = answer["answer"]
        status = run.status_of(optin)
        # Most answers of a returning buyer change nothing: decided before the mark is looked up or anything built.
        if status == (OPTED_IN if yes else OPTED_OUT) or not run.is_newer(optin, cause_key, at):
            continue
        if yes and status == PENDING and run.policy.applies(optin):
            run.resend_if_quiet(optin, event)
            continue
        how = _How(
            method="checkout",
            channel=data.get("channel"),
            ip=data.get("ip"),
            user_agent=data.get("user_agent"),
            evidence=_evidence(
                order=data.get("order"),
                text_shown=answer.get("text_shown"),
                version=answer.get("version"),
                prechecked=answer.get("prechecked"),
            ),
        )
        if not yes:
            run.change(optin, OPTED_OUT, at, how, event)
        elif not run.policy.applies(optin):
            run.change(optin, OPTED_IN, at, how, event)
        else:
            run.change(optin, PENDING, at, how, event)
            run.start_doi(optin, event, at)


def _on_set(run: _Contact, event: Event, at: datetime) -> None:
    """`consent.set`, and `consent.bulk-set` once fanned out to one contact (`bulk_for_contact`)."""
    data = event["data"]
    optin = data["optin"]
    if not run.is_newer(optin, _event_key(event), at):
        return
    bulk = event["type"] == "consent.bulk-set"
    how = _How(
        method="bulk" if bulk else "manual",
        channel=data.get("channel"),
        ip=data.get("ip"),
        user=data.get("user"),
        note=data.get("reason"),
        evidence=_evidence(bulk=data["bulk"]) if bulk else _evidence(),
    )
    run.change(optin, data["status"], at, how, event)


def _on_revoke(run: _Contact, event: Event, at: datetime) -> None:
    data = event["data"]
    optin = data["optin"]
    if not run.is_newer(optin, _event_key(event), at):
        return
    how = _How(
        method="revoke",
        channel=data.get("channel"),
        ip=data.get("ip"),
        user_agent=data.get("user_agent"),
        evidence=_evidence(request=data["request"]) if data.get("request") else _evidence(),
    )
    run.change(optin, OPTED_OUT, at, how, event)


def _on_confirm(run: _Contact, event: Event, at: datetime) -> None:
    data = event["data"]
    optin, request = data["optin"], data["request"]
    if _problem(run.before, run.policy, optin, request, at) or not run.is_newer(optin, _event_key(event), at):
        return
    how = _How(
        method="doi-confirmation",
        channel="email-link",
        ip=data.get("ip"),
        user_agent=data.get("user_agent"),
        # What was consented to is the pending answer's evidence; the request ties it to the mail.
        evidence={**run.statuses[optin]["evidence"], "request": request},
    )
    book = run.book(optin)
    book["used"] = [*book.get("used", []), request][-USED_REQUESTS_KEPT:]
    run.change(optin, OPTED_IN, at, how, event)


_RULES: dict[str, Callable[[_Contact, Event, datetime], None]] = {
    "order.placed": _on_order,
    "consent.set": _on_set,
    "consent.bulk-set": _on_set,
    "consent.revoke": _on_revoke,
    "consent.confirm": _on_confirm,
}
HANDLED_TYPES = frozenset(_RULES)


def contact_of(event: Event) -> str:
    """The contact a record of `HANDLED_TYPES` is about (its record key is `{tenant}/{contact}`)."""
    data = event["data"]
    if event["type"] == "order.placed":
        return data["contact"]["id"]
    if event["type"] == "consent.bulk-set":
        if len(data.get("contacts") or ()) != 1 or "bulk" not in data:
            raise ValueError("a consent.bulk-set reaches apply for one contact: see bulk_for_contact")
        return data["contacts"][0]
    return data["contact"]


def apply(
    event: Event,
    state: Mapping[str, Any] | None,
    settings: Settings | None,
    optins: OptinConfigs,
    now: datetime,
    links: Links,
) -> tuple[dict[str, Any], list[Out]]:
    """Apply one input record to its contact's state (None: never seen). Types outside
    `HANDLED_TYPES` change nothing. `settings` is the tenant's `config.settings` data, `optins` its
    `config.optin` data by opt-in id. The input is not modified."""
    tenant, contact = event["tenant"], contact_of(event)
    if state is None:
        state = new_state(tenant, contact)
    elif (state["private"]["tenant"], state["status"]["contact"]) != (tenant, contact):
        raise ValueError(f"state of {contact_key(state['private']['tenant'], state['status']['contact'])} "
                         f"given for a record of {contact_key(tenant, contact)}")
    rule = _RULES.get(event["type"])
    if rule is None:
        return state, []
    run = _Contact(state, DoiPolicy.from_settings(settings), optins, now, links)
    rule(run, event, parse_time(event["time"]))
    return run.result()


def bulk_for_contact(bulk: Event, contact: str) -> Event:
    """A `consent.bulk-set` narrowed to one of its contacts (still a valid `consent.bulk-set`), to
    route to that contact's partition and `apply`. Each copy has its own id, derived from the
    command's, because (tenant, source, id) is what the edge drops repeats by: copies for two
    contacts must not look like one record, while a redelivered command yields the same copies.
    `data.bulk` keeps the command's id, which the log names in `evidence.bulk`."""
    data = {k: v for k, v in bulk["data"].items() if k != "segment"}
    return {
        **bulk,
        "id": derived_id(bulk, f"bulk/{contact}"),
        "data": {**data, "contacts": [contact], "bulk": bulk["id"]},
    }


def _expires_at(cycle: Mapping[str, Any], policy: DoiPolicy) -> datetime:
    return parse_time(cycle["pending_since"]) + policy.expire_after


def _next_reminder_at(cycle: Mapping[str, Any], policy: DoiPolicy) -> datetime | None:
    if cycle["reminders"] >= policy.max_reminders:
        return None
    return parse_time(cycle["last_mail_at"]) + policy.remind_every


def due(
    state: Mapping[str, Any], settings: Settings | None, optins: OptinConfigs, now: datetime, links: Links
) -> tuple[dict[str, Any], list[Out]]:
    """Reminders and expiries due at `now` for one contact. A cycle past its expiry is expired
    (log method `doi-expired`) and gets no more reminders, even ones missed while the stage was down."""
    run = _Contact(state, DoiPolicy.from_settings(settings), optins, now, links)
    for optin, book in list(run.books.items()):
        cycle = book.get("doi")
        if cycle is None:
            continue
        expires_at = _expires_at(cycle, run.policy)
        if now >= expires_at:
            how = _How(method="doi-expired", evidence={**run.statuses[optin]["evidence"], "request": cycle["request"]})
            origin = _origin(run.tenant, SOURCE, cycle["request"])
            run.change(optin, EXPIRED, expires_at, how, origin, moves_mark=False)
            continue
        reminder_at = _next_reminder_at(cycle, run.policy)
        if reminder_at is not None and now >= reminder_at:
            cycle = run.book(optin)["doi"]
            cycle["reminders"] += 1
            origin = _origin(run.tenant, SOURCE, cycle["request"])
            run.mail(optin, cycle, "doi-reminder", derived_id(origin, f"reminder/{cycle['reminders']}"))
    return run.result()


def next_due_at(state: Mapping[str, Any], settings: Settings | None) -> datetime | None:
    """When `due` next has something to do for this contact (None: nothing pending), for the
    agent's schedule table. Recompute it after every `apply`/`due` and when settings change."""
    soonest = policy = None
    for book in state["private"]["optins"].values():
        cycle = book.get("doi")
        if cycle is None:
            continue
        if policy is None:  # worked out only for a contact with a cycle
            policy = DoiPolicy.from_settings(settings)
        moment = _expires_at(cycle, policy)
        reminder_at = _next_reminder_at(cycle, policy)
        if reminder_at is not None and reminder_at < moment:
            moment = reminder_at
        if soonest is None or moment < soonest:
            soonest = moment
    return soonest


def _problem(state: Mapping[str, Any], policy: DoiPolicy, optin: str, request: str, at: datetime) -> str | None:
    book = state["private"]["optins"].get(optin, {})
    cycle = book.get("doi")
    if cycle is not None and cycle["request"] == request:
        return EXPIRED if at >= _expires_at(cycle, policy) else None
    status = state["status"]["optins"].get(optin, {}).get("status")
    if request in book.get("used", ()) or status == OPTED_IN:
        return USED
    # Superseded by a newer answer, a revocation or an expiry: the link no longer counts.
    return EXPIRED


def confirmation_problem(
    state: Mapping[str, Any] | None, settings: Settings | None, claims: ConfirmClaims, at: datetime
) -> str | None:
    """Why a click at `at` on an authentic confirmation link would change nothing: `USED`
    (already confirmed) or `EXPIRED` (cycle ran out or was superseded); None when it confirms.
    The page handler calls it to pick the page; `apply` applies the same rule to `consent.confirm`."""
    if state is None:
        return EXPIRED
    return _problem(state, DoiPolicy.from_settings(settings), claims.optin, claims.request, at)


def confirm_command(claims: ConfirmClaims, ip: str | None, user_agent: str | None, now: datetime) -> Out:
    """The `consent.confirm` a POST on the confirmation page publishes."""
    data = _present(contact=claims.contact, optin=claims.optin, request=claims.request, ip=ip, user_agent=user_agent)
    # A double click within the same millisecond is one command; a later click is its own record.
    id_ = derived_id(_origin(claims.tenant, WEB_SOURCE, claims.request), f"confirm/{isotime_of(now)}")
    event = make_event("consent.confirm", claims.tenant, data, source=WEB_SOURCE, id_=id_, time=isotime_of(now))
    return Out(COMMANDS, contact_key(claims.tenant, claims.contact), event)


def unsubscribe_commands(
    claims: UnsubscribeClaims, optins: OptinConfigs, ip: str | None, user_agent: str | None, now: datetime
) -> list[Out]:
    """The `consent.revoke`s of a one-click unsubscribe: every opt-in of the tenant whose purpose is
    the link's channel purpose. Each names the mail's request, which the log keeps as evidence."""
    outs = []
    for optin in sorted(o for o, config in optins.items() if config.get("purpose") == claims.purpose):
        data = _present(
            contact=claims.contact,
            optin=optin,
            # The contract's channel for a link in a message, whether it came by e-mail or SMS.
            channel="email-link",
            ip=ip,
            user_agent=user_agent,
            request=claims.request,
        )
        id_ = derived_id(_origin(claims.tenant, WEB_SOURCE, claims.request), f"unsubscribe/{optin}/{isotime_of(now)}")
        event = make_event("consent.revoke", claims.tenant, data, source=WEB_SOURCE, id_=id_, time=isotime_of(now))
        outs.append(Out(COMMANDS, contact_key(claims.tenant, claims.contact), event))
    return outs
