from __future__ import annotations

import email
from dataclasses import replace
from email import policy
from email.message import EmailMessage
from pathlib import Path

from workers.messages.providers import EmailSend, SmsSend
from workers.messages.providers.outbox import OutboxProvider

MAIL = EmailSend(
    request="req-1",
    tenant="t1",
    to="ann@example.com",
    sender_email="tickets@venue.example",
    sender_name="Théâtre Royal",
    subject="Informatie over Hamlet – één avond",
    html_body="<p>Hallo Ann,</p>",
    text_body="Hallo Ann,\n",
    unsubscribe_url="https://usher.test/unsubscribe?token=abc",
)


def read_mail(path: Path) -> EmailMessage:
    return email.message_from_bytes(path.read_bytes(), policy=policy.default)  # type: ignore[return-value]


async def test_an_email_becomes_an_rfc_5322_file_named_after_its_request(tmp_path: Path) -> None:
    results = await OutboxProvider(tmp_path).send_email([MAIL])

    assert [(r.request, r.status, r.provider) for r in results] == [("req-1", "sent", "outbox")]
    message = read_mail(tmp_path / "req-1.eml")
    assert message["From"].addresses[0].display_name == "Théâtre Royal"
    assert message["From"].addresses[0].addr_spec == "tickets@venue.example"
    assert message["To"] == "ann@example.com"
    assert message["Subject"] == "Informatie over Hamlet – één avond"
    assert message["Message-ID"] == "<req-1@venue.example>"
    assert message["Date"].datetime.tzinfo is not None
    assert message["X-Usher-Request"] == "req-1"
    assert message["List-Unsubscribe"] == "<https://usher.test/unsubscribe?token=abc>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message.get_content_type() == "multipart/alternative"
    parts = list(message.iter_parts())
    assert [part.get_content_type() for part in parts] == ["text/plain", "text/html"]
    # RFC 5322 lines end in CRLF.
    assert parts[0].get_content() == "Hallo Ann,\r\n" and parts[1].get_content() == "<p>Hallo Ann,</p>\r\n"


async def test_a_mail_that_is_not_marketing_has_no_unsubscribe_headers_and_a_test_says_so(tmp_path: Path) -> None:
    plain = replace(MAIL, request="req-2", unsubscribe_url=None, test=True)
    await OutboxProvider(tmp_path).send_email([plain])

    message = read_mail(tmp_path / "req-2.eml")
    assert "List-Unsubscribe" not in message and "List-Unsubscribe-Post" not in message
    assert message["X-Usher-Test"] == "yes"


async def test_sending_again_replaces_the_file_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    outbox = OutboxProvider(tmp_path / "outbox")
    await outbox.send_email([MAIL])
    await outbox.send_email([MAIL])

    assert sorted(path.name for path in (tmp_path / "outbox").iterdir()) == ["req-1.eml"]


async def test_an_sms_becomes_a_text_file(tmp_path: Path) -> None:
    text = SmsSend(request="req-3", tenant="t1", to="+32470000000", sender="VENUE", text="Hamlet: doors at 19:00")

    results = await OutboxProvider(tmp_path).send_sms([text])

    assert results[0].status == "sent"
    assert (tmp_path / "req-3.txt").read_text() == "To: +32470000000\n\nHamlet: doors at 19:00\n"


async def test_what_cannot_be_written_fails_without_touching_the_others(tmp_path: Path) -> None:
    sneaky = replace(MAIL, request="../../etc/passwd")
    injected = replace(MAIL, request="req-4", to="ann@example.com\nBcc: x@example.com")
    injected_subject = replace(MAIL, request="req-5", subject="Hamlet\r\nBcc: x@example.com")

    results = await OutboxProvider(tmp_path).send_email([sneaky, MAIL, injected, injected_subject])

    assert [r.status for r in results] == ["failed", "sent", "failed", "failed"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["req-1.eml"]
