"""The messages stage's faust wiring: the sender, the callback and history agents, and the web views.

Where each piece of state lives, and why:
- Reference data (`ticketing.config`: settings, opt-ins, layouts; `ticketing.events`;
  `ticketing.messages`) is read whole by every worker into memory (`Reference`). A tenant's
  `config.layout` is compiled and tried on sample data first; one that does not compile is
  dead-lettered and the previous one stays.
- `messages-ledger` (key `{tenant}/{contact}/{request}`, in the partition of `messages.outbox`'s
  `{tenant}/{contact}`): every request's row with its outcome (`sent`, `failed`, `unknown`). It
  is the never-twice rule and the contact's own message history
  (`GET /v1/contacts/{tenant}/{contact}/messages`, the rows under the contact's prefix). A row
  per request, so a new message writes its own row and not the contact's whole history. A
  request found in the ledger is never handed to a provider again: it gives its status again (the same record, so readers drop it as
  a repeat if it was already out). Statuses from provider callbacks reach the row through
  `usher.messages.by-contact`.
- `messages-in-flight` (one entry per partition): the requests handed to providers and not yet
  in the ledger. Written, and acknowledged by Kafka, before any provider call; cleared once the
  ledger has their outcomes. A request found there (the worker stopped between the provider
  call and the outcome) becomes `unknown` for a person to look at. One entry per partition and
  batch, rather than a `queued` row per request, halves the ledger's writes (see `InFlight`).
- `messages-sends` and `messages-waiting` (keyed by correlation group, as callbacks are on
  `usher.messages.correlated`): what a provider callback needs to know about its request. After
  each provider call the sender sends one `usher.message-correlation` record per call (a
  SendGrid call's recipients share one X-Message-Id; an SMS is a call of its own) naming each
  recipient's address, request, message, contact and channel, keyed by the call's correlation
  group `{tenant}/{provider}/{message id}`. A callback names that message id: one without a
  request id is keyed by its group by the webhooks already; one with a request id (keyed by it,
  as the contract has it) is passed on to `usher.messages.correlated` under its group. So the
  callback agent finds the request in its own partition; a callback that comes before its
  call's record waits. One record per provider call, rather than one per recipient, keeps the
  sending path short.
- `messages-history` (key `{tenant}/{message}`, as `messages.deliveries`): each message's
  summary, each request's row (`{tenant}/{message}/{request}`) and the order the requests came
  in, in chunks (`{tenant}/{message}/#{k}`, so a page is read by number; see `History`). The
  sender and the callback agent send, beside a batch's `delivery.status` records, one
  `usher.message-statuses` per message on `usher.messages.by-message` with what the history needs
  of them, and the history agent reads that: a record per message and batch rather than one
  per status, whose reading (fetch, decode, check, dedupe) cost the stage about 8% of its work
  per mail sent.

A GET about a contact or a message is answered by the worker that owns its partition; another
worker passes the request on to it. A `queued` status is not published: it lives in the ledger.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import faust
import orjson
from faust.stores import rocksdb as faust_rocksdb
from faust.streams import current_event
from faust.types import TP
from faust.web import Request, Response, View

from workers import envelope, schemas, web
from workers.consent.rules import Links
from workers.edge import Accepted, produce, send_to_partition
from workers.owners import Owners
from workers.messages import rules, webhooks
from workers.messages.providers import (
    EmailProvider,
    EmailSend,
    ProviderResult,
    SmsProvider,
    SmsSend,
    make_email_provider,
    make_sms_provider,
)
from workers.messages.render import SAMPLE_CONTACT, LayoutRenderer, RenderError
from workers.stage import FetchAhead, StageContext
from workers.tables import json_bytes

log = logging.getLogger(__name__)

# Created with the contract's topics (workers/topics.py).
CORRELATED = "usher.messages.correlated"
BY_CONTACT = "usher.messages.by-contact"
CORRELATION = "usher.message-correlation"
BY_MESSAGE = "usher.messages.by-message"
STATUSES = "usher.message-statuses"
# What the history keeps of a status (`rules.fold_status`), and how many go in one record: 500 are
# about 100 KB, well within what Kafka takes in a record (1 MB).
HISTORY_FIELDS = ("request", "message", "contact", "channel", "kind", "orders", "status", "at")
STATUSES_PER_RECORD = 500
# Rendering and provider calls keep this stage busy on less fetched ahead than the default, and
# holding less bounds its memory: send bench, 1,000,000 mails, peak 314 -> 273 MB (at 3,958
# mails/s against 4,304; 300,000 mails with the fetch and queue limits alone: 290 -> 267 MB at the
# same rate). With these figures the prompts stage made 12,000 prompts/s instead of 30,000.
FETCH_AHEAD = FetchAhead(partition_bytes=256 * 1024, queued_batches=4, batches=1)

TEST_SOURCE = "/usher/messages/test"
# The contact of a test send, which goes to an address rather than to a contact.
TEST_CONTACT = "test"
QUEUED = "queued"
# Providers with webhooks: only their sends need to be found again from a callback.
CALLBACK_PROVIDERS = frozenset({"sendgrid", "end-user-messaging", "sns"})
# What a callback needs to know about its request, besides the provider's message id.
RECIPIENT_FIELDS = ("request", "message", "contact", "channel", "kind", "orders")
# Callbacks kept per correlation group while its provider call's record has not come.
MAX_WAITING = 100
FETCH_TIMEOUT = aiohttp.ClientTimeout(total=10)
# A message history's order chunks: `{tenant}/{message}/#{k}` (a request id has no `#`).
ORDER_SEPARATOR = "/#"
ORDER_CHUNK = 500


def unknown_reason(provider: str | None) -> str:
    return (
        f"the worker stopped after handing the request to {provider or 'the provider'} and before recording "
        "its answer: it may have been sent, so it is not sent again"
    )


@dataclass
class Tenant:
    settings: dict[str, Any] = field(default_factory=dict)
    optins: dict[str, dict[str, Any]] = field(default_factory=dict)
    layouts: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)


class Reference:
    """What the feed keeps in memory, per tenant."""

    CONFIG_KINDS = ("settings", "optin", "layout")

    def __init__(self, renderer: LayoutRenderer) -> None:
        self.renderer = renderer
        self.tenants: dict[str, Tenant] = defaultdict(Tenant)

    def tenant(self, tenant: str) -> Tenant:
        return self.tenants.get(tenant) or Tenant()

    def apply(self, topic: str, key: str, event: dict[str, Any] | None) -> str | None:
        tenant, _, rest = key.partition("/")
        if topic == envelope.CONFIG:
            return self._config(tenant, rest, event)
        found = self.tenants[tenant].events if topic == envelope.EVENTS else self.tenants[tenant].messages
        if event is None:
            found.pop(rest, None)
            return None
        id_ = event["data"]["event" if topic == envelope.EVENTS else "message"]
        if (tenant, rest) != (event["tenant"], id_):
            return f"key {key!r} is not {event['tenant']}/{id_}"
        if event["type"] in ("event.scheduled", "message.defined"):
            found[id_] = event["data"]
        else:
            found.pop(id_, None)
        return None

    def _config(self, tenant: str, rest: str, event: dict[str, Any] | None) -> str | None:
        kind, _, id_ = rest.partition("/")
        if event is not None:
            expected = (event["tenant"], event["type"].removeprefix("config."), event["data"].get("id", id_))
            if (tenant, kind, id_) != expected:
                return f"key {tenant}/{rest} is not {'/'.join(expected)}"
        if kind not in self.CONFIG_KINDS:
            return None
        config = self.tenants[tenant]
        if kind == "settings":
            config.settings = {} if event is None else event["data"]
        elif kind == "optin":
            if event is None:
                config.optins.pop(id_, None)
            else:
                config.optins[id_] = event["data"]
        else:
            if event is not None:
                problem = self.renderer.compile_layout(event["data"])
                if problem is not None:
                    return f"layout {id_!r} cannot be used, the previous one stays: {problem}"
            self.renderer.forget(tenant, id_)
            if event is None:
                config.layouts.pop(id_, None)
            else:
                config.layouts[id_] = event["data"]
        return None


class BatchedTable(faust.Table):
    """A table whose changelog records go out in batches, and can be awaited.

    Faust sends (and logs) every change on its own, which costs more than the stage's
    own work per record. Here changes are kept until `await table.flush()`, which sends
    the last value of each key changed since, one batch per partition, and returns once
    Kafka has acknowledged them. Call it before the handler returns: its outputs, and
    so the commit of its input offsets, come after. A change goes to the changelog
    partition of the current record, as faust's own does.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # partition -> key -> (key, value) as the changelog carries them (value None: deleted)
        self._changes: dict[int, dict[Any, tuple[bytes, bytes | None]]] = defaultdict(dict)
        # Whether the store is RocksDB with json keys and values (see `_partition_db`); known once it is open.
        self._direct: bool | None = None

    def on_key_set(self, key: Any, value: Any) -> None:
        self._keep_change(key, self.changelog_topic.prepare_value(value, self.value_serializer)[0])

    def on_key_del(self, key: Any) -> None:
        self._keep_change(key, None)

    def _keep_change(self, key: Any, value: bytes | None) -> None:
        """A change made through faust's own path (outside a record's context, another store or
        serializer), encoded as faust's changelog would carry it."""
        self._changes[self.partition_for_key(key)][key] = (self.changelog_topic.prepare_key(key, self.key_serializer)[0], value)

    def __setitem__(self, key: Any, value: Any) -> None:
        event = current_event()
        db = self._partition_db(event)
        if db is None:
            super().__setitem__(key, value)
        else:
            # faust's own path, less its serializer registry: the same bytes, straight to the store,
            # and kept for the changelog (encoded once).
            change = (json_bytes(key), json_bytes(value))
            self._changes[event.message.partition][key] = change
            db.put(*change)

    def value(self, key: Any) -> Any:
        """`self.get(key)` (None when missing) with one store lookup: faust's `get` looks a key up
        twice (`in`, then the value) and raises and catches a KeyError for a missing one. Like
        `__setitem__`, it leaves out faust's per-key statistics, which Usher does not serve."""
        db = self._partition_db(current_event())
        if db is None:
            return self.get(key)
        raw = db.get(json_bytes(key))
        return None if raw is None else self.data._decode_value(raw)

    def _partition_db(self, event: Any) -> Any:
        """The RocksDB of `event`'s partition, as faust's store reads and writes it within a
        record's context, less the key index it keeps (an LRU behind a lock, costing more than
        the lookup): the stage reads its keys in their records' context. None outside a record's
        context (`event` None), for another store, or another serializer than json."""
        if event is None:
            return None
        if self._direct is None:
            self._direct = isinstance(self.data, faust_rocksdb.Store) and self.key_serializer == self.value_serializer == "json"
        return self.data._db_for_partition(event.message.partition) if self._direct else None

    async def flush(self) -> None:
        changes, self._changes = self._changes, defaultdict(dict)
        if not changes:
            return
        producer = self.app.producer._ensure_producer()
        name = self.changelog_topic.get_topic_name()
        sent = []
        for partition, values in changes.items():
            sent += [(partition, count, acknowledgement)
                     for acknowledgement, count in await send_to_partition(producer, name, partition, values.values())]
        for partition, count, acknowledgement in sent:
            metadata = await acknowledgement
            # What faust records per change: a RocksDB store resumes its recovery after this offset.
            self.data.set_persisted_offset(TP(name, partition), metadata.offset + count - 1)


