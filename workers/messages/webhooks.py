"""Provider webhooks: checking they come from the provider, and turning their
events into `delivery.reported` records for `provider.callbacks`.

- SendGrid's signed event webhook: an ECDSA signature over the timestamp header
  followed by the raw body, checked with the `sendgrid` package's own helper.
  Custom arguments name the request and tenant (the provider puts them on every
  personalization).
- AWS SMS delivery events reach us through an SNS HTTP(S) subscription. SNS
  signs every message (SignatureVersion 1: SHA1withRSA, 2: SHA256withRSA) with
  the certificate at `SigningCertURL`; that URL, and a subscription's
  `SubscribeURL`, are only followed to trusted hosts (amazonaws.com in
  production), so a forged message cannot make us fetch from anywhere.
  End User Messaging events carry the send's `Context` (request and tenant);
  SNS's own SMS delivery logs carry only the message id.

An event that names no tenant takes the webhook URL's `?tenant=` (one URL per
tenant's provider account); one with no tenant at all, or with neither request
nor provider message id, cannot be attributed and is left out.
"""
from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import orjson
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from sendgrid.helpers.eventwebhook import EventWebhook

from workers.envelope import CALLBACKS, ID_PATTERN, Out, isotime, make_event, parse_time, stable_id
from workers.messages.rules import callback_key

log = logging.getLogger(__name__)

SENDGRID_SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"
SENDGRID_SOURCE = "/usher/webhooks/sendgrid"
SMS_SOURCE = "/usher/webhooks/sms"

# The fields SNS signs, in the order it signs them (Subject only when present).
SNS_SIGNED_FIELDS = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
    "UnsubscribeConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"),
}
SNS_HASHES = {"1": hashes.SHA1, "2": hashes.SHA256}


class WebhookRefused(Exception):
    """A webhook call that is not from the provider, or not one it would make."""


def _event_id(provider: str, identity: str) -> str:
    """The same provider event gives the same CloudEvent id, so its repeats are dropped."""
    return stable_id(f"usher:webhook:{provider}:{identity}")


def _id_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and ID_PATTERN.fullmatch(value) else None


def _report(
    provider: str, source: str, event_id: str, tenant: str | None, request: Any, provider_id: Any, name: Any,
    at: str, raw: Mapping[str, Any],
) -> Out | None:
    """A `delivery.reported` for `provider.callbacks`, or None when nothing could use it
    (no tenant, no event name, or neither a request id nor a provider message id)."""
    if tenant is None or not isinstance(name, str) or not name:
        return None
    data = {
        "provider": provider,
        "request": _id_or_none(request),
        "provider_id": provider_id if isinstance(provider_id, str) and provider_id else None,
        "event": name,
        "at": at,
        "raw": dict(raw),
    }
    event = make_event("delivery.reported", tenant, data, source=source, id_=event_id)
    record_key = callback_key(event)
    return Out(CALLBACKS, record_key, event) if record_key else None


# --- SendGrid ---------------------------------------------------------------------------------


class SendGridVerifier:
    """Checks SendGrid's signature with the public key from its Mail Settings
    (base64 DER, as SendGrid shows it)."""

    def __init__(self, public_key: str) -> None:
        self._webhook = EventWebhook(public_key)

    def verify(self, body: bytes, signature: str | None, timestamp: str | None) -> None:
        if not signature or not timestamp:
            raise WebhookRefused(f"the request carries no {SENDGRID_SIGNATURE} and {SENDGRID_TIMESTAMP}")
        try:
            valid = self._webhook.verify_signature(body.decode("utf-8"), signature, timestamp)
        except (UnicodeDecodeError, binascii.Error, ValueError):
            valid = False
        if not valid:
            raise WebhookRefused("the SendGrid signature does not match")


def sendgrid_reports(events: Any, tenant_hint: str | None, now: datetime) -> list[Out]:
    """One `delivery.reported` per SendGrid event (a JSON array of event objects)."""
    if not isinstance(events, list):
        raise WebhookRefused("SendGrid posts a JSON array of events")
    outs = []
    for raw in events:
        if not isinstance(raw, dict):
            continue
        identity = raw.get("sg_event_id") or orjson.dumps(raw, option=orjson.OPT_SORT_KEYS).decode()
        out = _report(
            "sendgrid",
            SENDGRID_SOURCE,
            _event_id("sendgrid", str(identity)),
            _id_or_none(raw.get("tenant")) or tenant_hint,
            raw.get("request"),
            raw.get("sg_message_id"),
            raw.get("event"),
            _epoch_time(raw.get("timestamp"), now),
            raw,
        )
        if out is None:
            log.warning("sendgrid webhook: left out an event that names no tenant or message: %s", raw.get("sg_event_id"))
        else:
            outs.append(out)
    return outs


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _epoch_time(seconds: Any, now: datetime) -> str:
    """Seconds since the epoch as Usher writes times; `now` when the provider gave none."""
    if _is_number(seconds):
        try:
            return isotime(datetime.fromtimestamp(seconds, timezone.utc))
        except (OverflowError, OSError, ValueError):
            pass
    return isotime(now)


