"""The messages stage with real providers' shapes, on a broker of its own: SendGrid (a local
stand-in), SNS (moto's server), their webhooks, and the never-twice rule across restarts and crashes."""
from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from harness import Kafka, WorkerProcess, http, unique

from workers import envelope
from workers.broker import free_port
from workers.messages.webhooks import SENDGRID_SIGNATURE, SENDGRID_TIMESTAMP, sns_string_to_sign

from .conftest import MessagesDriver
from .sendgrid_standin import API_KEY, SendGridStandIn

TENANT = unique("track")
TOKEN = "tracking-token"
TOPIC_ARN = "arn:aws:sns:eu-west-1:123456789012:usher-sms-events"
OPTINS = {
    "newsletter": {"id": "newsletter", "kind": "optional", "purpose": "email", "version": 1, "channels": ["web"],
                   "active": True, "text": {"en": "Newsletter"}},
    "partners": {"id": "partners", "kind": "optional", "purpose": "email", "version": 1, "channels": ["web"],
                 "active": True, "text": {"en": "Partners"}},
    "sms-alerts": {"id": "sms-alerts", "kind": "optional", "purpose": "sms", "version": 1, "channels": ["web"],
                   "active": True, "text": {"en": "Alerts"}},
}
# SendGrid signs its event webhook with an ECDSA P-256 key; its settings show the public key as base64 DER.
SENDGRID_KEY = ec.generate_private_key(ec.SECP256R1())
SENDGRID_PUBLIC_KEY = base64.b64encode(
    SENDGRID_KEY.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
).decode()


