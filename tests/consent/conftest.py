"""Fixtures for the consent stage's broker-backed tests: a driver that publishes what a ticket shop
and its back office would and reads back what the stage published, and a broker of their own for
tests that restart a worker with its clock moved."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Kafka, StageDriver, WorkerProcess, embedded_broker, event, unique

from workers import envelope
from workers.broker import free_port

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


class ConsentDriver(StageDriver):
    """One worker running the consent stage, seen from outside: Kafka in and out, and its web port."""

    stage = "consent"
    # Signs link tokens (USHER_SECRET), as every test worker is started with.
    secret = SECRET

    def configure(self, tenant: str, *, double_opt_in: bool) -> None:
        """Settings (double opt-in for the newsletter, or none at all) and the opt-ins of `OPTINS`."""
        settings = DOI_SETTINGS if double_opt_in else SINGLE_SETTINGS
        records = [(envelope.CONFIG, f"{tenant}/settings/default", event("config.settings", tenant, settings))]
        records += [(envelope.CONFIG, f"{tenant}/optin/{o}", event("config.optin", tenant, data)) for o, data in OPTINS.items()]
        self.publish_and_wait(records)

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

    def restart(self, days_ahead: float = 0, **env: str) -> ConsentDriver:
        """`env`: more of the worker's settings, e.g. `USHER_STORE`."""
        self.stop()
        env = {"USHER_SECRET": SECRET, "USHER_CLOCK_OFFSET_S": str(days_ahead * 24 * 3600), **env}
        worker = WorkerProcess("consent", self.broker, self.port, self.workdir, env).start()
        self.driver = ConsentDriver(self.kafka, worker)
        return self.driver

    def stop(self) -> None:
        if self.driver is not None:
            self.driver.worker.stop()


@pytest.fixture
def moved_clock(tmp_path: Path) -> Iterator[MovedClock]:
    with embedded_broker(4) as url:
        clock = MovedClock(url, tmp_path)
        try:
            yield clock
        finally:
            clock.stop()
            clock.kafka.close()
