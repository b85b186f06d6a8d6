"""SendGrid's v3 mail send through the official client (`sendgrid.SendGridAPIClient`).

One request carries up to 1,000 recipients ("personalizations"). In SendGrid a
request has one HTML and one text body, while every recipient's mail has their
own values (their name, their unsubscribe link). So each mail is factored: the
recipient's own values are tokens in the bodies, and a personalization's
`substitutions` put them back. Recipients whose factored bodies are identical
(every recipient of a message, normally) share a request. Mostly the renderer
has factored the mail already (`EmailSend.factored`); else the recipient's own
values (`EmailSend.personal`) are looked for in the rendered mail, and that is
checked by undoing it. When the substitutions would not give back exactly the
mail (a value also occurring in the layout's own text, over 10,000 bytes of
substitutions), that recipient keeps their own body and is grouped only with
identical mails. Subjects are per personalization and never factored.

Each personalization carries `custom_args` (request id and tenant) so webhook
events find their request, and its own headers (X-Usher-Request, and on
marketing mail List-Unsubscribe with List-Unsubscribe-Post). 429 and 5xx
answers are retried with exponential backoff; another 4xx fails the request's
recipients with SendGrid's reason; a request that may have reached SendGrid
without an answer coming back is `unknown`, never resent. The `X-Message-Id`
answer header is every recipient's provider id (SendGrid's events carry it as
the start of `sg_message_id`).
"""
from __future__ import annotations

import asyncio
import http.client
import json
import socket
from collections.abc import Sequence
from functools import partial
from typing import Any
from urllib.error import URLError

import orjson
import sendgrid
from markupsafe import escape
from python_http_client.exceptions import HTTPError

from workers.messages.providers import (
    SENDGRID_HOST,
    EmailSend,
    ProviderResult,
    RateLimiter,
    Retry,
    Verdict,
    deliver,
)
from workers.messages.render import TOKEN_MARK, Factored, substitute

MAX_PERSONALIZATIONS = 1000
MAX_SUBSTITUTION_BYTES = 10_000
JSON_HEADERS = {"Content-Type": "application/json; charset=utf-8"}


def factor(send: EmailSend) -> Factored:
    """(html, text, substitutions): the mail with the recipient's own values as
    tokens, or the mail itself with no substitutions when that is not exact."""
    if TOKEN_MARK in send.subject:  # SendGrid substitutes in the subject too
        return send.html, send.text, {}
    if send.substitutions:  # rendered once for the message's recipients: factored already
        if any(TOKEN_MARK in value for value in send.substitutions.values()) or _over_substitution_limit(send.substitutions):
            return send.html, send.text, {}
        return send.html_body, send.text_body, dict(send.substitutions)
    own = (send.html_body, send.text_body, {})
    if TOKEN_MARK in send.html_body or TOKEN_MARK in send.text_body:
        return own
    values = [(role, value) for role, value in send.personal if value]
    values.sort(key=_longest_first)
    html, text, substitutions = send.html_body, send.text_body, {}
    for role, value in values:
        if TOKEN_MARK in value:
            return own
        # The HTML holds a value escaped, as the layout's autoescape wrote it.
        escaped = str(escape(value)) if _HTML_SPECIAL.intersection(value) else value
        if escaped in html:
            token = f"{TOKEN_MARK}{role}:h%"
            substitutions[token] = escaped
            html = html.replace(escaped, token)
        if value in text:
            token = f"{TOKEN_MARK}{role}:t%"
            substitutions[token] = value
            text = text.replace(value, token)
    if not substitutions or _over_substitution_limit(substitutions):
        return own
    if substitute(html, substitutions) != send.html_body or substitute(text, substitutions) != send.text_body:
        return own
    return html, text, substitutions


def _longest_first(item: tuple[str, str]) -> int:
    return -len(item[1])


# What markupsafe's escape changes; a value without any of them is its own escaped form.
_HTML_SPECIAL = frozenset("&<>'\"")


def _over_substitution_limit(substitutions: dict[str, str]) -> bool:
    """Whether `len(json.dumps(substitutions).encode())` (SendGrid's count) is over the limit;
    measured only when it could be (JSON writes a character in twelve bytes at most: one beyond
    the BMP, an emoji say, as two `\\uXXXX` escapes)."""
    bound = sum(12 * (len(token) + len(value)) + 6 for token, value in substitutions.items()) + 2
    return bound > MAX_SUBSTITUTION_BYTES and len(json.dumps(substitutions).encode()) > MAX_SUBSTITUTION_BYTES