def batched_table(app: faust.App, name: str) -> BatchedTable:
    """`app.Table(name, default=None)`, as a `BatchedTable`."""
    return app.tables.add(BatchedTable(app, name=name, default=None, beacon=app.tables.beacon))


class Ledger:
    """The ledger: `{tenant}/{contact}/{request}` -> the request's row, written in the context of
    a record keyed `{tenant}/{contact}`, so a contact's rows are in its partition."""

    def __init__(self, table: BatchedTable) -> None:
        self.table = table

    def row(self, item: Accepted, key: str, request: str) -> dict[str, Any] | None:
        with item.context():
            return self.table.value(envelope.key(key, request))

    def put(self, item: Accepted, key: str, row: dict[str, Any]) -> None:
        with item.context():
            self.table[envelope.key(key, row["request"])] = row

    def rows_of(self, key: str) -> list[dict[str, Any]]:
        """The rows of contact `key` (outside a record's context: a web view), oldest outcome first."""
        prefix = f"{key}/"
        store = self.table.data
        if isinstance(store, faust_rocksdb.Store):
            # Keys are stored as JSON strings: the prefix is the key's JSON without its closing quote.
            start = json_bytes(prefix)[:-1]
            found = [store._decode_value(value) for db in store._dbs.values()
                     for value in _values_from(db, start)]
        else:
            found = [value for row_key, value in store.data.items() if row_key.startswith(prefix)]
        return sorted(found, key=lambda row: ((row.get("outcome") or row)["at"], row["request"]))


