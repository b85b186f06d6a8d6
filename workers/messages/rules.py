"""The messages stage's decisions, as pure functions (no I/O, no clock: `now` is passed in).

- `plan_send`: a `message.requested` with the tenant's settings and layout becomes
  an `EmailSend` / `SmsSend` for the provider, or a `delivery.status` `failed`
  saying why (no address, an invalid phone number, a layout that does not render).
- `result_status`: a provider's answer becomes a `delivery.status`.
- `callback_records`: a provider callback (`delivery.reported`) becomes a
  `delivery.status`, and an unsubscribe also revokes the consent.
- `callback_correlation_key` / `correlation_key`: finding a callback's request
  when the provider did not pass the request id back.
- `fold_status` / `history_page` / `contact_history_page`: the send history.
- `preview`: a layout filled with a real or sample contact and event.

`delivery.status` records carry two fields beyond the contract's list, `kind`
and `orders` (the number of orders the recipient was mailed for), so the history
can tell a message's own mails from tests and count the orders mailed.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from itertools import islice
from typing import Any

from workers.consent.rules import Links, unsubscribe_commands
from workers.consent.tokens import UNSUBSCRIBE_PATH, UnsubscribeClaims, link, make_unsubscribe_token
from workers.envelope import DELIVERIES, Out, derived_id, isotime, isotime_of, key, make_event, parse_time, stable_id
from workers.messages.providers import EmailSend, ProviderResult, SmsSend, e164
from workers.messages.render import (
    SAMPLE_CONTACT,
    SAMPLE_EVENT,
    SAMPLE_SENDER,
    SAMPLE_VARS,
    LayoutRenderer,
    RenderError,
    language_chain,
    layout_variables,
)

SOURCE = "/usher/messages"
MARKETING_KIND = "event-message"
TEST_KIND = "test"
TEST_PREFIX = "[TEST] "
# Links a test send shows when its request has none (it goes to an arbitrary address, not a contact).
TEST_LINK = "#"
# One address, nothing a mail header could read as a second recipient or a new line.
EMAIL_ADDRESS = re.compile(r"[^@\s<>,;:\"()\[\]\\]+@[^@\s<>,;:\"()\[\]\\]+")
MAX_PAGE_SIZE = 1000

# SendGrid event -> delivery.status. `processed` only repeats what `sent` says.
SENDGRID_STATUSES = {
    "delivered": "delivered",
    "open": "opened",
    "click": "clicked",
    "bounce": "bounced",
    "dropped": "dropped",
    "deferred": "deferred",
    "spamreport": "spam",
    "unsubscribe": "unsubscribed",
    "group_unsubscribe": "unsubscribed",
}
# AWS End User Messaging `eventType`s and SNS delivery log `status`es. Depending
# on the country AWS reports a delivery as TEXT_DELIVERED or TEXT_SUCCESSFUL.
AWS_DELIVERED = frozenset({"TEXT_DELIVERED", "TEXT_SUCCESSFUL", "SUCCESS"})
AWS_IN_FLIGHT = frozenset({"TEXT_QUEUED", "TEXT_PENDING"})

# How far along a message is; the history shows each recipient's furthest status
# (providers' clocks and ours disagree too much to order by time alone).
PROGRESS = {
    "queued": 0,
    "unknown": 1,
    "sent": 2,
    "deferred": 3,
    "delivered": 4,
    "bounced": 4,
    "dropped": 4,
    "failed": 4,
    "opened": 5,
    "clicked": 6,
    "spam": 7,
    "unsubscribed": 8,
}


def plan_send(
    request: Mapping[str, Any],
    *,
    settings: Mapping[str, Any],
    renderer: LayoutRenderer,
    links: Links,
    now: datetime,
    layout: Mapping[str, Any] | None = None,
    contact: Mapping[str, Any] | None = None,
    event: Mapping[str, Any] | None = None,
) -> EmailSend | SmsSend | Out:
    """What to send for a `message.requested`, or its `delivery.status` failed.

    `settings` is the tenant's `config.settings` data and `layout` the tenant's own
    `config.layout` data for the request's layout (None: the default). Names,
    event and custom text come from the request's `vars` (as the consent and
    segments stages write them); `contact` (`contact.profile` data) and `event`
    (`event.scheduled` data) override them when given. A marketing mail
    (`vars.marketing`) gets an unsubscribe link signed with `links`."""
    data = request["data"]
    kind, channel = data["kind"], data["channel"]
    to = data.get("to") or {}
    sender = settings.get("sender") or {}
    if channel == "email":
        address = (to.get("email") or "").strip()
        if not address:
            return failed_status(request, "no e-mail address", now)
        if not EMAIL_ADDRESS.fullmatch(address):
            return failed_status(request, f"invalid e-mail address {address!r}", now)
        if not sender.get("email"):
            return failed_status(request, "the tenant's settings name no sender e-mail address", now)
    else:
        phone = (to.get("phone") or "").strip()
        if not phone:
            return failed_status(request, "no phone number", now)
        address = e164(phone)
        if address is None:
            return failed_status(request, f"invalid phone number {phone!r}", now)

    request_vars = dict(data.get("vars") or {})
    if kind == MARKETING_KIND and request_vars.get("marketing") and not request_vars.get("unsubscribe_url"):
        request_vars["unsubscribe_url"] = unsubscribe_url(request, settings, links, now)
    if kind == TEST_KIND:
        request_vars.setdefault("confirm_url", TEST_LINK)
        request_vars.setdefault("unsubscribe_url", TEST_LINK)
    profile = {
        "email": to.get("email"),
        "phone": to.get("phone"),
        "first_name": request_vars.get("first_name"),
        "last_name": request_vars.get("last_name"),
        **{name: value for name, value in (contact or {}).items() if value},
    }
    event = event or (request_vars["event"] if isinstance(request_vars.get("event"), Mapping) else None)

    def variables_for(language: str) -> dict[str, Any]:
        return layout_variables(
            language=language,
            contact=profile,
            event=event,
            sender=sender,
            custom_text=request_vars.get("custom_text") or "",
            extra=request_vars,
        )

    languages = language_chain(data.get("language"), settings.get("default_language"))
    try:
        rendered = renderer.render(
            request["tenant"], data.get("layout") or kind, channel, languages, variables_for, override=layout,
            personal=_personal_variables(request_vars),
        )
    except RenderError as error:
        return failed_status(request, str(error), now)

    prefix = TEST_PREFIX if kind == TEST_KIND else ""
    if channel == "sms":
        return SmsSend(
            request=data["request"],
            tenant=request["tenant"],
            to=address,
            sender=settings.get("sms_sender"),
            text=prefix + rendered.text,
            marketing=bool(request_vars.get("marketing")),
        )
    return EmailSend(
        request=data["request"],
        tenant=request["tenant"],
        to=address,
        sender_email=sender["email"],
        sender_name=sender.get("name") or "",
        subject=prefix + (rendered.subject or ""),
        html_body=rendered.html_body or "",
        text_body=rendered.text_body,
        substitutions=rendered.substitutions or {},
        unsubscribe_url=request_vars.get("unsubscribe_url") if kind == MARKETING_KIND else None,
        test=kind == TEST_KIND,
        # For a provider to factor a mail rendered on its own; one rendered once is factored already.
        personal=() if rendered.substitutions else _personal_values(profile, request_vars),
    )


def unsubscribe_url(request: Mapping[str, Any], settings: Mapping[str, Any], links: Links, now: datetime) -> str:
    """The one-click unsubscribe link of a marketing message, for the consent stage's page."""
    data = request["data"]
    claims = UnsubscribeClaims(request["tenant"], data["contact"], data["channel"], data["request"])
    return link(settings.get("public_url") or links.base_url, UNSUBSCRIBE_PATH, make_unsubscribe_token(claims, links.secret, now))