def request_bodies(batch: Sequence[EmailSend]) -> list[tuple[dict[str, Any], list[EmailSend]]]:
    """The /v3/mail/send bodies for `batch`, each with the sends it carries."""
    groups: dict[tuple[str, str, str, str], list[tuple[EmailSend, dict[str, str]]]] = {}
    for send in batch:
        html, text, substitutions = factor(send)
        groups.setdefault((send.sender_email, send.sender_name, html, text), []).append((send, substitutions))
    bodies = []
    for (sender_email, sender_name, html, text), members in groups.items():
        sender = {"email": sender_email, "name": sender_name} if sender_name else {"email": sender_email}
        content = [{"type": kind, "value": value} for kind, value in (("text/plain", text), ("text/html", html)) if value]
        for start in range(0, len(members), MAX_PERSONALIZATIONS):
            chunk = members[start : start + MAX_PERSONALIZATIONS]
            body = {
                "personalizations": [personalization(send, substitutions) for send, substitutions in chunk],
                "from": sender,
                "content": content,
            }
            bodies.append((body, [send for send, _ in chunk]))
    return bodies


def personalization(send: EmailSend, substitutions: dict[str, str]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "to": [{"email": send.to}],
        "subject": send.subject,
        "headers": send.headers(),
        "custom_args": {"request": send.request, "tenant": send.tenant},
    }
    if substitutions:
        entry["substitutions"] = substitutions
    return entry


def classify(error: Exception) -> Verdict | None:
    if isinstance(error, HTTPError):
        reason = sendgrid_reason(error)
        if error.status_code == 429 or error.status_code >= 500:
            return Verdict("retry", reason, _retry_after_s(error))
        return Verdict("failed", reason)
    # urllib raises URLError while connecting and while sending. Only a connection that never
    # opened is certain not to have reached SendGrid; a timeout or a reset while the body was
    # going out may have left SendGrid with the whole request, so that is not sent again.
    if isinstance(error, URLError):
        if isinstance(error.reason, (ConnectionRefusedError, socket.gaierror)):
            return Verdict("retry", f"SendGrid unreachable: {error.reason}")
        return Verdict("unknown", f"SendGrid may have the request, the connection failed while sending: {error.reason}")
    if isinstance(error, (OSError, http.client.HTTPException)):
        return Verdict("unknown", f"no answer from SendGrid after sending: {error!r}")
    return None


def sendgrid_reason(error: HTTPError) -> str:
    """SendGrid's own words: `{"errors": [{"message", "field"}]}`, else the HTTP status."""
    try:
        errors = json.loads(error.body)["errors"]
        details = "; ".join(
            f"{item['message']} ({item['field']})" if item.get("field") else item["message"] for item in errors
        )
    except (ValueError, KeyError, TypeError):
        details = str(error.reason)
    return f"SendGrid {error.status_code}: {details}"


def _retry_after_s(error: HTTPError) -> float:
    try:
        return float((error.headers or {}).get("Retry-After") or 0)
    except ValueError:
        return 0.0


class SendGridProvider:
    name = "sendgrid"

    def __init__(
        self,
        api_key: str,
        *,
        host: str = SENDGRID_HOST,
        rate_per_s: float = 10.0,
        retry: Retry = Retry(),
        timeout_s: float = 60.0,
        concurrency: int = 4,
    ) -> None:
        self._client = sendgrid.SendGridAPIClient(api_key, host=host)
        self._limiter = RateLimiter(rate_per_s)
        self._retry = retry
        self._timeout_s = timeout_s
        self._slots = asyncio.Semaphore(concurrency)

    async def send_email(self, batch: Sequence[EmailSend]) -> list[ProviderResult]:
        results: dict[str, ProviderResult] = {}

        async def send_request(body: dict[str, Any], sends: list[EmailSend]) -> None:
            async with self._slots:
                outcome = await deliver(partial(self._post, body), classify, retry=self._retry, limiter=self._limiter)
            for send in sends:
                results[send.request] = ProviderResult(
                    send.request, outcome.status, self.name, outcome.provider_id, outcome.error
                )

        await asyncio.gather(*(send_request(body, sends) for body, sends in request_bodies(batch)))
        return [results[send.request] for send in batch]

    def _post(self, body: dict[str, Any]) -> str | None:
        # The client would encode the body with json.dumps, ten times orjson's cost for a
        # thousand personalizations; with a Content-Type of its own it sends a body as it is.
        response = self._client.client.mail.send.post(
            request_body=EncodedBody(orjson.dumps(body)), request_headers=JSON_HEADERS, timeout=self._timeout_s
        )
        return response.headers.get("X-Message-Id")


class EncodedBody(bytes):
    """The bytes orjson made, as the client takes a body that is not `application/json`: it calls
    the body's `encode("utf-8")` (text would be decoded and encoded again), then formats the bytes
    whole into a debug line, logged or not. For a thousand mails, a megabyte, that was 3.8 of the
    5.3 ms the client took to make a request. These bytes encode to themselves and format as their size."""

    def encode(self, encoding: str) -> bytes:
        return self

    def __format__(self, spec: str) -> str:
        return f"<{len(self)} bytes>"
