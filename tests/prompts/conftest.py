"""Fixtures for the prompts stage's broker-backed tests: a driver that publishes what a ticket shop
and its back office would, and reads back the prompts (from `checkout.prompts` and over HTTP)."""
from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from typing import Any

import pytest
from harness import Kafka, StageDriver, WorkerProcess, event, http, unique

from workers import envelope

SOURCE = "/usher/prompts"


class PromptsDriver(StageDriver):
    """The shared worker's prompts stage, seen from outside: Kafka in and out, and its web port."""

    stage = "prompts"

    def __init__(self, kafka: Kafka, worker: WorkerProcess, tokens: dict[str, str]) -> None:
        super().__init__(kafka, worker)
        self.tokens = tokens

    def publish(self, records: list[tuple[str, str, dict[str, Any] | None]]) -> None:
        # A checkout does not wait for configuration published after it, so a test must.
        self.publish_and_wait(records)

    def configure(self, tenant: str, *configs: tuple[str, dict[str, Any]], events: dict[str, str | None] | None = None) -> None:
        """Config records (kind, data) and events (id -> opt-in set). Opt-in sets go last, once the
        rest is read, as a back office saves them: the stage reads the partitions of
        `ticketing.config` in no particular order, so a set sent together with the opt-ins it
        names could be judged before them."""
        records = [config_record(tenant, kind, data) for kind, data in configs if kind != "optin-set"]
        records += [
            (envelope.EVENTS, f"{tenant}/{event_id}", event("event.scheduled", tenant, {
                "event": event_id, "name": "Hamlet", "starts_at": "2026-12-01T19:30:00+01:00",
                "ends_at": "2026-12-01T22:00:00+01:00", "timezone": "Europe/Brussels", "optin_set": optin_set, "products": []}))
            for event_id, optin_set in (events or {}).items()
        ]
        self.publish(records)
        self.publish([config_record(tenant, kind, data) for kind, data in configs if kind == "optin-set"])

    def checkout(self, tenant: str, event_id: str, channel: str, language: str, contact: str | None = None) -> dict[str, Any]:
        """Start a checkout and return its prompt's data, checking the prompt is keyed as the checkout."""
        checkout = unique("co")
        key = f"{tenant}/{contact}" if contact else f"{tenant}/~{checkout}"
        data = {"checkout": checkout, "event": event_id, "channel": channel, "contact": contact, "language": language}
        self.kafka.send(envelope.CHECKOUTS, key, event("checkout.started", tenant, data, source="/shop/web"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for record in self.kafka.records(envelope.PROMPTS):
                prompt = json.loads(record.value)
                if prompt["tenant"] == tenant and prompt["data"]["checkout"] == checkout:
                    assert prompt["type"] == "checkout.prompted" and record.key.decode() == key
                    return prompt["data"]
            time.sleep(0.1)
        raise AssertionError(f"no prompt for checkout {checkout} of {tenant}")

    def get_prompt(self, token: str | None, **params: str) -> tuple[int, Any]:
        status, body, _ = http("GET", f"{self.worker.url}/v1/prompts?{urllib.parse.urlencode(params)}", token=token)
        return status, body

    def validate(self, token: str | None, body: dict[str, Any]) -> tuple[int, Any]:
        status, answer, _ = http("POST", f"{self.worker.url}/v1/fields/validate", body, token=token)
        return status, answer

    def rejections(self, tenant: str, count: int) -> list[dict[str, Any]]:
        """The `record.rejected` data the prompts stage wrote for `tenant`, once there are `count`."""
        found = self.kafka.wait_for(envelope.DEAD_LETTERS, tenant, lambda f: len([r for r in f if r["source"] == SOURCE]) >= count)
        return [r["data"] for r in found if r["source"] == SOURCE]


def config_record(tenant: str, kind: str, data: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    config_id = data.get("id", "default")
    return envelope.CONFIG, f"{tenant}/{kind}/{config_id}", event(f"config.{kind}", tenant, data, source="/shop/admin")


def optin(optin_id: str, kind: str = "optional", *, channels: list[str] | None = None, active: bool = True,
          version: int = 1, text: dict[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    data = {"id": optin_id, "kind": kind, "purpose": "email", "version": version, "active": active,
            "text": text or {"en": f"{optin_id} please", "nl": f"{optin_id} graag"}}
    if channels is not None:
        data["channels"] = channels
    return "optin", data


def optin_set(set_id: str, optins: list[str], *, default: bool = False) -> tuple[str, dict[str, Any]]:
    return "optin-set", {"id": set_id, "optins": optins, "default": default}


def custom_field(field_id: str, type_: str, *, show_in: list[str] | None = None, **extra: Any) -> tuple[str, dict[str, Any]]:
    data = {"id": field_id, "type": type_, "label": {"en": f"{field_id} label", "nl": f"{field_id} etiket"}, **extra}
    if show_in is not None:
        data["show_in"] = show_in
    return "custom-field", data


@pytest.fixture
def prompts(usher: WorkerProcess, kafka: Kafka, api_tokens: dict[str, str]) -> PromptsDriver:
    return PromptsDriver(kafka, usher, api_tokens)
