"""Broker-backed test helpers: a worker process, producing, and reading topics."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from workers import envelope
from workers.broker import free_port, start_broker, stop_broker, stop_process
from workers.topics import create_topics_sync

API_TOKEN_SECRET = "test-token"


@contextmanager
def embedded_broker(partitions: int) -> Iterator[str]:
    """A fresh embedded broker on a free port with every topic created, as a `kafka://` URL;
    stopped afterwards, also when the test failed."""
    port = free_port()
    process = start_broker(port)
    try:
        create_topics_sync(f"127.0.0.1:{port}", partitions)
        yield f"kafka://127.0.0.1:{port}"
    finally:
        stop_broker(process)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def event(type_: str, tenant: str, data: dict[str, Any], *, source: str = "/tests", id_: str | None = None, time: str | None = None) -> dict[str, Any]:
    return envelope.make_event(type_, tenant, data, source=source, id_=id_, time=time)


class Kafka:
    """Synchronous produce and read-back against the test broker."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=1, acks="all")

    def send(self, topic: str, key: str | None, value: dict[str, Any] | bytes | None) -> None:
        raw = value if isinstance(value, bytes) or value is None else json.dumps(value).encode()
        self.producer.send(topic, key=key.encode() if key is not None else None, value=raw).get(timeout=10)

    def records(self, topic: str) -> list[Any]:
        """Every record currently in `topic` (no consumer group: nothing is committed)."""
        # A poll takes every record fetched: the embedded broker reports a partition's end offset
        # as its last batch's first offset + 1, so reading stops once that batch is in, and a poll
        # of at most 500 (kafka-python's default) left the rest of a large batch unread.
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, consumer_timeout_ms=300,
                                 max_poll_records=1_000_000)
        try:
            partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
            consumer.assign(partitions)
            consumer.seek_to_beginning(*partitions)
            end = consumer.end_offsets(partitions)
            found = []
            while any(consumer.position(tp) < end[tp] for tp in partitions):
                for batch in consumer.poll(timeout_ms=200).values():
                    found.extend(batch)
            return found
        finally:
            consumer.close()

    def events(self, topic: str, tenant: str, type_: str | None = None) -> list[dict[str, Any]]:
        found = []
        for record in self.records(topic):
            if record.value is None:
                continue
            try:
                value = json.loads(record.value)
            except ValueError:
                continue
            if value.get("tenant") == tenant and (type_ is None or value.get("type") == type_):
                found.append(value)
        return found

    def wait_for(
        self,
        topic: str,
        tenant: str,
        predicate: Callable[[list[dict[str, Any]]], Any],
        *,
        timeout: float = 30.0,
        type_: str | None = None,
    ) -> list[dict[str, Any]]:
        """Poll `topic` until `predicate(events of tenant)` is truthy; fail with what was there."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(topic, tenant, type_)
            if predicate(found):
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting on {topic} for tenant {tenant}; found {json.dumps(found)[:2000]}")
            time.sleep(0.2)

    def close(self) -> None:
        self.producer.close()


def http(method: str, url: str, body: Any = None, *, token: str | None = None, form: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON or text, headers) for one request."""
    data = form if form is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if form is not None:
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw, got = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        status, raw, got = exc.code, exc.read(), dict(exc.headers)
    text = raw.decode("utf-8", "replace")
    if got.get("Content-Type", "").startswith("application/json"):
        return status, json.loads(text), got
    return status, text, got


class WorkerProcess:
    """`usher worker STAGE` as a child process, ready when `/readyz` says so."""

    def __init__(self, stage: str, broker: str, web_port: int, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.stage, self.broker, self.web_port, self.workdir = stage, broker, web_port, workdir
        self.env = {
            **os.environ,
            "USHER_BROKER": broker,
            "USHER_STORE": "memory://",
            "USHER_DATA_DIR": str(workdir / "data"),
            "USHER_OUTBOX_DIR": str(workdir / "outbox"),
            "USHER_API_TOKENS": os.environ.get("USHER_API_TOKENS", ""),
            "USHER_SESSION_TIMEOUT_S": "6",
            "USHER_REBALANCE_TIMEOUT_S": "6",
            "USHER_PARTITIONS": os.environ.get("USHER_PARTITIONS", "4"),
            **(env or {}),
        }
        self.log_path = workdir / f"worker-{stage}-{web_port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker", self.stage, "--web-port", str(self.web_port), "--loglevel", "info"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.stage} exited with {self.process.returncode}; see {self.log_path}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"worker {self.stage} not ready within {timeout} s:\n{self.tail()}")
            time.sleep(0.25)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, *, kill: bool = False) -> None:
        """Stop the worker as a deployment would (SIGTERM), or as a crash would (`kill`)."""
        if self.process and kill:
            self.process.kill()
            self.process.wait()
        elif self.process:
            stop_process(self.process, timeout_s=20)


class StageDriver:
    """One stage of a test worker, seen from outside: Kafka in and out, its web port and /metrics."""

    stage: str

    def __init__(self, kafka: Kafka, worker: WorkerProcess) -> None:
        self.kafka = kafka
        self.worker = worker

    def consumed(self, topic: str) -> float:
        """How many records of `topic` the stage has read (the worker's /metrics)."""
        with urllib.request.urlopen(f"{self.worker.url}/metrics", timeout=5) as response:
            text = response.read().decode()
        pattern = rf'^usher_records_consumed_total{{stage="{self.stage}",topic="{re.escape(topic)}"}} (\S+)$'
        found = re.search(pattern, text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def publish_and_wait(self, records: list[tuple[str, str, dict[str, Any] | None]], timeout: float = 30) -> None:
        """Publish (topic, key, value) records and wait until the stage has read them all. What a
        stage reads whole into memory (configuration, events, messages) is not waited for by its
        agents, so a test that publishes it must wait before what depends on it."""
        topics = {topic for topic, _, _ in records}
        expected = {topic: self.consumed(topic) + sum(1 for t, _, _ in records if t == topic) for topic in topics}
        for topic, key, value in records:
            self.kafka.send(topic, key, value)
        deadline = time.monotonic() + timeout
        while any(self.consumed(topic) < count for topic, count in expected.items()):
            assert time.monotonic() < deadline, f"the {self.stage} stage did not read {sorted(topics)} in time"
            time.sleep(0.1)
