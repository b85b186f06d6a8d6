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
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

from workers.envelope import ID_PATTERN, utcnow
from workers.messages.providers import EmailSend, ProviderResult, SmsSend


def email_message(send: EmailSend, date: datetime) -> EmailMessage:
    """`send` as a multipart/alternative e-mail (plain text first, then HTML)."""
    message = EmailMessage()
    domain = send.sender_email.rpartition("@")[2] or "usher.invalid"
    message["Message-ID"] = f"<{send.request}@{domain}>"
    message["Date"] = format_datetime(date)
    message["From"] = Address(display_name=send.sender_name, addr_spec=send.sender_email)
    message["To"] = send.to
    message["Subject"] = send.subject
    for name, value in send.headers().items():
        message[name] = value
    message.set_content(send.text)
    message.add_alternative(send.html, subtype="html")
    return message


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
        return email_message(send, utcnow()).as_bytes(policy=policy.SMTP)

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