def _values_from(db: Any, prefix: bytes) -> Iterator[bytes]:
    """The values of a RocksDB's keys starting with `prefix` (they are stored in key order)."""
    for stored_key, value in db.items(from_key=prefix):
        if not stored_key.startswith(prefix):
            return
        yield value


class InFlight:
    """The requests of a batch between their hand-over to a provider and their outcome in the
    ledger: `in-flight/{partition}` -> `{"{tenant}/{contact}/{request}": provider}`, the key
    written in a record context of its partition, so it is changelogged with the partition's
    ledger. Each entry is read once a batch and written twice: before the providers are called,
    and after the ledger has the outcomes. A request a failed batch handed over stays in it."""

    def __init__(self, table: BatchedTable) -> None:
        self.table = table
        self._entries: dict[int, tuple[dict[str, str], Accepted]] = {}

    def provider_of(self, item: Accepted, key: str, request: str) -> str | None:
        """The provider a request was handed to by a batch that never recorded the outcome."""
        return self._entry(item).get(envelope.key(key, request))

    async def hand_over(self, sends: Sequence[tuple[Accepted, str, str, str]]) -> None:
        """Records `(item, key, request, provider)` as handed over, durably."""
        for item, key, request, provider in sends:
            self._entry(item)[envelope.key(key, request)] = provider
        await self._write({item.record.message.partition for item, *_ in sends})

    async def recorded(self, sends: Sequence[tuple[Accepted, str, str, str]]) -> None:
        """Call once the ledger's outcomes of `sends` are acknowledged."""
        for item, key, request, _ in sends:
            self._entry(item).pop(envelope.key(key, request), None)
        await self._write({item.record.message.partition for item, *_ in sends})

    def _entry(self, item: Accepted) -> dict[str, str]:
        partition = item.record.message.partition
        found = self._entries.get(partition)
        if found is None:
            with item.context():
                found = self._entries[partition] = (dict(self.table.value(in_flight_key(partition)) or {}), item)
        return found[0]

    async def _write(self, partitions: set[int]) -> None:
        for partition in partitions:
            entry, item = self._entries[partition]
            with item.context():
                self.table[in_flight_key(partition)] = entry
        await self.table.flush()


def in_flight_key(partition: int) -> str:
    # The partition in the key too: a memory:// store holds every partition in one mapping.
    return f"in-flight/{partition}"


def outcome_row(row: dict[str, Any] | None, status: envelope.Out) -> dict[str, Any]:
    """The ledger row once the request's own status (sent, failed, unknown) is known."""
    data = status.event["data"]
    new = rules.fold_recipient(row, data)
    new["outcome"] = {name: data.get(name) for name in ("status", "at", "provider", "provider_id", "error")}
    return new


def queued_row(request: dict[str, Any], provider: str, at: str) -> dict[str, Any]:
    data = request["data"]
    status = {name: data[name] for name in ("request", "message", "contact", "channel", "kind")} | {"status": QUEUED, "at": at}
    return rules.fold_recipient(None, status) | {"provider": provider}


