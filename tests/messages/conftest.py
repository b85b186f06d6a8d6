from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from moto.server import ThreadedMotoServer
from harness import Kafka, StageDriver, WorkerProcess, embedded_broker, event, http

from workers import envelope
from workers.messages.render import LayoutRenderer

from .helpers import SETTINGS, message_requested


@pytest.fixture(scope="session")
def renderer() -> LayoutRenderer:
    return LayoutRenderer()


class MessagesDriver(StageDriver):
    """A worker running the messages stage, seen from outside: Kafka in and out, its web port, its outbox."""

    stage = "messages"

    def __init__(self, kafka: Kafka, worker: WorkerProcess, tokens: dict[str, str]) -> None:
        super().__init__(kafka, worker)
        self.tokens = tokens

    @property
    def outbox(self) -> Path:
        return self.worker.workdir / "outbox"

    def configure(self, tenant: str, settings: dict[str, Any] = SETTINGS, *,
                  optins: dict[str, dict[str, Any]] | None = None) -> None:
        records = [(envelope.CONFIG, f"{tenant}/settings/default", event("config.settings", tenant, settings))]
        records += [(envelope.CONFIG, f"{tenant}/optin/{o}", event("config.optin", tenant, data)) for o, data in (optins or {}).items()]
        self.publish_and_wait(records)

    def request(self, tenant: str, **fields: Any) -> dict[str, Any]:
        """Publish a `message.requested` (see helpers.message_requested) and return it."""
        requested = message_requested(tenant=tenant, **fields)
        self.send(requested)
        return requested

    def send(self, requested: dict[str, Any]) -> None:
        self.kafka.send(envelope.OUTBOX, f"{requested['tenant']}/{requested['data']['contact']}", requested)

    def statuses(self, tenant: str, predicate: Callable[[dict[str, list[dict[str, Any]]]], Any],
                 timeout: float = 30) -> dict[str, list[dict[str, Any]]]:
        """The tenant's `delivery.status` records by request, once `predicate` holds for them."""
        def by_request(found: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
            grouped: dict[str, list[dict[str, Any]]] = {}
            for record in found:
                grouped.setdefault(record["data"]["request"], []).append(record)
            return grouped

        found = self.kafka.wait_for(envelope.DELIVERIES, tenant, lambda f: predicate(by_request(f)), timeout=timeout,
                                    type_="delivery.status")
        return by_request(found)


    def get_until(self, path: str, token: str, predicate: Callable[[Any], Any], timeout: float = 30) -> Any:
        """The JSON answer to `GET path` once it satisfies `predicate`: the stage folds statuses
        into its history after they are out, so an answer can lag behind the topic."""
        deadline = time.monotonic() + timeout
        while True:
            status, body, _ = http("GET", f"{self.worker.url}{path}", token=token)
            if status == 200 and predicate(body):
                return body
            assert time.monotonic() < deadline, f"GET {path} answered {status} {body}"
            time.sleep(0.1)


@pytest.fixture
def messages(usher: WorkerProcess, kafka: Kafka, api_tokens: dict[str, str]) -> MessagesDriver:
    return MessagesDriver(kafka, usher, api_tokens)


@pytest.fixture(scope="module")
def own_broker() -> Iterator[str]:
    """A broker of the module's own, for workers with other settings than the shared one: every
    worker consumes every topic, so on the shared broker they would also send other tests' mail."""
    with embedded_broker(4) as url:
        yield url


@pytest.fixture(scope="module")
def own_kafka(own_broker: str) -> Iterator[Kafka]:
    client = Kafka(own_broker.removeprefix("kafka://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """moto's AWS stand-in in server mode (SNS), on a free port."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
