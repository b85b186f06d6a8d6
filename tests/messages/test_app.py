"""The messages stage on the shared worker (outbox provider): sends, never twice, history, preview, test send."""
from __future__ import annotations

import email
from email import policy
from typing import Any

from harness import event, http, unique

from workers import envelope

from .conftest import MessagesDriver
from .helpers import EVENT, message_requested


def sent_once(statuses: dict[str, list[dict[str, Any]]], request: str) -> dict[str, Any]:
    """The request's only status (a status given again is the same record: the same id)."""
    assert len({record["id"] for record in statuses[request]}) == 1, statuses[request]
    return statuses[request][0]["data"]


def test_requests_become_outbox_files_and_their_statuses(messages: MessagesDriver, tenant: str) -> None:
    messages.configure(tenant)
    mail = messages.request(tenant, request=unique("r"), contact="c-1", to={"email": "ann@example.com"}, language="nl",
                            custom_text="Doors open at 19:00\n<b>Bring your ticket</b>")
    text = messages.request(tenant, request=unique("r"), contact="c-2", channel="sms", to={"phone": "+32 470 00 00 00"},
                            language="de")
    bad_phone = messages.request(tenant, request=unique("r"), contact="c-3", channel="sms", to={"phone": "+3247000"})
    no_phone = messages.request(tenant, request=unique("r"), contact="c-4", channel="sms", to={"phone": " "})
    no_email = message_requested(tenant=tenant, request=unique("r"), contact="c-5", to={"phone": "+32470000000"})
    messages.send(no_email)
    requests = [r["data"]["request"] for r in (mail, text, bad_phone, no_phone)]

    statuses = messages.statuses(tenant, lambda found: set(requests) <= set(found))

    sent_mail = sent_once(statuses, requests[0])
    assert (sent_mail["status"], sent_mail["provider"], sent_mail["contact"], sent_mail["message"]) == ("sent", "outbox", "c-1", "msg-1")
    parsed = email.message_from_bytes((messages.outbox / f"{requests[0]}.eml").read_bytes(), policy=policy.default)
    assert (parsed["To"], parsed["From"], parsed["Subject"]) == ("ann@example.com", "Venue <tickets@venue.example>", "Informatie over Hamlet")
    assert parsed["List-Unsubscribe"].startswith(f"<http://127.0.0.1:{messages.worker.web_port}/unsubscribe?token=")
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    plain, html = parsed.get_body(("plain",)).get_content(), parsed.get_body(("html",)).get_content()
    assert "Hallo Ann," in plain and "<b>Bring your ticket</b>" in plain
    assert "&lt;b&gt;Bring your ticket&lt;/b&gt;" in html and "<b>Bring" not in html

    assert sent_once(statuses, requests[1])["status"] == "sent"
    to_line, blank, body = (messages.outbox / f"{requests[1]}.txt").read_text().split("\n", 2)
    assert (to_line, blank) == ("To: +32470000000", "") and body.startswith("Hamlet, 1. Dezember 2026 19:30: Doors open at 19:00")

    failures = {request: sent_once(statuses, request) for request in requests[2:]}
    assert [(f["status"], f["error"]) for f in failures.values()] == [
        ("failed", "invalid phone number '+3247000'"), ("failed", "no phone number")]
    assert not any((messages.outbox / f"{request}.txt").exists() for request in requests[2:])
    # An e-mail request without an address does not fit the contract's schema: dead-lettered, never sent.
    letters = messages.kafka.wait_for(envelope.DEAD_LETTERS, tenant, lambda f: any(l["data"]["topic"] == envelope.OUTBOX for l in f))
    assert any("to.email" in letter["data"]["reason"] for letter in letters)


def test_a_request_is_sent_once_however_often_it_is_published(messages: MessagesDriver, tenant: str) -> None:
    messages.configure(tenant)
    first = messages.request(tenant, request=unique("r"), contact="c-1")
    request = first["data"]["request"]
    messages.statuses(tenant, lambda found: request in found)
    written = (messages.outbox / f"{request}.eml").stat()

    again = message_requested(tenant=tenant, request=request, contact="c-1")
    again["id"] = unique("evt")  # the same request published anew
    messages.send(again)
    messages.send(first)  # and the very same record once more
    later = messages.request(tenant, request=unique("r"), contact="c-1")
    statuses = messages.statuses(tenant, lambda found: later["data"]["request"] in found)

    # The later request of the same contact was handled after the repeats: they sent nothing.
    assert (messages.outbox / f"{request}.eml").stat().st_ino == written.st_ino
    assert sent_once(statuses, request)["status"] == "sent"
    assert sorted(path.name for path in messages.outbox.glob(f"{request}*")) == [f"{request}.eml"]