class Sender:
    """The agent on `messages.outbox`: a batch's new requests are planned, marked in flight
    (durably), handed to the providers together, and their outcomes recorded in the ledger."""

    def __init__(self, ctx: StageContext, reference: Reference, renderer: LayoutRenderer, ledger: Ledger,
                 in_flight: BatchedTable, email: EmailProvider, sms: SmsProvider) -> None:
        self.ctx, self.reference, self.renderer, self.ledger, self.in_flight = ctx, reference, renderer, ledger, in_flight
        self.email, self.sms = email, sms
        self.links = Links(secret=ctx.settings.secret, base_url=f"http://{ctx.settings.web_host}:{ctx.settings.web_port}")

    async def handle(self, items: list[Accepted]) -> list[envelope.Out]:
        in_flight = InFlight(self.in_flight)
        outs: list[envelope.Out] = []
        sending: list[tuple[Accepted, str, EmailSend | SmsSend]] = []
        in_batch: set[tuple[str, str]] = set()
        correlated: list[tuple[str, dict[str, Any], str]] = []
        now = envelope.utcnow()
        queued_at = envelope.isotime(now)
        for item in items:
            data = item.data
            key = envelope.contact_key(item.tenant, data["contact"])
            if item.key != key:
                outs.append(self.ctx.edge.reject(f"record key {item.key!r} is not {key!r}", item))
                continue
            if item.event["type"] == "delivery.status":  # a callback's status, for the contact's history
                row = self.ledger.row(item, key, data["request"])
                folded = rules.fold_recipient(row, data)
                if folded != row:
                    self.ledger.put(item, key, folded)
                continue
            if (key, data["request"]) in in_batch:
                continue
            in_batch.add((key, data["request"]))
            row = self.ledger.row(item, key, data["request"])
            if row is None and (provider_name := in_flight.provider_of(item, key, data["request"])) is not None:
                row = queued_row(item.event, provider_name, queued_at)
            if row is not None:
                outs.extend(self._again(item, key, row, correlated, now))
                continue
            plan = self._plan(item, now)
            if isinstance(plan, envelope.Out):
                outs.append(plan)
                self.ledger.put(item, key, outcome_row(None, plan))
                continue
            sending.append((item, key, plan))
        handed_over = [(item, key, plan.request, (self.email if isinstance(plan, EmailSend) else self.sms).name)
                       for item, key, plan in sending]
        if sending:
            # In Kafka before a provider sees anything.
            await in_flight.hand_over(handed_over)
            delivered = await self._deliver(sending)
            answered = envelope.utcnow()  # the providers' answers came together
            for (item, key, plan), result in delivered:
                status = rules.result_status(item.event, result, answered)
                self.ledger.put(item, key, outcome_row(None, status))
                outs.extend(self._sent_records(item, status, correlated, plan.to))
        outs.extend(correlations(correlated))
        outs.extend(history_records(outs))
        # Recorded outcomes are durable before the batch's offsets are committed, and before
        # their requests leave the in-flight entries.
        await self.ledger.table.flush()
        if sending:
            await in_flight.recorded(handed_over)
        return outs

    def _plan(self, item: Accepted, now: Any) -> EmailSend | SmsSend | envelope.Out:
        tenant = self.reference.tenant(item.tenant)
        return rules.plan_send(
            item.event, settings=tenant.settings, renderer=self.renderer, links=self.links, now=now,
            layout=tenant.layouts.get(item.data["layout"]),
        )

    def _again(self, item: Accepted, key: str, row: dict[str, Any],
               correlated: list[tuple[str, dict[str, Any], str]], now: Any) -> list[envelope.Out]:
        """A request already in the ledger is never sent again; it gets its status again,
        or `unknown` when its provider call was never answered (`row` has no outcome)."""
        outcome = row.get("outcome")
        if outcome is None:
            status = rules.delivery_status(item.event, "unknown", at=envelope.isotime(now), provider=row.get("provider"),
                                           error=unknown_reason(row.get("provider")))
            self.ledger.put(item, key, outcome_row(row, status))
            return [status]
        status = rules.delivery_status(item.event, outcome["status"], at=outcome["at"], provider=outcome["provider"],
                                       provider_id=outcome["provider_id"], error=outcome["error"])
        to = item.data.get("to") or {}
        return self._sent_records(item, status, correlated, (to.get("email") or to.get("phone") or "").strip())

    @staticmethod
    def _sent_records(item: Accepted, status: envelope.Out, correlated: list[tuple[str, dict[str, Any], str]],
                      address: str) -> list[envelope.Out]:
        """The request's status; a send a provider will call back about also joins its
        provider call's correlation record."""
        data = status.event["data"]
        if data["status"] == "sent" and data.get("provider") in CALLBACK_PROVIDERS and data.get("provider_id"):
            correlated.append((item.tenant, data, address))
        return [status]

    async def _deliver(
        self, sending: Sequence[tuple[Accepted, str, EmailSend | SmsSend]]
    ) -> list[tuple[tuple[Accepted, str, EmailSend | SmsSend], ProviderResult]]:
        """E-mails and SMS go to their providers at once, each provider getting its whole share."""

        async def hand_over(share: list[tuple[Accepted, str, Any]], send: Callable[[list[Any]], Awaitable[list[ProviderResult]]]
                            ) -> list[tuple[tuple[Accepted, str, Any], ProviderResult]]:
            if not share:
                return []
            return list(zip(share, await send([plan for _, _, plan in share]), strict=True))

        emails = [entry for entry in sending if isinstance(entry[2], EmailSend)]
        texts = [entry for entry in sending if isinstance(entry[2], SmsSend)]
        sent_emails, sent_texts = await asyncio.gather(hand_over(emails, self.email.send_email), hand_over(texts, self.sms.send_sms))
        return sent_emails + sent_texts


