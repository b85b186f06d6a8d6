"""Fixtures for the consent stage's broker-backed tests: a driver that publishes what a ticket shop
and its back office would and reads back what the stage published, and a broker of their own for
tests that restart a worker with its clock moved."""
from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Kafka, WorkerProcess, event, unique

from workers import envelope
from workers.broker import free_port, start_broker, stop_broker
from workers.topics import create_topics_sync

SECRET = "test-secret"
DOI_SETTINGS = {
    "double_opt_in": True,
    "doi_optins": ["newsletter"],
    "doi_reminder_every_days": 3,
    "doi_max_reminders": 2,
    "doi_expire_after_days": 14,
    "default_language": "en",
}
SINGLE_SETTINGS = {"double_opt_in": False, "default_language": "en"}
OPTINS = {
    "newsletter": {"id": "newsletter", "kind": "optional", "purpose": "email", "version": 3, "channels": ["web"],
                   "active": True, "text": {"en": "Send me the newsletter", "nl": "Stuur mij de nieuwsbrief"}},
    "partners": {"id": "partners", "kind": "optional", "purpose": "email", "version": 1, "channels": ["web"],
                 "active": True, "text": {"en": "Offers from our partners"}},
    "sms-alerts": {"id": "sms-alerts", "kind": "optional", "purpose": "sms", "version": 1, "channels": ["web"],
                   "active": True, "text": {"en": "Text me about my events"}},
}


