"""The `usher` command as the contract lists it."""
from __future__ import annotations

import socket
import subprocess
import sys


from harness import Kafka

from workers.broker import free_port
from workers.topics import ALL_TOPICS, create_topics_sync, topic_config

USHER = [sys.executable, "-m", "workers.cli"]


def test_every_contract_command_is_there() -> None:
    for args in (["broker", "--help"], ["topics", "create", "--help"], ["worker", "all", "--help"], ["demo", "--help"]):
        result = subprocess.run(USHER + args, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    for stage in ("prompts", "consent", "segments", "messages", "all"):
        assert stage in subprocess.run(USHER + ["worker", "--help"], capture_output=True, text=True, timeout=60).stdout


def test_broker_on_a_taken_port_fails_with_one_actionable_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(USHER + ["broker", "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port} is already taken" in lines[0]


def test_broker_without_a_binary_says_how_to_get_one(tmp_path) -> None:
    env = {"CALF_TANSU_BIN": str(tmp_path / "missing"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(USHER + ["broker", "--port", str(free_port())], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    assert "CALF_TANSU_BIN" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_topics_create_is_idempotent_and_compacts_state_topics(broker: str, kafka: Kafka) -> None:
    # The session fixture created them already: a second run finds every one.
    bootstrap = broker.removeprefix("kafka://")
    assert set(create_topics_sync(bootstrap, 4).values()) == {"exists"}
    result = subprocess.run(USHER + ["topics", "create", "--broker", broker], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("exists") == len(ALL_TOPICS)
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        described = admin.describe_topics([spec.name for spec in ALL_TOPICS])
        assert {topic["name"] for topic in described} == {spec.name for spec in ALL_TOPICS}
        assert {len(topic["partitions"]) for topic in described} == {4}
    finally:
        admin.close()


def test_state_topics_are_created_compacted() -> None:
    # tansu does not report topic configs back, so check what creation asks for.
    compacted = {spec.name for spec in ALL_TOPICS if topic_config(spec) == {"cleanup.policy": "compact"}}
    assert compacted == {"ticketing.config", "ticketing.events", "ticketing.messages", "consent.state", "contacts.state", "segments.members"}


def test_the_consent_log_is_kept_for_ever() -> None:
    # The record of consent, and what the consent history table is recovered from.
    kept = {spec.name for spec in ALL_TOPICS if topic_config(spec) == {"retention.ms": "-1"}}
    assert kept == {"consent.log"}


def test_topics_create_without_a_broker_fails_cleanly() -> None:
    result = subprocess.run(USHER + ["topics", "create", "--broker", f"kafka://127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "is the broker" in result.stderr