class StandIn(SendGridStandIn):
    """The SendGrid stand-in, which can also kill a worker right after accepting its request:
    SendGrid has the mail, the worker never hears so."""

    crash: WorkerProcess | None = None

    def _answer(self, authorization: str | None, raw: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        answer = super()._answer(authorization, raw)
        if self.crash is not None and answer[0] == 202:
            worker, self.crash = self.crash, None
            worker.stop(kill=True)
        return answer

    def requests_for(self, request: str) -> int:
        return sum(1 for body in self.accepted for item in body["personalizations"] if item["custom_args"]["request"] == request)


class SnsStandIn:
    """Where SNS messages point: the signing certificate, and the subscription confirmation URL."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.eu-west-1.amazonaws.com")])
        now = datetime.now(timezone.utc)
        certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                       .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
                       .not_valid_after(now + timedelta(days=1)).sign(self.key, hashes.SHA256()))
        self.pem = certificate.public_bytes(serialization.Encoding.PEM)
        self.confirmed: list[str] = []
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
                if self.path.startswith("/confirm"):
                    standin.confirmed.append(self.path)
                body = standin.pem if self.path == "/cert.pem" else b"<ConfirmSubscriptionResponse/>"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                """Quiet."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def message(self, type_: str, version: str = "2", **fields: str) -> dict[str, Any]:
        """An SNS message of `type_`, signed as SNS signs (SignatureVersion 1: SHA1, 2: SHA256)."""
        message = {"Type": type_, "MessageId": str(uuid.uuid4()), "TopicArn": TOPIC_ARN, "Timestamp": envelope.isotime(),
                   "SignatureVersion": version, "SigningCertURL": f"{self.url}/cert.pem", **fields}
        digest = hashes.SHA1() if version == "1" else hashes.SHA256()
        signature = self.key.sign(sns_string_to_sign(message), padding.PKCS1v15(), digest)
        return message | {"Signature": base64.b64encode(signature).decode()}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def sendgrid() -> Iterator[StandIn]:
    with StandIn() as standin:
        yield standin


@pytest.fixture(scope="module")
def sns() -> Iterator[SnsStandIn]:
    standin = SnsStandIn()
    yield standin
    standin.close()


@pytest.fixture(scope="module")
def tracking(own_broker: str, own_kafka: Kafka, sendgrid: StandIn, sns: SnsStandIn, moto_endpoint: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[MessagesDriver]:
    """`usher worker messages` sending e-mail through the SendGrid stand-in and SMS through moto's SNS,
    on the production store (RocksDB, kept across the tests' restarts and crashes)."""
    env = {
        "USHER_STORE": "rocksdb://",
        "USHER_API_TOKENS": f"{TENANT}={TOKEN}",
        "USHER_SECRET": "test-secret",
        "USHER_EMAIL_PROVIDER": "sendgrid",
        "USHER_SENDGRID_API_KEY": API_KEY,
        "USHER_SENDGRID_HOST": sendgrid.host,
        "USHER_SENDGRID_WEBHOOK_PUBLIC_KEY": SENDGRID_PUBLIC_KEY,
        "USHER_SMS_PROVIDER": "sns",
        "USHER_EMAIL_RATE_PER_S": "0",
        "USHER_SNS_TRUSTED_URLS": sns.url,
        "USHER_SNS_TOPIC_ARNS": TOPIC_ARN,
        "AWS_ENDPOINT_URL_SNS": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    worker = WorkerProcess("messages", own_broker, free_port(), tmp_path_factory.mktemp("tracking"), env).start()
    driver = MessagesDriver(own_kafka, worker, {TENANT: TOKEN})
    driver.configure(TENANT, optins=OPTINS)
    yield driver
    worker.stop()


def post_sendgrid(driver: MessagesDriver, events: list[dict[str, Any]], *, signed: bool = True, query: str = "",
                  tamper: bool = False) -> int:
    timestamp = str(int(time.time()))
    body = json.dumps(events).encode()
    signature = SENDGRID_KEY.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    headers = {SENDGRID_SIGNATURE: base64.b64encode(signature).decode(), SENDGRID_TIMESTAMP: timestamp} if signed else {}
    sent = events + [{"event": "open"}] if tamper else events
    return http("POST", f"{driver.worker.url}/v1/webhooks/sendgrid{query}", sent, headers=headers)[0]


def sendgrid_event(name: str, address: str, message_id: str, *, request: str | None = None, **raw: Any) -> dict[str, Any]:
    event = {"email": address, "timestamp": 1764504000, "event": name, "sg_event_id": unique("sg"),
             "sg_message_id": f"{message_id}.filterdrecv-5bf99c48d-k6kz7-1-0"} | raw
    return event | ({"request": request, "tenant": TENANT} if request else {})


def status_names(records: list[dict[str, Any]]) -> list[str]:
    return [record["data"]["status"] for record in records]


def test_sendgrid_events_become_statuses_history_and_revocations(tracking: MessagesDriver, sendgrid: StandIn) -> None:
    message = unique("msg")
    contacts = [unique("c") for _ in range(2)]
    sent = [tracking.request(TENANT, request=unique("r"), contact=contact, message=message, to={"email": f"{contact}@example.com"})
            for contact in contacts]
    requests = [request["data"]["request"] for request in sent]
    statuses = tracking.statuses(TENANT, lambda found: set(requests) <= set(found))
    first, second = (statuses[request][0]["data"] for request in requests)
    assert (first["status"], first["provider"]) == ("sent", "sendgrid") and first["provider_id"] == second["provider_id"]
    assert [sendgrid.requests_for(request) for request in requests] == [1, 1]

    opened = sendgrid_event("open", f"{contacts[0]}@example.com", first["provider_id"], request=requests[0])
    events = [
        sendgrid_event("delivered", f"{contacts[0]}@example.com", first["provider_id"], request=requests[0]),
        opened,
        sendgrid_event("processed", f"{contacts[0]}@example.com", first["provider_id"], request=requests[0]),
        sendgrid_event("unsubscribe", f"{contacts[1]}@example.com", first["provider_id"], request=requests[1],
                       ip="203.0.113.9", useragent="Mail/1.0"),
    ]
    assert post_sendgrid(tracking, events, signed=False) == 403
    assert post_sendgrid(tracking, events, tamper=True) == 403
    assert post_sendgrid(tracking, events) == 200
    assert post_sendgrid(tracking, [opened]) == 200  # SendGrid's retry of an event already taken
    # Without custom arguments the event is found by its message id and address (the URL names the tenant).
    uncorrelated = sendgrid_event("delivered", f"{contacts[1].upper()}@EXAMPLE.com", second["provider_id"])
    assert post_sendgrid(tracking, [uncorrelated], query=f"?tenant={TENANT}") == 200

    statuses = tracking.statuses(TENANT, lambda found: {"opened", "delivered"} <= set(status_names(found.get(requests[0], [])))
                                 and {"delivered", "unsubscribed"} <= set(status_names(found.get(requests[1], []))))
    assert sorted(status_names(statuses[requests[0]])) == ["delivered", "opened", "sent"]
    assert sorted(status_names(statuses[requests[1]])) == ["delivered", "sent", "unsubscribed"]
    revokes = tracking.kafka.wait_for(envelope.COMMANDS, TENANT, lambda found: len(found) >= 2, type_="consent.revoke")
    assert sorted((r["data"]["contact"], r["data"]["optin"], r["data"]["ip"]) for r in revokes) == [
        (contacts[1], "newsletter", "203.0.113.9"), (contacts[1], "partners", "203.0.113.9")]

    expected = {"sent": 2, "delivered": 2, "opened": 1, "unsubscribed": 1}
    history = tracking.get_until(f"/v1/messages/{TENANT}/{message}/history", TOKEN, lambda body: body["statuses"] == expected)
    assert (history["recipients"], history["orders"]) == (2, 4)
    assert sorted((item["contact"], item["status"]) for item in history["items"]) == sorted(
        [(contacts[0], "opened"), (contacts[1], "unsubscribed")])
    mine = tracking.get_until(f"/v1/contacts/{TENANT}/{contacts[0]}/messages", TOKEN,
                              lambda body: body["items"][0]["status"] == "opened")
    assert mine["total"] == 1 and mine["items"][0]["request"] == requests[0]


def test_sms_delivery_events_come_through_a_verified_sns_subscription(tracking: MessagesDriver, sns: SnsStandIn) -> None:
    url = f"{tracking.worker.url}/v1/webhooks/sms"
    confirmation = sns.message("SubscriptionConfirmation", Message="You have chosen to subscribe", Token="tok-1",
                               SubscribeURL=f"{sns.url}/confirm?Token=tok-1")
    assert http("POST", url, confirmation)[0] == 200 and sns.confirmed == ["/confirm?Token=tok-1"]
    elsewhere = sns.message("SubscriptionConfirmation", Message="x", Token="tok-2", SubscribeURL="https://attacker.example/confirm")
    assert http("POST", url, elsewhere)[0] == 403 and len(sns.confirmed) == 1

    request = tracking.request(TENANT, request=unique("r"), contact=unique("c"), channel="sms", to={"phone": "+32470000003"})
    sent = tracking.statuses(TENANT, lambda found: request["data"]["request"] in found)[request["data"]["request"]][0]["data"]
    assert (sent["status"], sent["provider"]) == ("sent", "sns")
    log = {"notification": {"messageId": sent["provider_id"], "timestamp": "2026-11-30 12:00:01.000"},
           "delivery": {"destination": "+32470000003", "providerResponse": "Message has been accepted by phone"},
           "status": "SUCCESS"}
    delivered = sns.message("Notification", version="1", Message=json.dumps(log))

    forged = delivered | {"Message": json.dumps(log | {"status": "FAILURE"})}
    assert http("POST", f"{url}?tenant={TENANT}", forged)[0] == 403
    untrusted = delivered | {"SigningCertURL": "https://attacker.example/cert.pem"}
    assert http("POST", f"{url}?tenant={TENANT}", untrusted)[0] == 403
    assert http("POST", f"{url}?tenant={TENANT}", delivered)[0] == 200

    statuses = tracking.statuses(TENANT, lambda found: "delivered" in status_names(found[request["data"]["request"]]))
    assert status_names(statuses[request["data"]["request"]]) == ["sent", "delivered"]


def test_a_request_is_never_sent_twice_across_a_restart(tracking: MessagesDriver, sendgrid: StandIn) -> None:
    contact = unique("c")
    first = tracking.request(TENANT, request=unique("r"), contact=contact)
    request = first["data"]["request"]
    tracking.statuses(TENANT, lambda found: request in found)

    tracking.worker.stop(kill=True)
    tracking.worker.start()
    again = first | {"id": unique("evt")}
    tracking.send(again)
    later = tracking.request(TENANT, request=unique("r"), contact=contact)
    statuses = tracking.statuses(TENANT, lambda found: later["data"]["request"] in found)

    assert sendgrid.requests_for(request) == 1 and sendgrid.requests_for(later["data"]["request"]) == 1
    assert {record["id"] for record in statuses[request]} == {statuses[request][0]["id"]}


def test_many_requests_are_sent_once_each_when_published_again_after_a_crash(tracking: MessagesDriver, sendgrid: StandIn) -> None:
    # Enough requests that the ledger's changelog goes out in batches of many records, which is
    # what a restarted worker must read back whole.
    published = [tracking.request(TENANT, request=unique("r"), contact=unique("c")) for _ in range(200)]
    requests = {requested["data"]["request"] for requested in published}
    tracking.statuses(TENANT, lambda found: requests <= set(found))

    tracking.worker.stop(kill=True)
    tracking.worker.start()
    for requested in published:
        tracking.send(requested | {"id": unique("evt")})
    # Each repeat is answered with the request's status again (the same record): once every
    # request has two, the restarted worker has judged every repeat.
    statuses = tracking.statuses(TENANT, lambda found: all(len(found.get(request, ())) >= 2 for request in requests), timeout=60)

    assert {request: sendgrid.requests_for(request) for request in requests} == {request: 1 for request in requests}
    differing = {request: [(r["id"][:8], r["data"]["status"], r["data"].get("error")) for r in statuses[request]]
                 for request in requests if len({record["id"] for record in statuses[request]}) != 1}
    assert differing == {}


def test_a_request_whose_send_was_never_answered_is_unknown_and_not_sent_again(tracking: MessagesDriver, sendgrid: StandIn) -> None:
    sendgrid.crash = tracking.worker
    requested = tracking.request(TENANT, request=unique("r"), contact=unique("c"))
    request = requested["data"]["request"]
    deadline = time.monotonic() + 30
    while tracking.worker.process.poll() is None:
        assert time.monotonic() < deadline, "the stand-in did not stop the worker"
        time.sleep(0.1)

    tracking.worker.start()
    statuses = tracking.statuses(TENANT, lambda found: request in found)

    unknown = statuses[request][0]["data"]
    assert (unknown["status"], unknown["provider"]) == ("unknown", "sendgrid") and "not sent again" in unknown["error"]
    assert sendgrid.requests_for(request) == 1