# --- AWS SMS through SNS ----------------------------------------------------------------------


def trusted_url(url: Any, trusted: Sequence[str]) -> bool:
    """Whether `url` is on one of the `trusted` `scheme://host[:port]` (subdomains included)."""
    if not isinstance(url, str):
        return False
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    host = (parts.hostname or "").lower()
    for entry in trusted:
        allowed = urlsplit(entry.strip())
        allowed_host = (allowed.hostname or "").lower()
        if not allowed_host or parts.scheme != allowed.scheme:
            continue
        if (host == allowed_host or host.endswith("." + allowed_host)) and port == allowed.port:
            return True
    return False


def sns_message(body: bytes, topic_arns: Sequence[str]) -> dict[str, Any]:
    """The SNS message posted to the webhook, if it is one we take (signature not yet checked)."""
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise WebhookRefused("not an SNS message: not JSON") from None
    if not isinstance(message, dict) or message.get("Type") not in SNS_SIGNED_FIELDS:
        raise WebhookRefused("not an SNS message")
    fields = SNS_SIGNED_FIELDS[message["Type"]]
    if not all(isinstance(message.get(name), str) for name in fields if name != "Subject"):
        raise WebhookRefused(f"the SNS {message['Type']} lacks one of {', '.join(fields)}")
    if message.get("SignatureVersion") not in SNS_HASHES or not isinstance(message.get("Signature"), str):
        raise WebhookRefused("the SNS message is not signed with a known SignatureVersion")
    if topic_arns and message["TopicArn"] not in topic_arns:
        raise WebhookRefused(f"SNS topic {message['TopicArn']!r} is not one this webhook takes")
    return message


def sns_string_to_sign(message: Mapping[str, Any]) -> bytes:
    fields = SNS_SIGNED_FIELDS[message["Type"]]
    return "".join(f"{name}\n{message[name]}\n" for name in fields if name in message).encode()


def verify_sns(message: Mapping[str, Any], certificate_pem: bytes) -> None:
    """Checks the message's signature with the SNS signing certificate."""
    try:
        key = x509.load_pem_x509_certificate(certificate_pem).public_key()
        signature = base64.b64decode(message["Signature"], validate=True)
    except (ValueError, binascii.Error):
        raise WebhookRefused("the SNS signing certificate or signature cannot be read") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise WebhookRefused("the SNS signing certificate does not hold an RSA key")
    try:
        key.verify(signature, sns_string_to_sign(message), padding.PKCS1v15(), SNS_HASHES[message["SignatureVersion"]]())
    except InvalidSignature:
        raise WebhookRefused("the SNS signature does not match") from None


def sms_reports(notification: Mapping[str, Any], tenant_hint: str | None, now: datetime) -> list[Out]:
    """The `delivery.reported` in an SNS Notification: an End User Messaging SMS
    event, or an SNS SMS delivery log. Anything else on the topic is left out."""
    try:
        body = orjson.loads(notification["Message"])
    except orjson.JSONDecodeError:
        return []
    if not isinstance(body, dict):
        return []
    event_id = _event_id("sns", notification["MessageId"])
    sent_at = _sns_time(notification, now)
    if "eventType" in body:
        context = body.get("context") if isinstance(body.get("context"), dict) else {}
        millis = body.get("eventTimestamp")
        out = _report(
            "end-user-messaging", SMS_SOURCE, event_id, _id_or_none(context.get("tenant")) or tenant_hint,
            context.get("request"), body.get("messageId"), body["eventType"],
            _epoch_time(millis / 1000 if _is_number(millis) else None, sent_at), body,
        )
    elif isinstance(body.get("notification"), dict) and "status" in body:
        out = _report(
            "sns", SMS_SOURCE, event_id, tenant_hint, None, body["notification"].get("messageId"), body["status"],
            isotime(sent_at), body,
        )
    else:
        return []
    if out is None:
        log.warning("sms webhook: left out an event that names no tenant or message: %s", notification["MessageId"])
        return []
    return [out]


def _sns_time(notification: Mapping[str, Any], now: datetime) -> datetime:
    """When SNS sent the notification, the event's time when it carries none."""
    try:
        return parse_time(notification["Timestamp"])
    except ValueError:
        return now
