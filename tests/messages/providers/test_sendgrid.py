from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from urllib.error import URLError

import pytest

from workers.messages.providers import EmailSend, Retry
from workers.messages.providers.sendgrid import SendGridProvider, classify, substitute
from workers.messages.render import LayoutRenderer
from workers.messages.rules import plan_send

from ..helpers import LINKS, NOW, SETTINGS, message_requested
from ..sendgrid_standin import API_KEY, SendGridStandIn

QUICK = Retry(attempts=3, first_delay_s=0.01)
NAMES = [("Ann", "Peeters"), ("Bob", "O'Brien & Sons"), ("Zoë", "Janssens")]


@pytest.fixture
def standin() -> Iterator[SendGridStandIn]:
    with SendGridStandIn() as server:
        yield server


def provider(standin: SendGridStandIn, **options: Any) -> SendGridProvider:
    return SendGridProvider(API_KEY, host=standin.host, **({"rate_per_s": 0, "retry": QUICK} | options))


def marketing_mails(renderer: LayoutRenderer, count: int, names: list[tuple[str, str]] = NAMES) -> list[EmailSend]:
    """A message to `count` contacts, rendered as the stage renders it."""
    sends = []
    for index in range(count):
        first, last = names[index % len(names)]
        request = message_requested(request=f"req-{index}", contact=f"c-{index}", first_name=first, last_name=last,
                                    to={"email": f"contact{index}@example.com"})
        send = plan_send(request, settings=SETTINGS, renderer=renderer, links=LINKS, now=NOW)
        assert isinstance(send, EmailSend)
        sends.append(send)
    return sends


def delivered(body: dict[str, Any]) -> dict[str, tuple[str, str, str, dict[str, str]]]:
    """What each recipient of a request body receives: subject, text, HTML and headers."""
    content = {part["type"]: part["value"] for part in body["content"]}
    return {
        item["to"][0]["email"]: (
            item["subject"],
            substitute(content["text/plain"], item.get("substitutions", {})),
            substitute(content["text/html"], item.get("substitutions", {})),
            item["headers"],
        )
        for item in body["personalizations"]
    }


async def test_one_request_carries_every_recipient_of_a_message_with_their_own_mail(
    renderer: LayoutRenderer, standin: SendGridStandIn
) -> None:
    sends = marketing_mails(renderer, 4)

    results = await provider(standin).send_email(sends)

    assert len(standin.accepted) == 1
    body = standin.accepted[0]
    assert body["from"] == {"email": "tickets@venue.example", "name": "Venue"}
    assert [part["type"] for part in body["content"]] == ["text/plain", "text/html"]
    received = delivered(body)
    for send in sends:
        subject, text, html, headers = received[send.to]
        assert (subject, text, html) == (send.subject, send.text, send.html)
        assert headers == send.headers() and headers["List-Unsubscribe"] == f"<{send.unsubscribe_url}>"
        assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert [item["custom_args"] for item in body["personalizations"]] == [
        {"request": send.request, "tenant": "t1"} for send in sends
    ]
    message_ids = {result.provider_id for result in results}
    assert [(r.request, r.status) for r in results] == [(s.request, "sent") for s in sends]
    assert len(message_ids) == 1 and None not in message_ids


async def test_recipients_are_split_into_requests_of_at_most_1000(
    renderer: LayoutRenderer, standin: SendGridStandIn
) -> None:
    sends = marketing_mails(renderer, 2100)

    results = await provider(standin).send_email(sends)

    assert sorted(len(body["personalizations"]) for body in standin.accepted) == [100, 1000, 1000]
    received = {}
    for body in standin.accepted:
        received |= delivered(body)
    assert all(received[send.to][1:3] == (send.text, send.html) for send in sends)
    assert {result.status for result in results} == {"sent"}


async def test_a_name_that_is_also_in_the_layouts_own_text_still_arrives_exactly(
    renderer: LayoutRenderer, standin: SendGridStandIn
) -> None:
    # "Venue" is the sender's name too. Rendered once for all recipients, its mail shares the body.
    sends = marketing_mails(renderer, 3, names=[("Ann", "Peeters"), ("Venue", "Keeper"), ("Bob", "Smith")])

    await provider(standin).send_email(sends)

    assert [len(body["personalizations"]) for body in standin.accepted] == [3]
    assert all(delivered(standin.accepted[0])[send.to][:3] == (send.subject, send.text, send.html) for send in sends)


async def test_mails_rendered_one_by_one_are_factored_and_checked_by_undoing_it(standin: SendGridStandIn) -> None:
    # A filter on the name: each mail is rendered on its own, and the provider looks for the
    # recipient's values in it. "Venue" is also in the layout's own text, so that mail cannot
    # share the others' body.
    source = "Hello {{ contact.first_name|trim }}, from Venue. {{ unsubscribe_url }}"
    layout = {"id": "event-message", "channel": "email", "languages": {"en": {"subject": "Hi", "html": source, "text": source}}}
    sends = []
    for index, (first, last) in enumerate([("Ann", "Peeters"), ("Venue", "Keeper"), ("Bob", "Smith")]):
        request = message_requested(request=f"req-{index}", first_name=first, last_name=last, to={"email": f"c{index}@example.com"})
        sends.append(plan_send(request, settings=SETTINGS, renderer=LayoutRenderer(), links=LINKS, now=NOW, layout=layout))
    assert all(isinstance(send, EmailSend) and not send.substitutions and send.personal for send in sends)

    await provider(standin).send_email(sends)

    assert sorted(len(body["personalizations"]) for body in standin.accepted) == [1, 2]
    received = {}
    for body in standin.accepted:
        received |= delivered(body)
    assert all(received[send.to][:3] == (send.subject, send.text, send.html) for send in sends)


