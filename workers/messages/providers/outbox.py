"""The default provider: messages become files in USHER_OUTBOX_DIR.

One RFC 5322 `<request>.eml` per e-mail and one `<request>.txt` per SMS (`To:
+32470000000`, an empty line, the text). The file is named after the request,
so a message sent again replaces its file instead of adding one, and it is
written to a temporary file first and renamed, so a reader never sees half a
message.
"""
from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime
from email import policy
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, formataddr
from pathlib import Path

from workers.envelope import ID_PATTERN, utcnow
from workers.messages.providers import EmailSend, ProviderResult, SmsSend


# Bodies in quoted-printable: a person opening the file reads the text as it is.
_UTF8 = Charset("utf-8")
_UTF8.body_encoding = QP
# RFC 5322 lines end in CRLF and are at most 998 characters long; an ASCII header is folded
# only past that (folded at 78, a List-Unsubscribe URL was moved to a line of its own, and read
# back with a leading space). Non-ASCII values are encoded words folded at 78 (`email_message`).
_LINE_END = "\r\n"
_FILE_POLICY = policy.compat32.clone(linesep=_LINE_END, max_line_length=998)


def email_message(send: EmailSend, date: datetime) -> Message:
    """`send` as a multipart/alternative e-mail (plain text first, then HTML).

    Made with the email package's compat32 classes: its default policy parses every header it is
    given again, 2.4 ms a mail, which held the messages stage on the outbox to about 400 mails a
    second. compat32 writes a header as it is given, so a line break in one (a header injected
    through an address or a subject) is refused here, as the default policy refuses it."""
    message = MIMEMultipart("alternative")
    domain = send.sender_email.rpartition("@")[2] or "usher.invalid"
    headers = {
        "Message-ID": f"<{send.request}@{domain}>",
        "Date": format_datetime(date),
        "From": formataddr((send.sender_name, send.sender_email), charset="utf-8"),
        "To": send.to,
        "Subject": send.subject,
        **send.headers(),
    }
    for name, value in headers.items():
        if "\r" in value or "\n" in value:
            raise ValueError(f"the {name} header has a line break in it")
        message[name] = value if value.isascii() else Header(value, "utf-8", header_name=name).encode(linesep=_LINE_END)
    message.attach(MIMEText(_ended(send.text), "plain", _UTF8))
    message.attach(MIMEText(_ended(send.html), "html", _UTF8))
    return message


def _ended(body: str) -> str:
    """The body with its last line ended, as every line of a mail is."""
    return body if body.endswith("\n") else body + "\n"


def sms_file(send: SmsSend) -> bytes:
    return f"To: {send.to}\n\n{send.text}\n".encode()


class OutboxProvider:
    name = "outbox"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    async def send_email(self, batch: Sequence[EmailSend]) -> list[ProviderResult]:
        return await asyncio.to_thread(self._write_all, batch, ".eml", self._email_bytes)

    async def send_sms(self, batch: Sequence[SmsSend]) -> list[ProviderResult]:
        return await asyncio.to_thread(self._write_all, batch, ".txt", sms_file)

    @staticmethod
    def _email_bytes(send: EmailSend) -> bytes:
        return email_message(send, utcnow()).as_bytes(policy=_FILE_POLICY)

    def _write_all(
        self, batch: Sequence[EmailSend | SmsSend], suffix: str, encode: Callable[..., bytes]
    ) -> list[ProviderResult]:
        self.directory.mkdir(parents=True, exist_ok=True)
        return [self._write(send, suffix, encode) for send in batch]

    def _write(self, send: EmailSend | SmsSend, suffix: str, encode: Callable[..., bytes]) -> ProviderResult:
        # The id becomes a file name: only the contract's id characters, never a path.
        if not ID_PATTERN.fullmatch(send.request):
            return ProviderResult(send.request, "failed", self.name, error="the request id cannot name a file")
        path = self.directory / f"{send.request}{suffix}"
        try:
            write_atomically(path, encode(send))
        except (OSError, ValueError) as error:  # ValueError: a header the e-mail package refuses
            return ProviderResult(send.request, "failed", self.name, error=str(error))
        return ProviderResult(send.request, "sent", self.name, provider_id=path.name)


def write_atomically(path: Path, content: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(content)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