def test_a_broken_tenant_layout_fails_its_request_and_a_bad_one_is_rejected(messages: MessagesDriver, tenant: str) -> None:
    messages.configure(tenant)
    works = {"id": "promo", "channel": "email",
             "languages": {"en": {"subject": "Hi {{ contact.first_name }}", "html": "<p>#CUSTOMTEXT#</p>", "text": "#CUSTOMTEXT#"}}}
    renders_badly = {"id": "fragile", "channel": "email",
                     "languages": {"en": {"subject": "{{ event.name }}", "html": "{{ 1 / event.venue|length }}", "text": "x"}}}
    broken = {"id": "promo", "channel": "email", "languages": {"en": {"subject": "{{ oops", "html": "x", "text": "x"}}}
    messages.publish_and_wait([
        (envelope.CONFIG, f"{tenant}/layout/{layout['id']}", event("config.layout", tenant, layout)) for layout in (works, renders_badly, broken)])

    fine = messages.request(tenant, request=unique("r"), layout="promo", custom_text="See you")
    failing = messages.request(tenant, request=unique("r"), layout="fragile", contact="c-2")
    statuses = messages.statuses(tenant, lambda found: {fine["data"]["request"], failing["data"]["request"]} <= set(found))

    # The layout that does not compile was dead-lettered; the one before it is still used.
    letters = messages.kafka.wait_for(envelope.DEAD_LETTERS, tenant, lambda found: found)
    assert "layout 'promo' cannot be used, the previous one stays: language 'en', subject: line 1" in letters[0]["data"]["reason"]
    parsed = email.message_from_bytes((messages.outbox / f"{fine['data']['request']}.eml").read_bytes(), policy=policy.default)
    assert parsed["Subject"] == "Hi Ann" and parsed.get_body(("plain",)).get_content().strip() == "See you"
    failed = sent_once(statuses, failing["data"]["request"])
    assert failed["status"] == "failed" and "email layout 'fragile' (en, html)" in failed["error"] and "division by zero" in failed["error"]


def test_the_history_counts_a_messages_recipients_orders_and_statuses(messages: MessagesDriver) -> None:
    # Tenants with API tokens are shared by every test: this test's message and contacts are its own.
    tenant, message = "auth2", unique("msg")
    token = messages.tokens[tenant]
    contacts = [unique("c") for _ in range(3)]
    phones = ["+32470000001", "+32470000002", "+3247"]
    requests = [
        messages.request(tenant, request=unique("r"), contact=contact, message=message, channel="sms", to={"phone": phone},
                         orders=["o-1", "o-2"][: index + 1])["data"]["request"]
        for index, (contact, phone) in enumerate(zip(contacts, phones))
    ]
    statuses = messages.statuses(tenant, lambda found: set(requests) <= set(found))
    sent_at = min(sent_once(statuses, r)["at"] for r in requests[:2])
    base = f"{messages.worker.url}/v1/messages/{tenant}/{message}/history"

    history = messages.get_until(f"/v1/messages/{tenant}/{message}/history", token, lambda body: body["recipients"] == 3)

    assert {key: history[key] for key in ("message", "sent_at", "recipients", "orders", "statuses", "total")} == {
        "message": message, "sent_at": sent_at, "recipients": 3, "orders": 5, "statuses": {"sent": 2, "failed": 1}, "total": 3}
    # Rows come in the order the statuses arrived, which across contacts' partitions is any.
    assert sorted((item["contact"], item["request"], item["status"]) for item in history["items"]) == sorted([
        (contacts[0], requests[0], "sent"), (contacts[1], requests[1], "sent"), (contacts[2], requests[2], "failed")])
    pages = [http("GET", f"{base}?page={page}&size=2", token=token)[1] for page in (1, 2)]
    assert [len(page["items"]) for page in pages] == [2, 1] and {page["total"] for page in pages} == {3}
    assert [item for page in pages for item in page["items"]] == history["items"]

    status, own, _ = http("GET", f"{messages.worker.url}/v1/contacts/{tenant}/{contacts[2]}/messages", token=token)
    assert status == 200 and own["total"] == 1
    assert own["items"][0] | {"at": None} == {"request": requests[2], "message": message, "kind": "event-message",
                                              "channel": "sms", "status": "failed", "at": None}

    assert http("GET", base)[0] == 401
    status, body, _ = http("GET", base, token=messages.tokens["auth1"])
    assert (status, body["error"]) == (403, "forbidden")
    status, body, _ = http("GET", f"{messages.worker.url}/v1/contacts/{tenant}/{contacts[0]}/messages", token=messages.tokens["auth3"])
    assert (status, body["error"]) == (403, "forbidden")


