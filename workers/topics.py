"""Every topic Usher reads or writes, and their idempotent creation.

All topics get the same partition count: every topic keyed by contact must be
co-partitioned, and one number for all keeps the internal topics aligned too.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from workers import envelope as t

# Kafka's error code for "topic already exists" inside a CreateTopics response.
TOPIC_ALREADY_EXISTS = TopicAlreadyExistsError.errno


@dataclass(frozen=True)
class TopicSpec:
    name: str
    compacted: bool = False
    # Never deleted for age: the record of consent, and what the consent history is recovered from.
    kept_forever: bool = False


CONTRACT_TOPICS = (
    TopicSpec(t.CONFIG, compacted=True),
    TopicSpec(t.EVENTS, compacted=True),
    TopicSpec(t.MESSAGES, compacted=True),
    TopicSpec(t.CHECKOUTS),
    TopicSpec(t.ORDERS),
    TopicSpec(t.COMMANDS),
    TopicSpec(t.CALLBACKS),
    TopicSpec(t.PROMPTS),
    TopicSpec(t.CONSENT_STATE, compacted=True),
    TopicSpec(t.CONSENT_LOG, kept_forever=True),
    TopicSpec(t.CONTACTS_STATE, compacted=True),
    TopicSpec(t.CONTACTS_REPLIES),
    TopicSpec(t.SEGMENTS_MEMBERS, compacted=True),
    TopicSpec(t.OUTBOX),
    TopicSpec(t.DELIVERIES),
    TopicSpec(t.DEAD_LETTERS),
)

# Repartition topics: records that must meet state kept under another key.
SEGMENTS_FANOUT = "usher.segments.fanout"  # per-contact steps of the segments stage, keyed {tenant}/{contact}
SEGMENTS_BY_EMAIL = "usher.segments.by-email"  # friends-and-family e-mail index and look-ups, keyed {tenant}/{email}
INTERNAL_TOPICS = (
    # per-contact commands fanned out of bulk commands, keyed {tenant}/{contact}
    TopicSpec("usher.consent.fanout"),
    TopicSpec(SEGMENTS_FANOUT),
    TopicSpec(SEGMENTS_BY_EMAIL),
    # provider calls' recipients and the callbacks about them, keyed by correlation group {tenant}/{provider}/{message id}
    TopicSpec("usher.messages.correlated"),
    # provider callbacks' statuses for the contact's message history, keyed {tenant}/{contact}
    TopicSpec("usher.messages.by-contact"),
    # a batch's statuses of a message's own mails, for the message's history, keyed {tenant}/{message}
    TopicSpec("usher.messages.by-message"),
)

ALL_TOPICS = CONTRACT_TOPICS + INTERNAL_TOPICS


def topic_config(spec: TopicSpec) -> dict[str, str]:
    if spec.compacted:
        return {"cleanup.policy": "compact"}
    return {"retention.ms": "-1"} if spec.kept_forever else {}


async def create_topics(bootstrap_servers: str, partitions: int, replication: int = 1) -> dict[str, str]:
    """Create every topic; existing ones are left as they are. Returns name -> "created" | "exists"."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=15000)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(spec.name, partitions, replication, topic_configs=topic_config(spec)) for spec in ALL_TOPICS]
        )
    finally:
        await admin.close()
    outcome: dict[str, str] = {}
    for name, code, message in (error[:3] for error in response.topic_errors):
        if code == 0:
            outcome[name] = "created"
        elif code == TOPIC_ALREADY_EXISTS:
            outcome[name] = "exists"
        else:
            raise RuntimeError(f"could not create topic {name}: error {code} {message}")
    return outcome


def create_topics_sync(bootstrap_servers: str, partitions: int) -> dict[str, str]:
    return asyncio.run(create_topics(bootstrap_servers, partitions))
