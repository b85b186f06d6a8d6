from __future__ import annotations

from dataclasses import replace
from typing import Any
from urllib.parse import unquote

import pytest

from datetime import timedelta

from workers.consent.tokens import UnsubscribeClaims, read_unsubscribe_token
from workers.envelope import COMMANDS, DELIVERIES, Out, make_event
from workers.schemas import SchemaBook, schemas_dir
from workers.messages.providers import EmailSend, ProviderResult, SmsSend
from workers.messages.render import LayoutRenderer
from workers.messages.rules import (
    callback_correlation_key,
    callback_records,
    callback_status,
    correlation_key,
    plan_send,
    preview,
    result_status,
)

from .helpers import LINKS, NOW, SETTINGS, message_requested


def plan(renderer: LayoutRenderer, request: dict[str, Any], **options: Any) -> EmailSend | SmsSend | Out:
    return plan_send(request, **({"settings": SETTINGS, "renderer": renderer, "links": LINKS, "now": NOW} | options))


def assert_failed(outcome: Any, reason: str) -> dict[str, Any]:
    assert isinstance(outcome, Out) and outcome.topic == DELIVERIES
    data = outcome.event["data"]
    assert data["status"] == "failed" and reason in data["error"]
    return data


def test_a_double_opt_in_request_becomes_a_mail_in_the_contacts_language(renderer: LayoutRenderer) -> None:
    request = message_requested(
        kind="doi-confirmation",
        language="nl",
        to={"email": "ann@example.com"},
        confirm_url="https://usher.test/doi/confirm?token=a&b",
        optin="newsletter",
        optin_text="Stuur mij de nieuwsbrief",
        first_name="Ann",
    )

    send = plan(renderer, request)

    assert isinstance(send, EmailSend)
    assert (send.to, send.sender_email, send.sender_name, send.request, send.tenant) == (
        "ann@example.com", "tickets@venue.example", "Venue", "req-1", "t1",
    )
    assert send.subject == "Bevestig je inschrijving bij Venue"
    assert 'href="https://usher.test/doi/confirm?token=a&amp;b"' in send.html
    assert "https://usher.test/doi/confirm?token=a&b" in send.text and "Hallo Ann," in send.text
    assert "Stuur mij de nieuwsbrief" in send.text
    assert send.unsubscribe_url is None and "List-Unsubscribe" not in send.headers()
    assert ("vars.confirm_url", "https://usher.test/doi/confirm?token=a&b") in send.personal