def test_a_preview_fills_a_layout_with_sample_or_given_data(messages: MessagesDriver) -> None:
    tenant = "auth1"
    token = messages.tokens[tenant]
    event_id, layout_id = unique("ev"), unique("layout")
    own = {"id": layout_id, "channel": "sms", "languages": {"nl": {"text": "{{ event.name }} voor {{ contact.first_name }}: #CUSTOMTEXT#"},
                                                             "en": {"text": "{{ event.name }} for {{ contact.first_name }}: #CUSTOMTEXT#"}}}
    messages.publish_and_wait([
        (envelope.EVENTS, f"{tenant}/{event_id}", event("event.scheduled", tenant, EVENT | {"event": event_id, "name": "Macbeth"})),
        (envelope.CONFIG, f"{tenant}/layout/{layout_id}", event("config.layout", tenant, own)),
    ])
    url = f"{messages.worker.url}/v1/layouts/preview"

    status, sample, _ = http("POST", url, {"tenant": tenant, "layout": "event-message", "language": "nl", "custom_text": "Deuren <open>"}, token=token)
    assert status == 200 and set(sample) == {"subject", "html", "text"}
    assert sample["subject"] == "Informatie over Hamlet" and "Hallo Ann," in sample["text"]
    assert "Deuren &lt;open&gt;" in sample["html"] and "Deuren <open>" in sample["text"]

    status, real, _ = http("POST", url, {"tenant": tenant, "layout": layout_id, "language": "de", "event": event_id,
                                         "contact": {"first_name": "Bob"}, "custom_text": "Tot dan"}, token=token)
    assert (status, real) == (200, {"text": "Macbeth for Bob: Tot dan", "segments": 1})  # no German: English

    status, body, _ = http("POST", url, {"tenant": tenant, "layout": "no-such-layout"}, token=token)
    assert (status, body["error"]) == (422, "layout_error") and "no-such-layout" in body["message"]
    status, body, _ = http("POST", url, {"tenant": tenant, "layout": layout_id, "event": unique("ev")}, token=token)
    assert (status, body["error"]) == (404, "unknown_event")
    assert http("POST", url, {"tenant": tenant, "layout": "event-message"})[0] == 401
    assert http("POST", url, {"tenant": tenant, "layout": "event-message"}, token=messages.tokens["auth2"])[0] == 403


def test_a_test_send_sends_the_message_once_to_the_given_address_marked_as_a_test(messages: MessagesDriver) -> None:
    tenant = "auth3"
    token = messages.tokens[tenant]
    event_id, message = unique("ev"), unique("msg")
    definition = {"message": message, "event": event_id, "channel": "sms", "layout": "event-message", "custom_text": "Doors at 19:00",
                  "audience": {"type": "all"}, "consent": {"mode": "ignore"}, "language": {"only": None, "send_in": "nl"},
                  "send": {"when": "now"}}
    messages.publish_and_wait([
        (envelope.EVENTS, f"{tenant}/{event_id}", event("event.scheduled", tenant, EVENT | {"event": event_id, "name": "Othello"})),
        (envelope.MESSAGES, f"{tenant}/{message}", event("message.defined", tenant, definition)),
    ])
    url = f"{messages.worker.url}/v1/messages/{tenant}/{message}/test"

    status, body, _ = http("POST", url, {"to": {"phone": "+32 470 12 34 56"}}, token=token)
    assert status == 202
    request = body["request"]
    statuses = messages.statuses(tenant, lambda found: request in found)

    test_status = sent_once(statuses, request)
    assert (test_status["status"], test_status["kind"], test_status["message"]) == ("sent", "test", message)
    text = (messages.outbox / f"{request}.txt").read_text()
    assert text.startswith("To: +32470123456\n\n[TEST] Othello, 1 december 2026 19:30: Doors at 19:00")

    status, body, _ = http("POST", url, {"to": {"email": "boss@venue.example"}}, token=token)
    assert (status, body["error"]) == (400, "bad_request") and "to.phone" in body["message"]
    status, body, _ = http("POST", f"{messages.worker.url}/v1/messages/{tenant}/{unique('msg')}/test", {"to": {"phone": "+32470123456"}}, token=token)
    assert (status, body["error"]) == (404, "unknown_message")
    assert http("POST", url, {"to": {"phone": "+32470123456"}})[0] == 401
    assert http("POST", url, {"to": {"phone": "+32470123456"}}, token=messages.tokens["auth1"])[0] == 403