# The layout variables of a contact that differ from one recipient to the next.
_PERSONAL_CONTACT_VARIABLES = frozenset(f"contact.{name}" for name in ("first_name", "last_name", "name", "email", "phone"))


def _personal_vars(request_vars: Mapping[str, Any]) -> list[str]:
    """The request's `vars` that differ from one recipient to the next: its texts (links, names),
    but the custom text, the same for every recipient of a message."""
    return [name for name, value in request_vars.items() if isinstance(value, str) and name != "custom_text"]


def _personal_variables(request_vars: Mapping[str, Any]) -> frozenset[str]:
    """The layout variables that differ from one recipient to the next (see `LayoutRenderer.render`):
    the contact's, and the request's personal `vars`."""
    return _with_contact_variables(tuple(_personal_vars(request_vars)))


@lru_cache(maxsize=256)  # a message's requests name the same vars: one set, its hash computed once
def _with_contact_variables(names: tuple[str, ...]) -> frozenset[str]:
    return _PERSONAL_CONTACT_VARIABLES.union(names)


def _personal_values(profile: Mapping[str, Any], request_vars: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The values that differ from one recipient to the next, named by role."""
    first, last = profile.get("first_name") or "", profile.get("last_name") or ""
    values = {f"contact.{name}": str(profile.get(name) or "") for name in ("first_name", "last_name", "email", "phone")}
    values["contact.name"] = f"{first} {last}".strip()
    values.update((f"vars.{name}", request_vars[name]) for name in _personal_vars(request_vars))
    return tuple((role, value) for role, value in values.items() if value)


def preview(
    renderer: LayoutRenderer,
    *,
    tenant: str,
    layout_id: str,
    settings: Mapping[str, Any],
    language: str | None = None,
    channel: str | None = None,
    layout: Mapping[str, Any] | None = None,
    custom_text: str = "",
    contact: Mapping[str, Any] | None = None,
    event: Mapping[str, Any] | None = None,
    request_vars: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`POST /v1/layouts/preview`: the layout with every variable filled, from the
    given contact, event and vars, else from samples. Raises RenderError."""
    channel = channel or (layout or {}).get("channel") or "email"

    def variables_for(lang: str) -> dict[str, Any]:
        return layout_variables(
            language=lang,
            contact=contact or SAMPLE_CONTACT,
            event=event or SAMPLE_EVENT,
            sender=settings.get("sender") or SAMPLE_SENDER,
            custom_text=custom_text,
            extra={**SAMPLE_VARS, **(request_vars or {})},
        )

    languages = language_chain(language, settings.get("default_language"))
    rendered = renderer.render(tenant, layout_id, channel, languages, variables_for, override=layout)
    if channel == "sms":
        return {"text": rendered.text, "segments": rendered.segments}
    return {"subject": rendered.subject, "html": rendered.html, "text": rendered.text}


def delivery_status(
    request: Mapping[str, Any],
    status: str,
    *,
    at: str,
    provider: str | None = None,
    provider_id: str | None = None,
    error: str | None = None,
) -> Out:
    """The `delivery.status` of a `message.requested` (one per request and status,
    so a redelivered request yields the same record)."""
    data = request["data"]
    subject = {
        "request": data["request"],
        "message": data.get("message"),
        "contact": data["contact"],
        "channel": data["channel"],
        "kind": data["kind"],
        "orders": _order_count(data.get("vars") or {}),
    }
    return _status_record(
        request["tenant"],
        subject,
        status,
        at=at,
        provider=provider,
        provider_id=provider_id,
        error=error,
        id_=request_status_id(request["tenant"], data["request"], status),
    )


def request_status_id(tenant: str, request: str, status: str) -> str:
    """The CloudEvent id of a request's own status: the same for every copy of the
    request, so a status given again (a request published twice, a batch
    redelivered after a crash) is the same record, which readers drop as a repeat."""
    return stable_id(f"usher:delivery.status:{tenant}/{request}/{status}")


def failed_status(request: Mapping[str, Any], error: str, now: datetime) -> Out:
    return delivery_status(request, "failed", at=isotime_of(now), error=error)


def result_status(request: Mapping[str, Any], result: ProviderResult, now: datetime) -> Out:
    """What a provider answered for a request: sent, failed or unknown."""
    return delivery_status(
        request, result.status, at=isotime_of(now), provider=result.provider, provider_id=result.provider_id,
        error=result.error,
    )


def _order_count(request_vars: Mapping[str, Any]) -> int:
    orders = request_vars.get("orders")
    if isinstance(orders, list):
        return len(orders)
    return orders if isinstance(orders, int) else 0


def _status_record(
    tenant: str,
    subject: Mapping[str, Any],
    status: str,
    *,
    at: str,
    provider: str | None,
    provider_id: str | None,
    error: str | None,
    id_: str,
) -> Out:
    data = {
        "request": subject["request"],
        "message": subject.get("message"),
        "contact": subject["contact"],
        "channel": subject["channel"],
        "status": status,
        "provider_id": provider_id,
        "at": at,
        "error": error,
        "kind": subject.get("kind"),
        "orders": subject.get("orders") or 0,
    }
    if provider:  # a request that never reached a provider names none
        data["provider"] = provider
    return Out(DELIVERIES, status_key(tenant, data), make_event("delivery.status", tenant, data, source=SOURCE, id_=id_, time=at))


def status_key(tenant: str, status: Mapping[str, Any]) -> str:
    """`{tenant}/{message}` for a message's own mails (`history_key`), `{tenant}/{kind}` for the rest."""
    return history_key(tenant, status) or key(tenant, status.get("kind") or status["request"])


def callback_status(reported: Mapping[str, Any]) -> tuple[str, str | None] | None:
    """(status, error) for a `delivery.reported`, or None when it changes nothing
    (SendGrid's `processed`, AWS's queued and pending, events not known here).
    `event` is SendGrid's `event`, End User Messaging's `eventType` or SNS's `status`."""
    data = reported["data"]
    raw = data.get("raw") or {}
    name = data.get("event") or ""
    if data.get("provider") == "sendgrid":
        status = SENDGRID_STATUSES.get(name)
        if status is None:
            return None
        error = raw.get("reason") or raw.get("response") if status in ("bounced", "dropped", "deferred") else None
        return status, error
    if name in AWS_DELIVERED:
        return "delivered", None
    if name in AWS_IN_FLIGHT or not (name.startswith("TEXT_") or name == "FAILURE"):
        return None
    response = (raw.get("delivery") or {}).get("providerResponse")
    return "failed", raw.get("messageStatusDescription") or response or name


def callback_records(
    reported: Mapping[str, Any], request_status: Mapping[str, Any], optins: Mapping[str, Mapping[str, Any]]
) -> list[Out]:
    """What a provider callback means for its request.

    `request_status` is a `delivery.status` data already recorded for the same
    request (the one written when it was sent), which names its message,
    contact and channel. `optins` are the tenant's `config.optin` data by id: an
    unsubscribe revokes every opt-in whose purpose is the message's channel, as
    the unsubscribe page does."""
    mapped = callback_status(reported)
    if mapped is None:
        return []
    status, error = mapped
    data = reported["data"]
    at = _instant(data.get("at")) or reported["time"]
    records = [
        _status_record(
            reported["tenant"],
            request_status,
            status,
            at=at,
            provider=data.get("provider"),
            provider_id=data.get("provider_id") or request_status.get("provider_id"),
            error=error,
            id_=derived_id(reported, "delivery.status"),
        )
    ]
    if status == "unsubscribed":
        raw = data.get("raw") or {}
        claims = UnsubscribeClaims(
            reported["tenant"], request_status["contact"], request_status["channel"], request_status["request"]
        )
        records += unsubscribe_commands(claims, optins, raw.get("ip"), raw.get("useragent"), parse_time(at))
    return records


def _instant(value: Any) -> str | None:
    """A callback's time as Usher writes times, whatever form the provider used."""
    try:
        return isotime(parse_time(value)) if isinstance(value, str) and value else None
    except ValueError:
        return None


def correlation_group(tenant: str, provider: str, provider_id: str) -> str:
    """What the recipients of one provider call share: SendGrid gives every recipient
    of one request the same X-Message-Id (its events carry it as the start of
    `sg_message_id`); an SMS is one message."""
    if provider == "sendgrid":
        return key(tenant, provider, provider_id.partition(".")[0])
    return key(tenant, provider, provider_id)


def correlation_key(tenant: str, provider: str, provider_id: str, address: str | None = None) -> str:
    """Where a sent message is found again from a callback that carries no request
    id: its `correlation_group`, and for SendGrid the address telling its recipients apart."""
    return recipient_key(correlation_group(tenant, provider, provider_id), provider, address)


def recipient_key(group: str, provider: str, address: str | None) -> str:
    """`correlation_key` of one of the recipients of correlation group `group`."""
    return key(group, (address or "").lower()) if provider == "sendgrid" else group


def _callback_provider_id(data: Mapping[str, Any]) -> str | None:
    raw = data.get("raw") or {}
    return data.get("provider_id") or raw.get("sg_message_id") or raw.get("messageId")


def callback_correlation_group(reported: Mapping[str, Any]) -> str | None:
    data = reported["data"]
    provider_id = _callback_provider_id(data)
    return correlation_group(reported["tenant"], data.get("provider") or "", provider_id) if provider_id else None


def callback_correlation_key(reported: Mapping[str, Any]) -> str | None:
    data = reported["data"]
    provider_id = _callback_provider_id(data)
    if not provider_id:
        return None
    address = (data.get("raw") or {}).get("email")
    return correlation_key(reported["tenant"], data.get("provider") or "", provider_id, address)


def callback_key(reported: Mapping[str, Any]) -> str | None:
    """The `provider.callbacks` key of a callback: `{tenant}/{request}`. One without a
    request id goes under its correlation group, where the stage finds its request;
    None when it has neither (nothing could ever match it)."""
    request = reported["data"].get("request")
    return key(reported["tenant"], request) if request else callback_correlation_group(reported)


def history_key(tenant: str, status: Mapping[str, Any]) -> str | None:
    """`{tenant}/{message}`, under which a status (`delivery.status` data) of a message's own mail
    is in the message's history (its summary; each request's row under
    `{tenant}/{message}/{request}`); None for tests, opt-in and account mails."""
    if status.get("kind") != MARKETING_KIND or not status.get("message"):
        return None
    return key(tenant, status["message"])


def contact_history_key(status_event: Mapping[str, Any]) -> str:
    """`{tenant}/{contact}/{request}`: a row of the contact's own message history."""
    data = status_event["data"]
    return key(status_event["tenant"], data["contact"], data["request"])


def fold_recipient(row: Mapping[str, Any] | None, status: Mapping[str, Any]) -> dict[str, Any]:
    """One request's row: its furthest status with that status's time, and every
    status it has reached (so a repeated callback counts once)."""
    reached = list((row or {}).get("reached", []))
    new = dict(row) if row else {
        "request": status["request"],
        "message": status.get("message"),
        "contact": status["contact"],
        "channel": status["channel"],
        "kind": status.get("kind"),
        "status": status["status"],
        "at": status["at"],
    }
    if status["status"] not in reached:
        reached.append(status["status"])
    if (PROGRESS.get(status["status"], 0), status["at"]) >= (PROGRESS.get(new["status"], 0), new["at"]):
        new["status"], new["at"] = status["status"], status["at"]
    new["reached"] = reached
    return new


def fold_status(
    summary: Mapping[str, Any] | None, row: Mapping[str, Any] | None, status: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Folds a `delivery.status` data into its message's summary and the request's
    row (stored under `history_key`). Repeats change nothing."""
    new_summary = dict(summary) if summary else {
        "message": status.get("message"), "sent_at": None, "recipients": 0, "orders": 0, "statuses": {},
    }
    counts = dict(new_summary["statuses"])
    if row is None:
        new_summary["recipients"] += 1
        new_summary["orders"] += status.get("orders") or 0
    if status["status"] not in (row or {}).get("reached", []):
        counts[status["status"]] = counts.get(status["status"], 0) + 1
    if status["status"] == "sent" and (new_summary["sent_at"] is None or status["at"] < new_summary["sent_at"]):
        new_summary["sent_at"] = status["at"]
    new_summary["statuses"] = counts
    return new_summary, fold_recipient(row, status)


def _page(rows: Iterable[Mapping[str, Any]], page: int, size: int) -> Iterable[Mapping[str, Any]]:
    if page < 1 or not 1 <= size <= MAX_PAGE_SIZE:
        raise ValueError(f"page must be 1 or more and size between 1 and {MAX_PAGE_SIZE}")
    return islice(rows, (page - 1) * size, page * size)


def history_page(
    summary: Mapping[str, Any] | None, rows: Iterable[Mapping[str, Any]], *, page: int = 1, size: int = 100,
    message: str | None = None,
) -> dict[str, Any]:
    """`GET /v1/messages/{tenant}/{message}/history`: the summary and one page of
    `rows` (the message's rows, in the table's order). Counts per status count the
    recipients that reached it: a mail that was opened was also delivered."""
    summary = summary or {"message": message, "sent_at": None, "recipients": 0, "orders": 0, "statuses": {}}
    items = [
        {"contact": row["contact"], "request": row["request"], "status": row["status"], "at": row["at"]}
        for row in _page(rows, page, size)
    ]
    return {
        "message": summary.get("message") or message,
        "sent_at": summary["sent_at"],
        "recipients": summary["recipients"],
        "orders": summary["orders"],
        "statuses": dict(summary["statuses"]),
        "total": summary["recipients"],
        "items": items,
    }


def contact_history_page(
    contact: str, rows: Sequence[Mapping[str, Any]], *, page: int = 1, size: int = 100
) -> dict[str, Any]:
    """A contact's own messages: one page of its rows (under `contact_history_key`)."""
    items = [
        {
            "request": row["request"],
            "message": row.get("message"),
            "kind": row.get("kind"),
            "channel": row["channel"],
            "status": row["status"],
            "at": row["at"],
        }
        for row in _page(rows, page, size)
    ]
    return {"contact": contact, "total": len(rows), "items": items}