class ConsentDriver:
    """One worker running the consent stage, seen from outside: Kafka in and out, and its web port."""

    # Signs link tokens (USHER_SECRET), as every test worker is started with.
    secret = SECRET

    def __init__(self, kafka: Kafka, worker: WorkerProcess) -> None:
        self.kafka = kafka
        self.worker = worker

    def consumed(self, topic: str) -> float:
        """How many records of `topic` the worker's consent stage has read (its /metrics)."""
        with urllib.request.urlopen(f"{self.worker.url}/metrics", timeout=5) as response:
            text = response.read().decode()
        pattern = rf'^usher_records_consumed_total{{stage="consent",topic="{re.escape(topic)}"}} (\S+)$'
        found = re.search(pattern, text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def publish_reference(self, records: list[tuple[str, str, dict[str, Any] | None]]) -> None:
        """Publish (topic, key, value) records the stage reads whole into memory, and wait until it
        has read them: its agents do not wait for later reference records, so a test must."""
        before = {topic: self.consumed(topic) for topic in {topic for topic, _, _ in records}}
        for topic, key, value in records:
            self.kafka.send(topic, key, value)
        for topic, count in before.items():
            expected = count + sum(1 for t, _, _ in records if t == topic)
            deadline = time.monotonic() + 30
            while self.consumed(topic) < expected:
                assert time.monotonic() < deadline, f"the consent stage did not read {topic} in time"
                time.sleep(0.1)

    def configure(self, tenant: str, *, double_opt_in: bool) -> None:
        """Settings (double opt-in for the newsletter, or none at all) and the opt-ins of `OPTINS`."""
        settings = DOI_SETTINGS if double_opt_in else SINGLE_SETTINGS
        records = [(envelope.CONFIG, f"{tenant}/settings/default", event("config.settings", tenant, settings))]
        records += [(envelope.CONFIG, f"{tenant}/optin/{o}", event("config.optin", tenant, data)) for o, data in OPTINS.items()]
        self.publish_reference(records)

    def order(self, tenant: str, contact: str, answers: dict[str, bool], *, at: str | None = None,
              language: str = "nl") -> dict[str, Any]:
        placed = event("order.placed", tenant, {
            "order": unique("o"), "event": "ev-1", "channel": "web", "ip": "203.0.113.7", "user_agent": "Shop/1.0",
            "contact": {"id": contact, "email": f"{contact}@example.com", "first_name": "Ann", "last_name": "Peeters",
                        "language": language},
            "tickets": [], "products": [],
            "optins": [{"optin": optin, "answer": answer, "prechecked": False, "text_shown": f"Text of {optin}",
                        "version": 1} for optin, answer in answers.items()],
        }, time=at)
        self.kafka.send(envelope.ORDERS, f"{tenant}/{contact}", placed)
        return placed

    def command(self, tenant: str, type_: str, data: dict[str, Any], *, key: str | None = None,
                at: str | None = None) -> dict[str, Any]:
        sent = event(type_, tenant, data, source="/shop/backoffice", time=at)
        self.kafka.send(envelope.COMMANDS, key or f"{tenant}/{data['contact']}", sent)
        return sent

    def of_contact(self, topic: str, tenant: str, contact: str, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.kafka.events(topic, tenant, type_) if e["data"]["contact"] == contact]

    def wait(self, topic: str, tenant: str, contact: str, type_: str,
             predicate: Callable[[list[dict[str, Any]]], Any], timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.of_contact(topic, tenant, contact, type_)
            if predicate(found):
                return found
            assert time.monotonic() < deadline, f"timed out on {topic} for {tenant}/{contact}; found {found}"
            time.sleep(0.2)

    def changes(self, tenant: str, contact: str, count: int) -> list[dict[str, Any]]:
        """The contact's `consent.changed` data once there are `count` of them."""
        found = self.wait(envelope.CONSENT_LOG, tenant, contact, "consent.changed", lambda f: len(f) >= count)
        return [e["data"] for e in found]

    def statuses(self, tenant: str, contact: str, predicate: Callable[[dict[str, str]], bool]) -> dict[str, Any]:
        """The contact's newest `consent.status` data once its statuses ({optin: status}) satisfy `predicate`."""
        def newest_matches(found: list[dict[str, Any]]) -> bool:
            return bool(found) and predicate(_statuses(found[-1]["data"]))

        return self.wait(envelope.CONSENT_STATE, tenant, contact, "consent.status", newest_matches)[-1]["data"]

    def mails(self, tenant: str, contact: str, count: int) -> list[dict[str, Any]]:
        """The contact's `message.requested` data once there are `count` of them."""
        found = self.wait(envelope.OUTBOX, tenant, contact, "message.requested", lambda f: len(f) >= count)
        return [e["data"] for e in found]


def _statuses(status: dict[str, Any]) -> dict[str, str]:
    return {optin: entry["status"] for optin, entry in status["optins"].items()}


@pytest.fixture
def consent(usher: WorkerProcess, kafka: Kafka) -> ConsentDriver:
    return ConsentDriver(kafka, usher)


class MovedClock:
    """A consent worker of its own, on a broker of its own (the shared `usher worker all` would
    handle the same records on the real clock), restarted with its clock moved ahead."""

    def __init__(self, broker: str, workdir: Path) -> None:
        self.broker, self.workdir = broker, workdir
        self.port = free_port()  # the same address across restarts, so links stay valid
        self.kafka = Kafka(broker.removeprefix("kafka://"))
        self.driver: ConsentDriver | None = None

    def restart(self, days_ahead: float) -> ConsentDriver:
        self.stop()
        env = {"USHER_SECRET": SECRET, "USHER_CLOCK_OFFSET_S": str(days_ahead * 24 * 3600)}
        worker = WorkerProcess("consent", self.broker, self.port, self.workdir, env).start()
        self.driver = ConsentDriver(self.kafka, worker)
        return self.driver

    def stop(self) -> None:
        if self.driver is not None:
            self.driver.worker.stop()


@pytest.fixture
def moved_clock(tmp_path: Path) -> Iterator[MovedClock]:
    port = free_port()
    process = start_broker(port)
    try:
        create_topics_sync(f"127.0.0.1:{port}", 4)
        clock = MovedClock(f"kafka://127.0.0.1:{port}", tmp_path)
        try:
            yield clock
        finally:
            clock.stop()
            clock.kafka.close()
    finally:
        stop_broker(process)