def test_a_marketing_message_gets_a_signed_one_click_unsubscribe_link(renderer: LayoutRenderer) -> None:
    send = plan(renderer, message_requested(request="req-7"), settings=SETTINGS | {"public_url": "https://venue.test/"})

    assert isinstance(send, EmailSend)
    url = send.unsubscribe_url
    assert url and url.startswith("https://venue.test/unsubscribe?token=")
    claims = read_unsubscribe_token(unquote(url.split("token=")[1]), LINKS.secret, None, NOW)
    assert (claims.tenant, claims.contact, claims.purpose, claims.request) == ("t1", "c-42", "email", "req-7")
    assert send.headers()["List-Unsubscribe"] == f"<{url}>"
    assert send.headers()["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert url in send.text
    assert "Hello Ann," in send.text and "Doors open at 19:00" in send.html
    assert "Hamlet" in send.subject and "December 1, 2026 7:30 PM" in send.text


def test_unsubscribe_links_are_the_consent_stages_own_tokens_whatever_the_moment(renderer: LayoutRenderer) -> None:
    # Every link carries the token the consent stage reads, whatever the moment or the secret.
    for minutes, request_id, secret in ((0, "req-1", LINKS.secret), (0, "req-2", LINKS.secret), (5, "req-1", LINKS.secret),
                                         (5, "req-1", "other-secret")):
        now = NOW + timedelta(minutes=minutes)
        send = plan(renderer, message_requested(request=request_id), now=now, links=replace(LINKS, secret=secret))
        assert isinstance(send, EmailSend)
        prefix = f"{LINKS.base_url}/unsubscribe?token="
        assert send.unsubscribe_url.startswith(prefix)
        token = unquote(send.unsubscribe_url.removeprefix(prefix))
        assert read_unsubscribe_token(token, secret, None, now) == UnsubscribeClaims("t1", "c-42", "email", request_id)


def test_a_service_message_has_no_unsubscribe_link(renderer: LayoutRenderer) -> None:
    send = plan(renderer, message_requested(marketing=False))

    assert isinstance(send, EmailSend)
    assert send.unsubscribe_url is None and "unsubscribe" not in send.text.lower()


def test_an_sms_goes_to_the_normalised_number_from_the_tenants_sender(renderer: LayoutRenderer) -> None:
    request = message_requested(channel="sms", to={"phone": "+32 470 00 00 00"}, language="de")

    send = plan(renderer, request)

    assert isinstance(send, SmsSend)
    assert (send.to, send.sender, send.marketing) == ("+32470000000", "VENUE", True)
    assert send.text.startswith("Hamlet, 1. Dezember 2026 19:30: Doors open at 19:00 Abmelden: https://usher.test/")


@pytest.mark.parametrize(
    ("channel", "to", "reason"),
    [
        ("email", {"phone": "+32470000000"}, "no e-mail address"),
        ("email", {"email": "  "}, "no e-mail address"),
        ("email", {"email": "ann@"}, "invalid e-mail address 'ann@'"),
        ("email", {"email": "ann@example.com\r\nBcc: all@example.com"}, "invalid e-mail address"),
        ("email", {"email": "ann@example.com, bob@example.com"}, "invalid e-mail address"),
        ("sms", {"email": "ann@example.com"}, "no phone number"),
        ("sms", {"phone": "+3247000"}, "invalid phone number '+3247000'"),
        ("sms", {"phone": "0470000000"}, "invalid phone number '0470000000'"),
    ],
)
def test_a_request_without_a_usable_address_fails_with_the_reason(
    renderer: LayoutRenderer, channel: str, to: dict[str, str], reason: str
) -> None:
    data = assert_failed(plan(renderer, message_requested(channel=channel, to=to)), reason)
    assert (data["request"], data["message"], data["contact"], data["channel"]) == ("req-1", "msg-1", "c-42", channel)


def test_a_tenant_without_a_sender_cannot_mail(renderer: LayoutRenderer) -> None:
    assert_failed(plan(renderer, message_requested(), settings={}), "no sender e-mail address")


def test_a_layout_that_does_not_render_fails_that_request_only(renderer: LayoutRenderer) -> None:
    broken = {"id": "event-info", "channel": "email",
              "languages": {"en": {"subject": "{{ event.nmae }}", "html": "x", "text": "x"}}}

    failed = plan(renderer, message_requested(layout="event-info"), layout=broken)
    missing = plan(renderer, message_requested(layout="event-info"))
    fine = plan(renderer, message_requested())

    assert_failed(failed, "email layout 'event-info' (en, subject): 'dict object' has no attribute 'nmae'")
    assert_failed(missing, "there is no email layout 'event-info'")
    assert isinstance(fine, EmailSend)


def test_a_test_send_uses_the_messages_layout_marked_as_a_test(renderer: LayoutRenderer) -> None:
    own = {"id": "event-info", "channel": "email",
           "languages": {"en": {"subject": "About {{ event.name }}", "html": "<a href='{{ unsubscribe_url }}'>x</a>",
                                "text": "{{ custom_text }}"}}}
    request = message_requested(kind="test", layout="event-info", to={"email": "boss@venue.example"},
                                custom_text="Draft", event={"name": "Hamlet"})

    send = plan(renderer, request, layout=own)

    assert isinstance(send, EmailSend)
    assert send.subject == "[TEST] About Hamlet" and send.text == "Draft"
    assert send.headers()["X-Usher-Test"] == "yes" and "List-Unsubscribe" not in send.headers()
    assert send.html == "<a href='#'>x</a>"


def test_a_redelivered_request_gives_the_same_records(renderer: LayoutRenderer) -> None:
    request = message_requested(to={})
    assert plan(renderer, request) == plan(renderer, request)
    assert plan(renderer, message_requested()) == plan(renderer, message_requested())


SCHEMAS = SchemaBook(schemas_dir())


def test_every_record_the_rules_produce_matches_the_contracts_schemas(renderer: LayoutRenderer) -> None:
    sent = result_status(message_requested(), ProviderResult("req-1", "sent", "sendgrid", "x-id"), NOW)
    records = [
        plan(renderer, message_requested(to={})),
        plan(renderer, message_requested(kind="account-created", channel="sms", to={"phone": "+1"})),
        sent,
        result_status(message_requested(), ProviderResult("req-1", "unknown", "sendgrid", None, "no answer"), NOW),
        *callback_records(reported("sendgrid", "unsubscribe", {"ip": "203.0.113.9"}), sent.event["data"], OPTINS),
        *callback_records(reported("sns", "FAILURE"), sent.event["data"] | {"channel": "sms"}, OPTINS),
    ]
    assert all(isinstance(record, Out) for record in records) and len(records) == 8
    assert [SCHEMAS.problem(record.event) for record in records] == [None] * 8


def test_a_message_status_is_keyed_by_message_and_other_mails_by_kind(renderer: LayoutRenderer) -> None:
    message = plan(renderer, message_requested(to={}))
    doi = plan(renderer, message_requested(kind="doi-confirmation", to={}))
    test = plan(renderer, message_requested(kind="test", to={}))

    assert isinstance(message, Out) and isinstance(doi, Out) and isinstance(test, Out)
    assert (message.key, doi.key, test.key) == ("t1/msg-1", "t1/doi-confirmation", "t1/test")
    assert message.event["data"]["kind"] == "event-message" and message.event["data"]["orders"] == 2


@pytest.mark.parametrize("status", ["sent", "failed", "unknown"])
def test_a_provider_result_becomes_the_requests_status(status: str) -> None:
    result = ProviderResult("req-1", status, "sendgrid", "x-id" if status == "sent" else None,
                            None if status == "sent" else "why")

    record = result_status(message_requested(), result, NOW)

    assert record.topic == DELIVERIES and record.key == "t1/msg-1"
    assert record.event["type"] == "delivery.status" and record.event["tenant"] == "t1"
    data = record.event["data"]
    assert {k: data[k] for k in ("request", "message", "contact", "channel", "status", "provider", "at")} == {
        "request": "req-1", "message": "msg-1", "contact": "c-42", "channel": "email", "status": status,
        "provider": "sendgrid", "at": "2026-11-30T12:00:00.000Z",
    }
    assert (data["provider_id"], data["error"]) == (result.provider_id, result.error)


def reported(provider: str, event: str, raw: dict[str, Any] | None = None, request: str | None = "req-1",
             at: str = "2026-11-30T12:05:00Z", id_: str = "cb-1") -> dict[str, Any]:
    data = {"provider": provider, "request": request, "provider_id": "W86EgYT6SQKk0lRflfLRsA", "event": event,
            "at": at, "raw": raw or {}}
    return make_event("delivery.reported", "t1", data, source="/usher/webhooks", id_=id_, time=at)


@pytest.mark.parametrize(
    ("event", "status"),
    [
        ("delivered", "delivered"),
        ("open", "opened"),
        ("click", "clicked"),
        ("bounce", "bounced"),
        ("dropped", "dropped"),
        ("deferred", "deferred"),
        ("spamreport", "spam"),
        ("unsubscribe", "unsubscribed"),
        ("group_unsubscribe", "unsubscribed"),
        ("processed", None),
        ("group_resubscribe", None),
    ],
)
def test_sendgrid_events_map_to_delivery_statuses(event: str, status: str | None) -> None:
    mapped = callback_status(reported("sendgrid", event))
    assert (mapped[0] if mapped else None) == status


def test_sendgrid_failures_carry_sendgrids_reason() -> None:
    bounce = reported("sendgrid", "bounce", {"reason": "550 5.1.1 The email account does not exist"})
    deferred = reported("sendgrid", "deferred", {"response": "400 try again later"})
    assert callback_status(bounce) == ("bounced", "550 5.1.1 The email account does not exist")
    assert callback_status(deferred) == ("deferred", "400 try again later")


@pytest.mark.parametrize(
    ("provider", "event", "raw", "expected"),
    [
        ("end-user-messaging", "TEXT_DELIVERED", {}, ("delivered", None)),
        ("end-user-messaging", "TEXT_SUCCESSFUL", {}, ("delivered", None)),
        ("end-user-messaging", "TEXT_PENDING", {}, None),
        ("end-user-messaging", "TEXT_QUEUED", {}, None),
        ("end-user-messaging", "TEXT_CARRIER_UNREACHABLE",
         {"messageStatusDescription": "The carrier is unreachable"}, ("failed", "The carrier is unreachable")),
        ("end-user-messaging", "TEXT_BLOCKED", {}, ("failed", "TEXT_BLOCKED")),
        ("sns", "SUCCESS", {}, ("delivered", None)),
        ("sns", "FAILURE", {"delivery": {"providerResponse": "Phone is currently unreachable"}},
         ("failed", "Phone is currently unreachable")),
        ("sns", "SOMETHING_NEW", {}, None),
    ],
)
def test_aws_sms_events_map_to_delivered_or_failed(
    provider: str, event: str, raw: dict[str, Any], expected: tuple[str, str | None] | None
) -> None:
    assert callback_status(reported(provider, event, raw)) == expected


SENT = {"request": "req-1", "message": "msg-1", "contact": "c-42", "channel": "email", "status": "sent",
        "provider": "sendgrid", "provider_id": "W86EgYT6SQKk0lRflfLRsA", "at": "2026-11-30T12:00:00.000Z",
        "error": None, "kind": "event-message", "orders": 2}
OPTINS = {
    "newsletter": {"id": "newsletter", "purpose": "email", "active": True},
    "partners": {"id": "partners", "purpose": "email", "active": True},
    "sms-alerts": {"id": "sms-alerts", "purpose": "sms", "active": True},
}


def test_a_callback_becomes_the_status_of_its_request() -> None:
    records = callback_records(reported("sendgrid", "open", at="2026-11-30T13:05:00+01:00"), SENT, OPTINS)

    assert len(records) == 1 and records[0].topic == DELIVERIES and records[0].key == "t1/msg-1"
    data = records[0].event["data"]
    assert (data["request"], data["contact"], data["status"], data["at"]) == (
        "req-1", "c-42", "opened", "2026-11-30T12:05:00.000Z",
    )
    assert (data["kind"], data["orders"], data["provider"]) == ("event-message", 2, "sendgrid")


def test_an_ignored_callback_changes_nothing() -> None:
    assert callback_records(reported("sendgrid", "processed"), SENT, OPTINS) == []


def test_an_unsubscribe_also_revokes_every_opt_in_of_the_channels_purpose() -> None:
    raw = {"ip": "203.0.113.9", "useragent": "Mail/1.0"}
    records = callback_records(reported("sendgrid", "unsubscribe", raw), SENT, OPTINS)

    assert [record.event["data"]["status"] for record in records[:1]] == ["unsubscribed"]
    revokes = records[1:]
    assert {record.event["data"]["optin"] for record in revokes} == {"newsletter", "partners"}
    for record in revokes:
        assert record.topic == COMMANDS and record.key == "t1/c-42" and record.event["type"] == "consent.revoke"
        data = record.event["data"]
        assert (data["contact"], data["channel"], data["ip"], data["user_agent"]) == (
            "c-42", "email-link", "203.0.113.9", "Mail/1.0",
        )


def test_a_repeated_callback_yields_the_same_records() -> None:
    callback = reported("sendgrid", "unsubscribe", {"ip": "203.0.113.9"})
    assert callback_records(callback, SENT, OPTINS) == callback_records(callback, SENT, OPTINS)


def test_a_callback_without_request_id_finds_its_send_by_message_id_and_address() -> None:
    sent_under = correlation_key("t1", "sendgrid", "W86EgYT6SQKk0lRflfLRsA", "Ann@Example.com")
    raw = {"email": "ann@example.com", "sg_message_id": "W86EgYT6SQKk0lRflfLRsA.filterdrecv-p3las1-5bf99c48d-k6kz7.0"}
    callback = reported("sendgrid", "delivered", raw, request=None)
    callback["data"]["provider_id"] = raw["sg_message_id"]
    other = reported("sendgrid", "delivered", raw | {"email": "bob@example.com"}, request=None)

    assert callback_correlation_key(callback) == sent_under
    assert callback_correlation_key(other) != sent_under
    sms = reported("end-user-messaging", "TEXT_DELIVERED", {"messageId": "862a8790"}, request=None)
    sms["data"]["provider_id"] = None
    assert callback_correlation_key(sms) == correlation_key("t1", "end-user-messaging", "862a8790")


def test_preview_fills_every_variable_from_samples_or_the_given_contact_and_event(renderer: LayoutRenderer) -> None:
    sample = preview(renderer, tenant="t1", layout_id="event-message", settings=SETTINGS, language="nl",
                     custom_text="Deuren open om 19:00")
    real = preview(renderer, tenant="t1", layout_id="event-message", settings=SETTINGS, language="fr",
                   contact={"first_name": "Bob"}, event={"name": "Macbeth"})
    text = preview(renderer, tenant="t1", layout_id="event-message", settings=SETTINGS, channel="sms")

    assert set(sample) == {"subject", "html", "text"}
    assert sample["subject"] == "Informatie over Hamlet" and "Deuren open om 19:00" in sample["html"]
    assert "Hallo Ann," in sample["text"]
    assert real["subject"] == "Information about Macbeth" and "Hello Bob," in real["text"]
    assert set(text) == {"text", "segments"} and text["segments"] == 1
