from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError
from botocore.stub import Stubber
from moto.core import DEFAULT_ACCOUNT_ID
from moto.sns.models import sns_backends

from workers.messages.providers import Retry, SmsSend
from workers.messages.providers.sms import EndUserMessagingProvider, SnsProvider, aws_client, classify

REGION = "eu-west-1"
QUICK = Retry(attempts=3, first_delay_s=0.01)
TEXT = SmsSend(request="req-1", tenant="t1", to="+32470000000", sender="VENUE", text="Hamlet: doors at 19:00",
               marketing=True)


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_SESSION_TOKEN", "testing")):
        monkeypatch.setenv(name, value)


def sms_sent_through_sns() -> dict[str, tuple[str, str]]:
    return dict(sns_backends[DEFAULT_ACCOUNT_ID][REGION].sms_messages)


async def test_sns_publishes_to_the_phone_number(moto_endpoint: str) -> None:
    sns = SnsProvider(aws_client("sns", region=REGION, endpoint_url=moto_endpoint), rate_per_s=0, retry=QUICK)

    results = await sns.send_sms([TEXT])

    assert (results[0].request, results[0].status, results[0].provider) == ("req-1", "sent", "sns")
    assert sms_sent_through_sns()[results[0].provider_id or ""] == ("+32470000000", "Hamlet: doors at 19:00")


async def test_an_invalid_number_fails_before_aws_is_asked(moto_endpoint: str) -> None:
    sns = SnsProvider(aws_client("sns", region=REGION, endpoint_url=moto_endpoint), rate_per_s=0, retry=QUICK)
    before = sms_sent_through_sns()

    results = await sns.send_sms([
        SmsSend(request="req-2", tenant="t1", to="+3247000", sender=None, text="x"),
        SmsSend(request="req-3", tenant="t1", to="+32 470 00 00 00", sender=None, text="x"),
    ])

    assert [(r.status, r.error) for r in results] == [
        ("failed", "invalid phone number '+3247000'"),
        ("failed", "invalid phone number '+32 470 00 00 00'"),
    ]
    assert sms_sent_through_sns() == before


def end_user_messaging(**options: Any) -> tuple[EndUserMessagingProvider, Stubber]:
    client = aws_client("end-user-messaging", region=REGION)
    provider = EndUserMessagingProvider(client, rate_per_s=0, retry=QUICK, **options)
    return provider, Stubber(client)


EXPECTED = {
    "DestinationPhoneNumber": "+32470000000",
    "MessageBody": "Hamlet: doors at 19:00",
    "MessageType": "PROMOTIONAL",
    "Context": {"request": "req-1", "tenant": "t1"},
    "OriginationIdentity": "VENUE",
    "ConfigurationSetName": "usher-events",
}


async def test_end_user_messaging_sends_with_the_request_as_context() -> None:
    provider, stubber = end_user_messaging(configuration_set="usher-events")
    stubber.add_response("send_text_message", {"MessageId": "862a8790-60c0"}, EXPECTED)

    with stubber:
        results = await provider.send_sms([TEXT])

    stubber.assert_no_pending_responses()
    assert [(r.status, r.provider, r.provider_id) for r in results] == [("sent", "end-user-messaging", "862a8790-60c0")]


async def test_a_transactional_text_without_sender_leaves_the_choice_to_aws() -> None:
    provider, stubber = end_user_messaging()
    expected = {k: v for k, v in EXPECTED.items() if k not in ("OriginationIdentity", "ConfigurationSetName")}
    stubber.add_response("send_text_message", {"MessageId": "m-2"}, expected | {"MessageType": "TRANSACTIONAL"})

    with stubber:
        results = await provider.send_sms([SmsSend(request="req-1", tenant="t1", to="+32470000000", sender=None,
                                                   text="Hamlet: doors at 19:00")])

    assert results[0].status == "sent"


@pytest.mark.parametrize(("code", "http_status"), [("ThrottlingException", 400), ("InternalServerException", 500)])
async def test_throttling_and_server_errors_are_retried(code: str, http_status: int) -> None:
    provider, stubber = end_user_messaging(configuration_set="usher-events")
    stubber.add_client_error("send_text_message", code, "Rate exceeded", http_status, expected_params=EXPECTED)
    stubber.add_response("send_text_message", {"MessageId": "m-3"}, EXPECTED)

    with stubber:
        results = await provider.send_sms([TEXT])

    stubber.assert_no_pending_responses()
    assert (results[0].status, results[0].provider_id) == ("sent", "m-3")


async def test_a_permanent_error_fails_with_aws_message_without_retrying() -> None:
    provider, stubber = end_user_messaging(configuration_set="usher-events")
    stubber.add_client_error("send_text_message", "ValidationException",
                             "The destination phone number is opted out", 400, expected_params=EXPECTED)

    with stubber:
        results = await provider.send_sms([TEXT])

    stubber.assert_no_pending_responses()
    assert (results[0].status, results[0].error) == (
        "failed", "ValidationException: The destination phone number is opted out",
    )


def test_connection_errors_are_retried_only_when_nothing_was_sent() -> None:
    assert classify(EndpointConnectionError(endpoint_url="https://sms-voice.eu-west-1.amazonaws.com")).outcome == "retry"
    assert classify(ConnectTimeoutError(endpoint_url="https://sms-voice.eu-west-1.amazonaws.com")).outcome == "retry"
    assert classify(ReadTimeoutError(endpoint_url="https://sms-voice.eu-west-1.amazonaws.com")).outcome == "unknown"
    assert classify(KeyError("a bug")) is None
