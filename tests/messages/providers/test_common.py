from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from workers.messages.providers import (
    RateLimiter,
    Retry,
    Verdict,
    deliver,
    e164,
    make_email_provider,
    make_sms_provider,
)


@pytest.mark.parametrize(
    ("phone", "expected"),
    [
        ("+32470000000", "+32470000000"),
        ("+32 470 00 00 00", "+32470000000"),
        ("+47 912 34 567", "+4791234567"),
        ("+3247000", None),
        ("0470000000", None),
        ("not a number", None),
    ],
)
def test_phone_numbers_are_checked_and_written_in_e164(phone: str, expected: str | None) -> None:
    assert e164(phone) == expected


def test_backoff_doubles_up_to_its_maximum_and_honours_the_providers_hint() -> None:
    retry = Retry(attempts=6, first_delay_s=0.5, max_delay_s=4)
    assert [retry.delay(attempt) for attempt in range(5)] == [0.5, 1, 2, 4, 4]
    assert retry.delay(0, hint_s=3) == 3


async def test_the_rate_limiter_spaces_calls() -> None:
    limiter = RateLimiter(50)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(5):
        await limiter.acquire()
    assert loop.time() - started >= 0.08


async def test_deliver_retries_what_may_be_retried_and_reports_the_last_reason() -> None:
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        raise TimeoutError("busy")

    outcome = await deliver(flaky, lambda error: Verdict("retry", str(error)), retry=Retry(3, 0.001),
                            limiter=RateLimiter(0))

    assert len(attempts) == 3
    assert outcome == ("failed", None, "gave up after 3 attempts: busy")


async def test_deliver_lets_an_unexpected_error_through() -> None:
    def broken() -> str:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await deliver(broken, lambda error: None, retry=Retry(3, 0.001), limiter=RateLimiter(0))


def test_providers_are_chosen_by_name(tmp_path: Path) -> None:
    assert make_email_provider("outbox", outbox_dir=tmp_path).name == "outbox"
    assert make_email_provider("sendgrid", sendgrid_api_key="SG.x").name == "sendgrid"
    assert make_sms_provider("outbox", outbox_dir=tmp_path).name == "outbox"
    assert make_sms_provider("end-user-messaging", aws_region="eu-west-1").name == "end-user-messaging"
    assert make_sms_provider("sns", aws_region="eu-west-1").name == "sns"


def test_a_wrong_provider_choice_says_what_is_possible() -> None:
    with pytest.raises(ValueError, match="unknown e-mail provider 'smtp': use one of outbox, sendgrid"):
        make_email_provider("smtp")
    with pytest.raises(ValueError, match="use one of outbox, end-user-messaging, sns"):
        make_sms_provider("twilio")
    with pytest.raises(ValueError, match="needs an API key"):
        make_email_provider("sendgrid")
