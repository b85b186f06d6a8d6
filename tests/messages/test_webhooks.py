from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from workers.envelope import CALLBACKS
from workers.messages.webhooks import WebhookRefused, sendgrid_reports, sms_reports, sns_message, trusted_url
from workers.schemas import problem

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
TOPIC = "arn:aws:sns:eu-west-1:123456789012:usher-sms-events"


@pytest.mark.parametrize(
    ("url", "trusted"),
    [
        ("https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-abc.pem", True),
        ("https://amazonaws.com/cert.pem", True),
        ("http://sns.eu-west-1.amazonaws.com/cert.pem", False),
        ("https://sns.eu-west-1.amazonaws.com.attacker.example/cert.pem", False),
        ("https://notamazonaws.com/cert.pem", False),
        ("https://sns.amazonaws.com:8443/cert.pem", False),
        ("not a url", False),
        (None, False),
    ],
)
def test_only_trusted_hosts_are_followed(url: str | None, trusted: bool) -> None:
    assert trusted_url(url, ["https://amazonaws.com"]) is trusted


def test_a_local_stand_in_is_trusted_only_with_its_port() -> None:
    assert trusted_url("http://127.0.0.1:8123/cert.pem", ["http://127.0.0.1:8123"])
    assert not trusted_url("http://127.0.0.1:9999/cert.pem", ["http://127.0.0.1:8123"])


def notification(message: dict, **fields: str) -> dict:
    return {"Type": "Notification", "MessageId": "sns-1", "TopicArn": TOPIC, "Timestamp": "2026-11-30T12:00:05.000Z",
            "Message": json.dumps(message), "SignatureVersion": "2", "Signature": "c2ln",
            "SigningCertURL": "https://sns.eu-west-1.amazonaws.com/cert.pem"} | fields


def test_an_sns_message_from_another_topic_or_incomplete_is_refused() -> None:
    good = notification({})
    assert sns_message(json.dumps(good).encode(), [TOPIC])["MessageId"] == "sns-1"
    with pytest.raises(WebhookRefused, match="is not one this webhook takes"):
        sns_message(json.dumps(good | {"TopicArn": "arn:aws:sns:eu-west-1:999:other"}).encode(), [TOPIC])
    with pytest.raises(WebhookRefused, match="lacks one of"):
        sns_message(json.dumps({k: v for k, v in good.items() if k != "Timestamp"}).encode(), [])
    with pytest.raises(WebhookRefused, match="SignatureVersion"):
        sns_message(json.dumps(good | {"SignatureVersion": "3"}).encode(), [])
    with pytest.raises(WebhookRefused, match="not JSON"):
        sns_message(b"<xml/>", [])


def test_an_end_user_messaging_event_names_its_request_and_tenant_from_the_send_context() -> None:
    event = {"eventType": "TEXT_DELIVERED", "eventVersion": "1.0", "eventTimestamp": 1764504003000, "isFinal": True,
             "messageId": "862a8790", "destinationPhoneNumber": "+32470000000", "messageStatus": "DELIVERED",
             "context": {"request": "req-1", "tenant": "t1"}}

    [out] = sms_reports(notification(event), None, NOW)

    assert out.topic == CALLBACKS and out.key == "t1/req-1" and problem(out.event) is None
    data = out.event["data"]
    assert (data["provider"], data["request"], data["provider_id"], data["event"], data["at"]) == (
        "end-user-messaging", "req-1", "862a8790", "TEXT_DELIVERED", "2025-11-30T12:00:03.000Z")
    assert data["raw"] == event


def test_an_sns_delivery_log_is_keyed_by_its_message_for_correlation() -> None:
    log = {"notification": {"messageId": "a1b2", "timestamp": "2026-11-30 12:00:01.000"}, "status": "FAILURE",
           "delivery": {"providerResponse": "Phone is currently unreachable"}}

    [out] = sms_reports(notification(log), "t1", NOW)
    assert out.key == "t1/sns/a1b2" and out.event["data"]["request"] is None and out.event["data"]["event"] == "FAILURE"
    assert sms_reports(notification(log), None, NOW) == []  # no tenant: nothing can use it
    assert sms_reports(notification({"unrelated": True}), "t1", NOW) == []


def test_sendgrid_events_become_reports_and_a_repeat_keeps_its_id() -> None:
    delivered = {"email": "ann@example.com", "timestamp": 1764504000, "event": "delivered", "sg_event_id": "ZGVs==",
                 "sg_message_id": "W86EgYT6.filter-1", "request": "req-1", "tenant": "t1"}
    without_args = {"email": "bob@example.com", "timestamp": 1764504000, "event": "open", "sg_event_id": "b3Bl",
                    "sg_message_id": "W86EgYT6.filter-2"}

    first = sendgrid_reports([delivered, without_args, "junk"], "t9", NOW)
    again = sendgrid_reports([delivered], None, NOW)

    assert [(out.key, out.event["tenant"], out.event["data"]["request"]) for out in first] == [
        ("t1/req-1", "t1", "req-1"), ("t9/sendgrid/W86EgYT6", "t9", None)]
    assert again[0].event["id"] == first[0].event["id"]
    assert all(problem(out.event) is None for out in first)
    assert sendgrid_reports([without_args], None, NOW) == []
    with pytest.raises(WebhookRefused):
        sendgrid_reports({"event": "open"}, "t1", NOW)