def history_records(outs: Sequence[envelope.Out]) -> list[envelope.Out]:
    """The `usher.message-statuses` records of a batch's outputs: its statuses of messages' own
    mails, by message, in the order they are in `outs`. The id is the statuses': a batch
    handled again gives the same records, and the history's folds change nothing the second time
    whatever records they come in."""
    by_message: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for out in outs:
        if out.topic == envelope.DELIVERIES and (key := rules.history_key(out.event["tenant"], out.event["data"])) is not None:
            by_message[key].append(out.event)
    records = []
    for key, events in by_message.items():
        tenant = events[0]["tenant"]
        for start in range(0, len(events), STATUSES_PER_RECORD):
            chunk = events[start : start + STATUSES_PER_RECORD]
            data = {"statuses": [{name: event["data"][name] for name in HISTORY_FIELDS} for event in chunk]}
            id_ = envelope.stable_id(f"usher:message-statuses:{tenant}:{','.join(event['id'] for event in chunk)}")
            records.append(envelope.Out(BY_MESSAGE, key, envelope.make_event(STATUSES, tenant, data, source=rules.SOURCE, id_=id_)))
    return records


def copy(event: dict[str, Any], topic: str, key: str) -> envelope.Out:
    """`event` again for another of this stage's agents. The copy has an id of its own: the
    stage drops a record whose (tenant, source, id) it has handled, whichever topic it came on."""
    return envelope.Out(topic, key, event | {"id": envelope.derived_id(event, topic)})


def correlations(correlated: Sequence[tuple[str, dict[str, Any], str]]) -> list[envelope.Out]:
    """One `usher.message-correlation` per provider call of a batch (correlation group):
    each recipient's address and what a callback needs to know about its request."""
    groups: dict[str, tuple[str, dict[str, Any], list[dict[str, Any]]]] = {}
    for tenant, status, address in correlated:
        group = rules.correlation_group(tenant, status["provider"], status["provider_id"])
        entry = groups.setdefault(group, (tenant, {"provider": status["provider"], "provider_id": status["provider_id"]}, []))
        entry[2].append({"address": address, **{name: status[name] for name in RECIPIENT_FIELDS}})
    return [
        envelope.Out(CORRELATED, group, envelope.make_event(CORRELATION, tenant, {**data, "recipients": recipients}, source=rules.SOURCE))
        for group, (tenant, data, recipients) in groups.items()
    ]


class Callbacks:
    """The agent on `provider.callbacks` and `usher.messages.correlated`: a provider's report
    becomes its request's `delivery.status` (an unsubscribe also revokes the consent).

    Everything about a callback is found under its correlation group. A callback that names
    its request (keyed by it, as the contract has it) is first passed on there; one that
    does not is already keyed by its group. `messages-sends` holds each recipient of a
    provider call, `{correlation key: {request: subject}}` (two requests to one address in
    one call stay apart); callbacks that come before their call's correlation record wait
    in `messages-waiting`, under the group."""

    def __init__(self, ctx: StageContext, reference: Reference, sends: BatchedTable, waiting: BatchedTable) -> None:
        self.ctx, self.reference, self.sends, self.waiting = ctx, reference, sends, waiting

    async def handle(self, items: list[Accepted]) -> list[envelope.Out]:
        outs = []
        for item in items:
            with item.context():
                outs.extend(self._one(item))
        outs.extend(history_records(outs))
        await asyncio.gather(self.sends.flush(), self.waiting.flush())
        return outs

    def _one(self, item: Accepted) -> list[envelope.Out]:
        if item.event["type"] == CORRELATION:
            return self._correlation(item)
        reported = item.event
        if item.record.message.topic == envelope.CALLBACKS:
            expected = rules.callback_key(reported)
            if item.key != expected:
                return [self.ctx.edge.reject(f"record key {item.key!r} is not {expected!r}", item)]
            if reported["data"]["request"] is not None:
                group = rules.callback_correlation_group(reported)
                if group is None:
                    log.warning("messages: a %s callback names no message id: left out", reported["data"]["provider"])
                    return []
                return [copy(reported, CORRELATED, group)]
        group = rules.callback_correlation_group(reported)
        if item.key != group:
            return [self.ctx.edge.reject(f"record key {item.key!r} is not {group!r}", item)]
        subject = self._subject(reported)
        if subject is None:
            self.waiting[group] = [*(self.waiting.value(group) or ()), reported][-MAX_WAITING:]
            return []
        return self._statuses(reported, subject)

    def _subject(self, reported: dict[str, Any]) -> dict[str, Any] | None:
        """What was sent to the callback's recipient: the request it names, else the one request sent there."""
        requests = self.sends.value(rules.callback_correlation_key(reported)) or {}
        request = reported["data"]["request"]
        if request is not None:
            return requests.get(request)
        return next(iter(requests.values())) if len(requests) == 1 else None

    def _statuses(self, reported: dict[str, Any], subject: dict[str, Any]) -> list[envelope.Out]:
        records = rules.callback_records(reported, subject, self.reference.tenant(reported["tenant"]).optins)
        contact = envelope.contact_key(reported["tenant"], subject["contact"])
        copies = [copy(record.event, BY_CONTACT, contact) for record in records if record.topic == envelope.DELIVERIES]
        return records + copies

    def _correlation(self, item: Accepted) -> list[envelope.Out]:
        data = item.data
        group = rules.correlation_group(item.tenant, data["provider"], data["provider_id"])
        if item.key != group:
            return [self.ctx.edge.reject(f"record key {item.key!r} is not {group!r}", item)]
        # A key names this provider call, so only this record writes it (read again, it writes the
        # same): the entries are made here whole, without reading what the table holds.
        sent_to: dict[str, dict[str, Any]] = defaultdict(dict)
        provider, provider_id = data["provider"], data["provider_id"]
        for recipient in data["recipients"]:
            subject = {name: recipient[name] for name in RECIPIENT_FIELDS}
            subject["provider_id"] = provider_id
            sent_to[rules.recipient_key(group, provider, recipient["address"])][recipient["request"]] = subject
        for key, requests in sent_to.items():
            self.sends[key] = requests
        waiting = self.waiting.value(group)
        if not waiting:
            return []
        outs, still = [], []
        for reported in waiting:
            subject = self._subject(reported)
            if subject is None:
                still.append(reported)
            else:
                outs.extend(self._statuses(reported, subject))
        self.waiting[group] = still
        return outs


