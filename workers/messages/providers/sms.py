"""SMS through boto3: AWS End User Messaging (`pinpoint-sms-voice-v2`
`send_text_message`) or SNS `publish` to a phone number.

The number is checked to be E.164 before AWS is asked. Throttling and server
errors are retried with exponential backoff (botocore's own retries are off, so
one place decides what is retried); any other AWS error fails the message with
AWS's message. A connection that breaks after the request went out leaves the
message `unknown`: AWS may have accepted it.
"""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import partial
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, EndpointConnectionError

from workers.messages.providers import ProviderResult, RateLimiter, Retry, SmsSend, Verdict, deliver, e164

SERVICES = {"end-user-messaging": "pinpoint-sms-voice-v2", "sns": "sns"}
RETRYABLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "InternalServerException",
        "InternalFailure",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
    }
)


def aws_client(provider: str, *, region: str, endpoint_url: str | None = None) -> Any:
    return boto3.client(
        SERVICES[provider],
        region_name=region,
        endpoint_url=endpoint_url,
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}),
    )


def classify(error: Exception) -> Verdict | None:
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        message = error.response.get("Error", {}).get("Message") or code
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in RETRYABLE_CODES or status == 429 or status >= 500:
            return Verdict("retry", f"{code}: {message}")
        return Verdict("failed", f"{code}: {message}")
    if isinstance(error, (EndpointConnectionError, ConnectTimeoutError)):
        return Verdict("retry", f"AWS unreachable: {error}")
    if isinstance(error, BotoCoreError):
        return Verdict("unknown", f"no answer from AWS after sending: {error}")
    return None


class _AwsSmsProvider(ABC):
    name: str

    def __init__(self, client: Any, *, rate_per_s: float = 20.0, retry: Retry = Retry()) -> None:
        self.client = client
        self._limiter = RateLimiter(rate_per_s)
        self._retry = retry

    async def send_sms(self, batch: Sequence[SmsSend]) -> list[ProviderResult]:
        return list(await asyncio.gather(*(self._send(send) for send in batch)))

    async def _send(self, send: SmsSend) -> ProviderResult:
        if e164(send.to) != send.to:
            return ProviderResult(send.request, "failed", self.name, error=f"invalid phone number {send.to!r}")
        outcome = await deliver(partial(self._call, send), classify, retry=self._retry, limiter=self._limiter)
        return ProviderResult(send.request, outcome.status, self.name, outcome.provider_id, outcome.error)

    @abstractmethod
    def _call(self, send: SmsSend) -> str | None:
        """Hands `send` to AWS and returns AWS's message id."""


class EndUserMessagingProvider(_AwsSmsProvider):
    name = "end-user-messaging"

    def __init__(self, client: Any, *, configuration_set: str | None = None, **options: Any) -> None:
        super().__init__(client, **options)
        self.configuration_set = configuration_set

    def _call(self, send: SmsSend) -> str | None:
        params: dict[str, Any] = {
            "DestinationPhoneNumber": send.to,
            "MessageBody": send.text,
            "MessageType": "PROMOTIONAL" if send.marketing else "TRANSACTIONAL",
            # Logged with every delivery event, so a callback finds its request.
            "Context": {"request": send.request, "tenant": send.tenant},
        }
        if send.sender:
            params["OriginationIdentity"] = send.sender
        if self.configuration_set:
            params["ConfigurationSetName"] = self.configuration_set
        return self.client.send_text_message(**params).get("MessageId")


class SnsProvider(_AwsSmsProvider):
    name = "sns"

    def _call(self, send: SmsSend) -> str | None:
        attributes = {
            "AWS.SNS.SMS.SMSType": {
                "DataType": "String",
                "StringValue": "Promotional" if send.marketing else "Transactional",
            }
        }
        if send.sender:
            attributes["AWS.SNS.SMS.SenderID"] = {"DataType": "String", "StringValue": send.sender}
        return self.client.publish(PhoneNumber=send.to, Message=send.text, MessageAttributes=attributes).get(
            "MessageId"
        )
