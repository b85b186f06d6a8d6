"""What the messages stage hands to a provider and what it gets back.

A provider takes a batch of rendered messages and answers one `ProviderResult`
per message, in the batch's order: `sent` (the provider accepted it), `failed`
(it refused it for good, or could not be reached after the retries) or `unknown`
(the request may have reached the provider but no answer came back: resending
could deliver it twice, so a person decides). Providers never raise for a
message they could not send.

The provider modules are imported only when chosen, so an outbox-only worker
does not load boto3 or the SendGrid client.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import phonenumbers

from workers.messages.render import substitute

Status = Literal["sent", "failed", "unknown"]

EMAIL_PROVIDERS = ("outbox", "sendgrid")
SMS_PROVIDERS = ("outbox", "end-user-messaging", "sns")
SENDGRID_HOST = "https://api.sendgrid.com"

log = logging.getLogger(__name__)


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs more, and one is made for every mail
class EmailSend:
    request: str
    tenant: str
    to: str
    sender_email: str
    sender_name: str
    subject: str
    # The bodies, with a token for each of the recipient's own values when the message was
    # rendered once for all its recipients, and those tokens' values (see `render.Factored`).
    html_body: str
    text_body: str
    substitutions: Mapping[str, str] = field(default_factory=dict)
    # Marketing mail only: the List-Unsubscribe headers point here.
    unsubscribe_url: str | None = None
    test: bool = False
    # The recipient's own values in the content (name, links), by role: lets a provider
    # factor a mail rendered on its own (without substitutions) into a shared body.
    personal: tuple[tuple[str, str], ...] = ()

    @property
    def html(self) -> str:
        """The HTML as the recipient gets it."""
        return substitute(self.html_body, self.substitutions)

    @property
    def text(self) -> str:
        return substitute(self.text_body, self.substitutions)

    def headers(self) -> dict[str, str]:
        headers = {"X-Usher-Request": self.request}
        if self.unsubscribe_url:
            headers["List-Unsubscribe"] = f"<{self.unsubscribe_url}>"
            headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        if self.test:
            headers["X-Usher-Test"] = "yes"
        return headers


@dataclass(frozen=True, slots=True)
class SmsSend:
    request: str
    tenant: str
    to: str
    sender: str | None
    text: str
    marketing: bool = False


@dataclass(frozen=True, slots=True)
class ProviderResult:
    request: str
    status: Status
    provider: str
    provider_id: str | None = None
    error: str | None = None


class EmailProvider(Protocol):
    name: str

    async def send_email(self, batch: Sequence[EmailSend]) -> list[ProviderResult]: ...


class SmsProvider(Protocol):
    name: str

    async def send_sms(self, batch: Sequence[SmsSend]) -> list[ProviderResult]: ...


def e164(phone: str) -> str | None:
    """`phone` in E.164 form (`+32470000000`), or None when it is not a valid number.
    Only international numbers are accepted: without a country there is no way to tell."""
    try:
        number = phonenumbers.parse(phone, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


@dataclass(frozen=True, slots=True)
class Retry:
    """Exponential backoff: `first_delay_s`, doubled per attempt, at most `max_delay_s`."""

    attempts: int = 5
    first_delay_s: float = 0.5
    max_delay_s: float = 30.0

    def delay(self, attempt: int, hint_s: float = 0.0) -> float:
        return min(max(self.first_delay_s * 2**attempt, hint_s), self.max_delay_s)


class RateLimiter:
    """Spaces calls at least 1/rate seconds apart; a rate of 0 means no limit."""

    def __init__(self, rate_per_s: float) -> None:
        self._interval = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
        self._next = 0.0

    async def acquire(self) -> None:
        if not self._interval:
            return
        now = asyncio.get_running_loop().time()
        slot = max(now, self._next)
        self._next = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)


class Verdict(NamedTuple):
    """What a provider's error means: try again (`retry`), give up (`failed`), or
    `unknown` when the request may have been accepted. `wait_s` is the provider's
    own hint for when to come back."""

    outcome: Literal["retry", "failed", "unknown"]
    reason: str
    wait_s: float = 0.0


class Outcome(NamedTuple):
    status: Status
    provider_id: str | None
    error: str | None


async def deliver(
    call: Callable[[], str | None],
    classify: Callable[[Exception], Verdict | None],
    *,
    retry: Retry,
    limiter: RateLimiter,
) -> Outcome:
    """Runs the blocking `call` (which returns the provider's id) in a thread,
    within the rate limit, retrying as `classify` says. An error `classify` does
    not know is a bug and propagates."""
    for attempt in range(retry.attempts):
        await limiter.acquire()
        try:
            return Outcome("sent", await asyncio.to_thread(call), None)
        except Exception as error:
            verdict = classify(error)
            if verdict is None:
                raise
        if verdict.outcome != "retry":
            return Outcome(verdict.outcome, None, verdict.reason)
        if attempt + 1 < retry.attempts:
            delay = retry.delay(attempt, verdict.wait_s)
            log.warning("provider call failed (%s); attempt %d of %d in %.1f s", verdict.reason, attempt + 2, retry.attempts, delay)
            await asyncio.sleep(delay)
    return Outcome("failed", None, f"gave up after {retry.attempts} attempts: {verdict.reason}")


def make_email_provider(
    name: str = "outbox",
    *,
    outbox_dir: Path = Path("./outbox"),
    sendgrid_api_key: str = "",
    sendgrid_host: str = SENDGRID_HOST,
    rate_per_s: float = 10.0,
    retry: Retry = Retry(),
) -> EmailProvider:
    """The e-mail provider named by USHER_EMAIL_PROVIDER (`outbox` or `sendgrid`)."""
    if name == "outbox":
        from workers.messages.providers.outbox import OutboxProvider

        return OutboxProvider(outbox_dir)
    if name == "sendgrid":
        if not sendgrid_api_key:
            raise ValueError("the sendgrid e-mail provider needs an API key (USHER_SENDGRID_API_KEY)")
        from workers.messages.providers.sendgrid import SendGridProvider

        return SendGridProvider(sendgrid_api_key, host=sendgrid_host, rate_per_s=rate_per_s, retry=retry)
    raise ValueError(f"unknown e-mail provider {name!r}: use one of {', '.join(EMAIL_PROVIDERS)}")


def make_sms_provider(
    name: str = "outbox",
    *,
    outbox_dir: Path = Path("./outbox"),
    aws_region: str = "eu-west-1",
    endpoint_url: str | None = None,
    configuration_set: str | None = None,
    rate_per_s: float = 20.0,
    retry: Retry = Retry(),
) -> SmsProvider:
    """The SMS provider named by USHER_SMS_PROVIDER (`outbox`, `end-user-messaging` or `sns`)."""
    if name == "outbox":
        from workers.messages.providers.outbox import OutboxProvider

        return OutboxProvider(outbox_dir)
    if name in ("end-user-messaging", "sns"):
        from workers.messages.providers import sms

        client = sms.aws_client(name, region=aws_region, endpoint_url=endpoint_url)
        if name == "sns":
            return sms.SnsProvider(client, rate_per_s=rate_per_s, retry=retry)
        return sms.EndUserMessagingProvider(
            client, configuration_set=configuration_set, rate_per_s=rate_per_s, retry=retry
        )
    raise ValueError(f"unknown SMS provider {name!r}: use one of {', '.join(SMS_PROVIDERS)}")