class History:
    """The agent on `usher.messages.by-message`: folds each message's statuses into its history.

    Under `{tenant}/{message}` the table holds the message's summary; under
    `{tenant}/{message}/{request}` each request's row; and under `{tenant}/{message}/#{k}` the
    requests numbered `k * ORDER_CHUNK` on, in order of arrival, so a page is read by number.
    A batch writes each touched summary and order chunk once: a first status costs its row, not
    a row and a number of its own."""

    def __init__(self, ctx: StageContext, table: BatchedTable) -> None:
        self.ctx, self.table = ctx, table

    async def handle(self, items: list[Accepted]) -> list[envelope.Out]:
        outs = []
        # Each message's summary as folded so far, and the batch's last record of the message;
        # each order chunk as the batch has extended it, with the record that last did.
        summaries: dict[str, tuple[dict[str, Any], Accepted]] = {}
        chunks: dict[str, tuple[list[str], Accepted]] = {}
        for item in items:
            summary_key, statuses = item.key, item.data["statuses"]
            tenant, _, message = summary_key.partition("/")
            if tenant != item.tenant or any(status["message"] != message for status in statuses):
                outs.append(self.ctx.edge.reject(f"record key {item.key!r} is not {item.tenant}/{{message}} of each status", item))
                continue
            with item.context():
                summary = summaries[summary_key][0] if summary_key in summaries else self.table.value(summary_key)
                summaries[summary_key] = (self._fold(item, summary, chunks), item)
        for key, (value, item) in [*summaries.items(), *chunks.items()]:
            with item.context():
                self.table[key] = value
        await self.table.flush()
        return outs

    def _fold(self, item: Accepted, summary: dict[str, Any] | None, chunks: dict[str, tuple[list[str], Accepted]]) -> dict[str, Any]:
        """Folds the statuses of record `item` (in its context) into the rows and `summary`; a
        request seen for the first time joins its order chunk in `chunks`. Returns the summary."""
        summary_key = item.key
        for status in item.data["statuses"]:
            row_key = envelope.key(summary_key, status["request"])
            row = self.table.value(row_key)
            summary, new_row = rules.fold_status(summary, row, status)
            if new_row != row:
                self.table[row_key] = new_row
            if row is None:
                key = order_chunk_key(summary_key, (summary["recipients"] - 1) // ORDER_CHUNK)
                order = chunks[key][0] if key in chunks else list(self.table.value(key) or ())
                order.append(status["request"])
                chunks[key] = (order, item)
        return summary

    def page(self, tenant: str, message: str, page: int, size: int) -> dict[str, Any]:
        summary_key = envelope.key(tenant, message)
        summary = self.table.get(summary_key)
        count = summary["recipients"] if summary else 0
        first, end = (page - 1) * size, min(page * size, count)
        requests: list[str] = []
        if end > first:  # the order chunks holding numbers first .. end - 1
            for chunk in range(first // ORDER_CHUNK, (end - 1) // ORDER_CHUNK + 1):
                order = self.table.get(order_chunk_key(summary_key, chunk)) or []
                requests += order[max(0, first - chunk * ORDER_CHUNK) : end - chunk * ORDER_CHUNK]
        rows = [self.table.get(envelope.key(summary_key, request)) for request in requests]
        # The rows are the page already, read by their numbers.
        return rules.history_page(summary, [row for row in rows if row], page=1, size=size, message=message)


def order_chunk_key(summary_key: str, chunk: int) -> str:
    return f"{summary_key}{ORDER_SEPARATOR}{chunk}"


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _tenant_hint(request: Request) -> str | None:
    """The `?tenant=` of a webhook URL set up for one tenant's provider account."""
    tenant = request.query.get("tenant")
    return tenant if tenant and envelope.ID_PATTERN.fullmatch(tenant) else None


async def _json_object(view: View, request: Request) -> dict[str, Any] | Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return web.error(view, 400, "bad_request", "The body must be JSON.")
    if not isinstance(body, dict):
        return web.error(view, 400, "bad_request", "The body must be a JSON object.")
    return body


PREVIEW_FIELDS = {"layout": str, "language": str, "channel": str, "custom_text": str, "vars": dict, "contact": dict,
                  "event": (str, dict)}


def preview_problem(body: dict[str, Any]) -> str | None:
    """Why a preview request cannot be answered, or None."""
    if not isinstance(body.get("layout"), str):
        return "Name the `layout`."
    wrong = [name for name, kinds in PREVIEW_FIELDS.items() if body.get(name) is not None and not isinstance(body[name], kinds)]
    if wrong:
        return (f"Wrong type for {', '.join(wrong)}: `language`, `channel` and `custom_text` are text, `vars` and `contact` "
                "objects, `event` an event id or an object like event.scheduled's data.")
    return None


def request_for_test_send(tenant: str, definition: dict[str, Any], tenant_config: Tenant, to: dict[str, Any],
                 language: Any) -> dict[str, Any]:
    """The `message.requested` of a test send of a message, filled like a preview."""
    channel = definition["channel"]
    field_name = "email" if channel == "email" else "phone"
    send_in = (definition.get("language") or {}).get("send_in")
    event = tenant_config.events.get(definition["event"]) or {}
    request = uuid.uuid4().hex
    data = {
        "request": request,
        "kind": rules.TEST_KIND,
        "message": definition["message"],
        "contact": TEST_CONTACT,
        "channel": channel,
        "to": {field_name: to.get(field_name)},
        "layout": definition["layout"],
        "language": language or (send_in if send_in != "customer" else None)
        or tenant_config.settings.get("default_language") or "en",
        "vars": {
            "custom_text": definition.get("custom_text") or "",
            "first_name": SAMPLE_CONTACT["first_name"],
            "last_name": SAMPLE_CONTACT["last_name"],
            "event": {name: event.get(name) for name in ("event", "name", "starts_at", "ends_at", "timezone")},
        },
    }
    return envelope.make_event("message.requested", tenant, data, source=TEST_SOURCE, id_=request)


def register(app: faust.App, ctx: StageContext) -> None:
    settings = ctx.settings
    renderer = LayoutRenderer()
    reference = Reference(renderer)
    ctx.feed([envelope.CONFIG, envelope.EVENTS, envelope.MESSAGES], reference.apply)

    email = make_email_provider(settings.email_provider, outbox_dir=settings.outbox_dir, sendgrid_api_key=settings.sendgrid_api_key,
                                sendgrid_host=settings.sendgrid_host, rate_per_s=settings.email_rate_per_s)
    sms = make_sms_provider(settings.sms_provider, outbox_dir=settings.outbox_dir, aws_region=settings.aws_region,
                            rate_per_s=settings.sms_rate_per_s)
    ledger = Ledger(batched_table(app, f"{ctx.name}-ledger"))
    sender = Sender(ctx, reference, renderer, ledger, batched_table(app, f"{ctx.name}-in-flight"), email, sms)
    ctx.edge.subscribe("outbox", [envelope.OUTBOX, BY_CONTACT], on_batch=sender.handle)

    callbacks = Callbacks(ctx, reference, batched_table(app, f"{ctx.name}-sends"), batched_table(app, f"{ctx.name}-waiting"))
    ctx.edge.subscribe("callbacks", [envelope.CALLBACKS, CORRELATED], on_batch=callbacks.handle)

    history = History(ctx, batched_table(app, f"{ctx.name}-history"))
    ctx.edge.subscribe("history", [BY_MESSAGE], on_batch=history.handle, items_per_record=STATUSES_PER_RECORD)

    owners = Owners(app, ctx.edge.waits)
    register_views(app, ctx, reference, renderer, ledger, history, owners)
    register_webhooks(app, ctx)


def register_views(app: faust.App, ctx: StageContext, reference: Reference, renderer: LayoutRenderer,
                   ledger: Ledger, history: History, owners: Owners) -> None:
    settings = ctx.settings

    @app.page("/v1/messages/{tenant}/{message}/history")
    class MessageHistory(View):
        async def get(self, request: Request, tenant: str, message: str) -> Response:
            page, size = web.paging(request)
            return await owners.answer_for_tenant(self, request, settings, tenant, BY_MESSAGE, envelope.key(tenant, message),
                                                  lambda: self.json(history.page(tenant, message, page, size)))

    @app.page("/v1/contacts/{tenant}/{contact}/messages")
    class ContactMessages(View):
        async def get(self, request: Request, tenant: str, contact: str) -> Response:
            page, size = web.paging(request)
            key = envelope.contact_key(tenant, contact)

            def answer() -> Response:
                return self.json(rules.contact_history_page(contact, ledger.rows_of(key), page=page, size=size))

            return await owners.answer_for_tenant(self, request, settings, tenant, envelope.OUTBOX, key, answer)

    @app.page("/v1/layouts/preview")
    class LayoutPreview(View):
        async def post(self, request: Request) -> Response:
            body = await _json_object(self, request)
            if isinstance(body, Response):
                return body
            tenant = body.get("tenant")
            refused = web.authorize(self, request, settings, tenant if isinstance(tenant, str) else None)
            if refused is not None:
                return refused
            problem = preview_problem(body)
            if problem is not None:
                return web.error(self, 400, "bad_request", problem)
            config = reference.tenant(tenant)
            layout_id, event = body["layout"], body.get("event")
            if isinstance(event, str):
                if event not in config.events:
                    return web.error(self, 404, "unknown_event", f"Tenant {tenant!r} has no event {event!r}.")
                event = config.events[event]
            try:
                return self.json(rules.preview(
                    renderer, tenant=tenant, layout_id=layout_id, settings=config.settings, language=body.get("language"),
                    channel=body.get("channel"), layout=config.layouts.get(layout_id), custom_text=body.get("custom_text") or "",
                    contact=body.get("contact"), event=event, request_vars=body.get("vars"),
                ))
            except RenderError as error:
                return web.error(self, 422, "layout_error", str(error))

    @app.page("/v1/messages/{tenant}/{message}/test")
    class TestSend(View):
        async def post(self, request: Request, tenant: str, message: str) -> Response:
            refused = web.authorize(self, request, settings, tenant)
            if refused is not None:
                return refused
            body = await _json_object(self, request)
            if isinstance(body, Response):
                return body
            config = reference.tenant(tenant)
            definition = config.messages.get(message)
            if definition is None:
                return web.error(self, 404, "unknown_message", f"Tenant {tenant!r} has no message {message!r}.")
            to = body.get("to")
            field_name = "email" if definition["channel"] == "email" else "phone"
            if not isinstance(to, dict) or not to.get(field_name):
                return web.error(self, 400, "bad_request", f"The message goes by {definition['channel']}: give `to.{field_name}`.")
            event = request_for_test_send(tenant, definition, config, to, body.get("language"))
            problem = schemas.problem(event)
            if problem is not None:
                return web.error(self, 400, "bad_request", problem)
            await produce(app, [envelope.Out(envelope.OUTBOX, envelope.contact_key(tenant, TEST_CONTACT), event)], ctx.name)
            return self.json({"request": event["data"]["request"]}, status=202)


def register_webhooks(app: faust.App, ctx: StageContext) -> None:
    """`POST /v1/webhooks/sendgrid` and `POST /v1/webhooks/sms`: they only check the call and
    write `provider.callbacks`, so a slow stage never loses a callback."""
    settings = ctx.settings
    try:
        verifier = webhooks.SendGridVerifier(settings.sendgrid_webhook_public_key) if settings.sendgrid_webhook_public_key else None
    except ValueError as error:
        raise ValueError(f"USHER_SENDGRID_WEBHOOK_PUBLIC_KEY is not a public key: {error}") from None
    trusted = _csv(settings.sns_trusted_urls)
    topic_arns = _csv(settings.sns_topic_arns)
    certificates: dict[str, bytes] = {}

    async def fetch(url: str) -> bytes:
        async with app.http_client.get(url, timeout=FETCH_TIMEOUT) as response:
            response.raise_for_status()
            return await response.read()

    @app.page("/v1/webhooks/sendgrid")
    class SendGridWebhook(View):
        async def post(self, request: Request) -> Response:
            body = await request.read()
            try:
                if verifier is None:
                    raise webhooks.WebhookRefused("no SendGrid webhook public key is set up (USHER_SENDGRID_WEBHOOK_PUBLIC_KEY)")
                verifier.verify(body, request.headers.get(webhooks.SENDGRID_SIGNATURE), request.headers.get(webhooks.SENDGRID_TIMESTAMP))
            except webhooks.WebhookRefused as refused:
                return web.error(self, 403, "forbidden", str(refused))
            try:
                outs = webhooks.sendgrid_reports(orjson.loads(body), _tenant_hint(request), envelope.utcnow())
            except (orjson.JSONDecodeError, webhooks.WebhookRefused):
                return web.error(self, 400, "bad_request", "SendGrid posts a JSON array of events.")
            await produce(app, outs, ctx.name)
            return self.json({"accepted": len(outs)})

    @app.page("/v1/webhooks/sms")
    class SmsWebhook(View):
        async def post(self, request: Request) -> Response:
            body = await request.read()
            try:
                message = webhooks.sns_message(body, topic_arns)
                certificate_url = message.get("SigningCertURL")
                if not webhooks.trusted_url(certificate_url, trusted):
                    raise webhooks.WebhookRefused("the signing certificate is not on a trusted host")
                if certificate_url not in certificates:
                    certificates[certificate_url] = await fetch(certificate_url)
                webhooks.verify_sns(message, certificates[certificate_url])
            except webhooks.WebhookRefused as refused:
                return web.error(self, 403, "forbidden", str(refused))
            except aiohttp.ClientError as error:
                return web.error(self, 503, "unavailable", f"The signing certificate could not be fetched: {error}")
            if message["Type"] == "SubscriptionConfirmation":
                if not webhooks.trusted_url(message["SubscribeURL"], trusted):
                    return web.error(self, 403, "forbidden", "the subscription URL is not on a trusted host")
                try:
                    await fetch(message["SubscribeURL"])
                except aiohttp.ClientError as error:
                    return web.error(self, 503, "unavailable", f"The subscription could not be confirmed: {error}")
                log.info("messages: confirmed the SNS subscription to %s", message["TopicArn"])
                return self.json({"confirmed": message["TopicArn"]})
            if message["Type"] == "Notification":
                outs = webhooks.sms_reports(message, _tenant_hint(request), envelope.utcnow())
                await produce(app, outs, ctx.name)
                return self.json({"accepted": len(outs)})
            return self.json({"accepted": 0})
