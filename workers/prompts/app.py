"""The prompts stage's faust wiring: what each checkout asks, on `checkout.prompts` and over HTTP.

Where each piece of state lives, and why:
- Configuration (`ticketing.config`) and each event's opt-in set (`ticketing.events`) are keyed by
  their own ids, so every worker reads them whole into memory (`Reference`).
- `prompts-consents` (table, key `{tenant}/{contact}`): each contact's opt-in statuses, from the
  consent stage's `consent.state`.
- `prompts-fields` (table, same key): each contact's custom-field answers, from the segments
  stage's `contacts.state`, to prefill the fields.
Checkouts, `consent.state` and `contacts.state` are co-partitioned by that key, so the agent that
prompts a contact's checkout finds the contact's state in its own partitions, and
`GET /v1/prompts` is answered by the worker holding the contact's partition (or passed on to it).
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import faust
from faust.types import EventT
from faust.web import Request, Response, View

from workers import envelope, web
from workers.edge import Accepted
from workers.fields import FORMS, validate_answers
from workers.owners import Owners, not_settled
from workers.prompts import rules
from workers.stage import StageContext
from workers.tables import ContactTable

# Checkouts wait for this stage's HTTP answers: it keeps CPython's own collector (see
# `memory.keep_memory`).
COLLECTIONS_ON_A_CLOCK = False

# The `ticketing.config` kinds the prompts read (the others are for other stages).
CONFIG_KINDS = ("settings", "optin", "optin-set", "custom-field")
# The language tags records carry (schemas/cloudevent.json, `language`).
LANGUAGE_PATTERN = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


class Reference:
    """Each tenant's configuration (`rules` state) and each event's opt-in set, read whole.

    A tenant's configuration records are spread over the partitions of `ticketing.config`, and a
    worker reading the topic from the start gets the partitions in no particular order: an opt-in
    set may come before the opt-ins it names, a new default set before the old one stopped being
    the default. So what is read while catching up is only collected, and each tenant's
    configuration is then built from it in the order upstream published it (the records' `time`).
    From then on records are applied as they arrive, and an invalid one is rejected.
    """

    def __init__(self, caught_up: Callable[[], bool]) -> None:
        self._caught_up = caught_up
        self._configs: dict[str, rules.ConfigState] = {}
        # "{tenant}/{event}" -> the event's opt-in set; events without one use the default set.
        self._event_sets: dict[str, str] = {}
        # tenant -> config key -> (time, record) of every version read while catching up
        self._backlog: dict[str, dict[str, list[tuple[datetime, dict[str, Any]]]]] = defaultdict(dict)

    def config(self, tenant: str) -> rules.ConfigState | None:
        if self._backlog:
            self._replay()
        return self._configs.get(tenant)

    def optin_set(self, tenant: str, event: str) -> str | None:
        return self._event_sets.get(envelope.key(tenant, event))

    def apply(self, topic: str, key: str, event: dict[str, Any] | None) -> str | None:
        """The feed's handler: a reason to reject the record, or None."""
        if topic == envelope.EVENTS:
            return self._apply_event(key, event)
        return self._apply_config(key, event)

    def _apply_event(self, key: str, event: dict[str, Any] | None) -> str | None:
        optin_set = None
        if event is not None:
            expected, optin_set = rules.event_optin_set_entry(event)
            if key != expected:
                return f"key {key!r} is not {expected!r}"
        if optin_set is None:
            self._event_sets.pop(key, None)
        else:
            self._event_sets[key] = optin_set
        return None

    def _apply_config(self, key: str, event: dict[str, Any] | None) -> str | None:
        tenant, kind, config_id = (key.split("/", 2) + ["", ""])[:3]
        if event is not None:
            kind = event["type"].removeprefix("config.")
            if kind not in CONFIG_KINDS:
                return None
            expected = envelope.key(event["tenant"], kind, event["data"].get("id", config_id))
            if key != expected:
                return f"key {key!r} is not {expected!r}"
        elif kind not in CONFIG_KINDS:
            return None
        if not self._caught_up():
            versions = self._backlog[tenant]
            if event is None:
                versions.pop(key, None)
            else:
                versions.setdefault(key, []).append((envelope.parse_time(event["time"]), event))
            return None
        if self._backlog:
            self._replay()
        if event is None:
            self._configs[tenant] = rules.remove_config(self._configs.get(tenant), kind, config_id)
            return None
        self._configs[tenant], problem = rules.apply_config(self._configs.get(tenant), event)
        return problem

    def _replay(self) -> None:
        for tenant, versions in self._backlog.items():
            state = self._configs.get(tenant)
            # A stable sort: records of the same moment keep the order they were read in.
            for _, event in sorted((version for by_key in versions.values() for version in by_key), key=lambda v: v[0]):
                # A rejected version was reported when it arrived; the one before it stays.
                state, _ = rules.apply_config(state, event, replayed=True)
            if state is not None:
                self._configs[tenant] = state
        self._backlog.clear()


def prompt_query_problem(query: Mapping[str, str]) -> tuple[str, str] | None:
    """(error code, message) for what is wrong with `GET /v1/prompts`'s parameters, else None."""
    for name in ("event", "channel"):
        if not query.get(name):
            return "missing_parameter", f"Give the {name}: ?{name}=..."
    for name in ("event", "channel", "contact"):
        value = query.get(name)
        if value and not envelope.ID_PATTERN.match(value):
            return "invalid_parameter", f"{name} must be an id of 1 to 128 letters, digits or ._:-"
    language = query.get("language")
    if language and not LANGUAGE_PATTERN.match(language):
        return "invalid_parameter", 'language must be a language tag such as "nl" or "nl-BE"'
    if query.get("form", "checkout") not in FORMS:
        return "invalid_parameter", f"form must be one of {', '.join(FORMS)}"
    return None


def validate_body_problem(body: Mapping[str, Any]) -> str | None:
    """What is wrong with a `POST /v1/fields/validate` body (its tenant already checked), else None."""
    if body.get("form") not in FORMS:
        return f"form must be one of {', '.join(FORMS)}"
    language = body.get("language")
    if language is not None and not (isinstance(language, str) and LANGUAGE_PATTERN.match(language)):
        return 'language must be a language tag such as "nl" or "nl-BE"'
    if not isinstance(body.get("answers"), dict):
        return 'answers must be an object of field id to answer, e.g. {"diet": ["vegan"]}'
    return None


def statuses_of(status: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """The part of a `consent.status` a prompt needs: each opt-in's status (a smaller changelog and
    faster reads than the whole record with its evidence)."""
    return {optin: {"status": entry["status"]} for optin, entry in status["optins"].items()}


def register(app: faust.App, ctx: StageContext) -> None:
    settings = ctx.settings
    reference = Reference(caught_up=lambda: feed.ready.is_set())
    feed = ctx.feed([envelope.CONFIG, envelope.EVENTS], reference.apply)
    consents = ContactTable(ctx.edge, f"{ctx.name}-consents")
    answers = ContactTable(ctx.edge, f"{ctx.name}-fields")
    # Each contact-state topic: the type it carries, the table keeping its part for the prompts, and that part.
    contact_state: dict[str, tuple[str, ContactTable, Callable[[dict[str, Any]], Any]]] = {
        envelope.CONSENT_STATE: ("consent.status", consents, statuses_of),
        envelope.CONTACTS_STATE: ("contact.profile", answers, lambda profile: profile["fields"]),
    }

    def wrong_type(item: Accepted, expected: str) -> envelope.Out:
        return ctx.edge.reject(f"{item.record.message.topic} carries {expected} records, not {item.event['type']}", item)

    async def prompt_checkouts(items: list[Accepted]) -> list[envelope.Out]:
        now = envelope.utcnow()
        outs = []
        for item in items:
            if item.event["type"] != "checkout.started":
                outs.append(wrong_type(item, "checkout.started"))
                continue
            data = item.data
            key = rules.checkout_key(item.tenant, data.get("contact"), data["checkout"])
            if item.key != key:
                outs.append(ctx.edge.reject(f"record key {item.key!r} is not {key!r}", item))
                continue
            config = reference.config(item.tenant)
            optin_set = reference.optin_set(item.tenant, data["event"])
            partition = item.record.message.partition  # the contact's, as the key is
            outs.append(rules.on_checkout_started(config, item.event, optin_set, consents.get(key, partition),
                                                  answers.get(key, partition), now))
        return outs

    async def keep_contact_state(items: list[Accepted]) -> list[envelope.Out]:
        outs = []
        for item in items:
            expected, table, part_of = contact_state[item.record.message.topic]
            if item.event["type"] != expected:
                outs.append(wrong_type(item, expected))
                continue
            data = item.data
            key = envelope.contact_key(item.tenant, data["contact"])
            if item.key != key:
                outs.append(ctx.edge.reject(f"record key {item.key!r} is not {key!r}", item))
                continue
            value = part_of(data)
            if table.get(key, item.record.message.partition) != value:
                with item.context():
                    outs.append(table.set(key, value))
        return outs

    def forget_contact(record: EventT) -> list[envelope.Out]:
        """A tombstone on a contact-state topic: the contact is gone, and so is what we kept."""
        if record.message.key:
            key = record.message.key.decode()
            _, table, _ = contact_state[record.message.topic]
            # An Accepted only for its context: the delete goes to the record's changelog partition.
            with Accepted({}, key, record).context():
                if table.get(key) is not None:
                    return [table.delete(key)]
        return []

    ctx.edge.subscribe("checkouts", [envelope.CHECKOUTS], on_batch=prompt_checkouts)
    ctx.edge.subscribe("contacts", list(contact_state), on_batch=keep_contact_state, on_tombstone=forget_contact)

    owners = Owners(app, ctx.edge.waits)

    @app.page("/v1/prompts")
    class Prompts(View):
        """The data of the `checkout.prompted` a checkout would get now, without `checkout`."""

        async def get(self, request: Request) -> Response:
            query = request.query
            tenant = query.get("tenant")
            refused = web.authorize(self, request, settings, tenant)
            if refused is not None:
                return refused
            problem = prompt_query_problem(query)
            if problem is not None:
                return web.error(self, 400, *problem)
            contact = query.get("contact") or None
            key = envelope.contact_key(tenant, contact) if contact else None

            def answer() -> Response:
                return self.json(rules.prompt_for(
                    reference.config(tenant),
                    event=query["event"],
                    event_optin_set=reference.optin_set(tenant, query["event"]),
                    channel=query["channel"],
                    language=query.get("language"),
                    contact=contact,
                    contact_statuses=consents.get(key) if key else None,
                    contact_fields=answers.get(key) if key else None,
                    form=query.get("form", "checkout"),
                ))

            return await owners.answer(self, request, envelope.CONSENT_STATE, key, answer)

    @app.page("/v1/fields/validate")
    class ValidateFields(View):
        """Answers checked against the tenant's custom fields, messages in the requested language."""

        async def post(self, request: Request) -> Response:
            try:
                body = await request.json()
            except ValueError:
                body = None
            tenant = body.get("tenant") if isinstance(body, dict) else None
            refused = web.authorize(self, request, settings, tenant if isinstance(tenant, str) else None)
            if refused is not None:
                return refused
            problem = validate_body_problem(body)
            if problem is not None:
                return web.error(self, 400, "invalid_body", problem)
            if not owners.settled():
                return not_settled(self)
            fields = (reference.config(tenant) or rules.empty_config())["fields"]
            errors = validate_answers(fields, body["answers"], body["form"], body.get("language"))
            return self.json({"ok": not errors, "errors": errors})