# 6,000 ASCII characters; 700 emoji, which JSON writes in twelve bytes each (in six, 700 would fit).
@pytest.mark.parametrize("filler", ["x" * 6000, "\N{GRINNING FACE}" * 700])
@pytest.mark.parametrize("factored", [True, False], ids=["rendered-once", "rendered-alone"])
async def test_personal_values_beyond_sendgrids_substitution_limit_are_sent_as_they_are(
    renderer: LayoutRenderer, standin: SendGridStandIn, filler: str, factored: bool
) -> None:
    link = "https://usher.test/unsubscribe?token=" + filler
    send = plan_send(message_requested(unsubscribe_url=link), settings=SETTINGS, renderer=renderer, links=LINKS, now=NOW)
    assert isinstance(send, EmailSend) and link in send.text and send.substitutions
    if not factored:  # as if rendered alone: the provider looks for the link in the mail
        send = replace(send, html_body=send.html, text_body=send.text, substitutions={},
                       personal=(("vars.unsubscribe_url", link),))

    results = await provider(standin).send_email([send])

    assert results[0].status == "sent"
    (item,) = standin.accepted[0]["personalizations"]
    assert "substitutions" not in item and delivered(standin.accepted[0])[send.to][1:3] == (send.text, send.html)


async def test_different_mails_go_in_different_requests(renderer: LayoutRenderer, standin: SendGridStandIn) -> None:
    send = marketing_mails(renderer, 1)[0]
    other = replace(send, request="req-x", to="x@example.com", html_body="<p>Something else</p>", text_body="Else",
                    substitutions={})

    await provider(standin).send_email([send, other])

    texts = [text for body in standin.accepted for _, text, _, _ in delivered(body).values()]
    assert len(standin.accepted) == 2 and sorted(texts) == sorted([send.text, "Else"])


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_throttling_and_server_errors_are_retried(
    renderer: LayoutRenderer, standin: SendGridStandIn, status: int
) -> None:
    standin.script.append((status, {"errors": [{"message": "slow down", "field": None}]}, {"Retry-After": "0"}))

    results = await provider(standin).send_email(marketing_mails(renderer, 2))

    assert standin.requests == 2 and len(standin.accepted) == 1
    assert [result.status for result in results] == ["sent", "sent"]


async def test_a_refused_request_fails_its_recipients_with_sendgrids_reason(
    renderer: LayoutRenderer, standin: SendGridStandIn
) -> None:
    sends = [replace(send, sender_email="not-an-address") for send in marketing_mails(renderer, 2)]

    results = await provider(standin).send_email(sends)

    assert standin.requests == 1
    assert {result.status for result in results} == {"failed"}
    assert results[0].error and results[0].error.startswith("SendGrid 400: The from object must be provided")
    assert results[0].error.endswith("(from)")


async def test_a_wrong_api_key_fails_without_retrying(renderer: LayoutRenderer, standin: SendGridStandIn) -> None:
    results = await SendGridProvider("SG.wrong", host=standin.host, retry=QUICK).send_email(marketing_mails(renderer, 1))

    assert standin.requests == 1
    assert results[0].error == "SendGrid 401: Permission denied, wrong credentials"


async def test_giving_up_after_the_retries_fails_the_request(renderer: LayoutRenderer, standin: SendGridStandIn) -> None:
    standin.script.extend([(503, {}, {})] * 3)

    results = await provider(standin).send_email(marketing_mails(renderer, 1))

    assert standin.requests == 3 and results[0].status == "failed"
    assert results[0].error == "gave up after 3 attempts: SendGrid 503: Service Unavailable"


async def test_a_request_without_an_answer_is_unknown_and_never_sent_again(
    renderer: LayoutRenderer, standin: SendGridStandIn
) -> None:
    standin.script.append((0, {}, {}))

    results = await provider(standin).send_email(marketing_mails(renderer, 2))

    assert standin.requests == 1
    assert [result.status for result in results] == ["unknown", "unknown"]
    assert "no answer from SendGrid" in (results[0].error or "")


async def test_an_unreachable_sendgrid_is_retried_then_fails(renderer: LayoutRenderer) -> None:
    with SendGridStandIn() as closed:
        host = closed.host
    results = await SendGridProvider(API_KEY, host=host, retry=QUICK).send_email(marketing_mails(renderer, 1))

    assert results[0].status == "failed" and "SendGrid unreachable" in (results[0].error or "")


async def test_requests_keep_to_the_rate_limit(renderer: LayoutRenderer, standin: SendGridStandIn) -> None:
    sends = [replace(send, html_body=f"<p>{index}</p>", substitutions={}) for index, send in enumerate(marketing_mails(renderer, 3))]
    started = time.monotonic()

    await provider(standin, rate_per_s=20).send_email(sends)

    assert len(standin.accepted) == 3
    assert time.monotonic() - started >= 0.1


def test_only_a_connection_that_never_opened_is_retried() -> None:
    # A timeout or reset while the body was going out may have left SendGrid with the request.
    assert classify(URLError(ConnectionRefusedError(111, "Connection refused"))).outcome == "retry"
    assert classify(URLError(socket.gaierror(-2, "Name or service not known"))).outcome == "retry"
    assert classify(URLError(TimeoutError("timed out"))).outcome == "unknown"
    assert classify(URLError(ConnectionResetError(104, "Connection reset by peer"))).outcome == "unknown"
