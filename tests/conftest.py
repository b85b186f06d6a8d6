"""Session fixtures: one embedded broker, one `usher worker all`, a tenant per test."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import API_TOKEN_SECRET, Kafka, WorkerProcess, embedded_broker, unique  # noqa: E402

from workers.broker import free_port  # noqa: E402

TEST_PARTITIONS = 4


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """A fresh embedded broker on a free port with every topic created; stopped at the end."""
    with embedded_broker(TEST_PARTITIONS) as url:
        yield url


@pytest.fixture(scope="session")
def kafka(broker: str) -> Iterator[Kafka]:
    client = Kafka(broker.removeprefix("kafka://"))
    yield client
    client.close()


@pytest.fixture(scope="session")
def api_tokens() -> dict[str, str]:
    """Tenants the shared worker knows tokens for; tests needing auth use these tenants."""
    return {f"auth{i}": f"{API_TOKEN_SECRET}-{i}" for i in range(1, 4)}


@pytest.fixture(scope="session")
def usher(broker: str, tmp_path_factory: pytest.TempPathFactory, api_tokens: dict[str, str]) -> Iterator[WorkerProcess]:
    """`usher worker all` on the test broker, shared by the session's tests (each uses its own tenant)."""
    workdir = tmp_path_factory.mktemp("usher-all")
    env = {
        "USHER_API_TOKENS": ",".join(f"{t}={token}" for t, token in api_tokens.items()),
        "USHER_SECRET": "test-secret",
        "USHER_PARTITIONS": str(TEST_PARTITIONS),
    }
    worker = WorkerProcess("all", broker, free_port(), workdir, env).start()
    yield worker
    worker.stop()
    if os.environ.get("USHER_TEST_SHOW_WORKER_LOG"):
        print(worker.tail(200))


@pytest.fixture
def tenant() -> str:
    return unique("t")
