"""Revocation latency under load: `consent.revoke` published -> `consent.state` updated.

Contacts are opted in first; then, while a shop keeps placing 1,000 orders a
second, one revocation goes out every 20 ms and the time until that contact's
`consent.status` shows `opted_out` is recorded.

The worker may first have a backlog to work through (in `make bench` the other
benches leave orders and commands on the shared broker), so nothing is timed
until it has caught up: until every opted-in contact's status, and the status
of a warm-up revocation in every partition of `ticketing.commands`, has been
seen on `consent.state`.

The watcher fetches with a 10 ms wait: the embedded broker answers a fetch only
when its wait runs out, whether data came or not, so with the client default
(500 ms) the watcher's own polling added 0-250 ms to every figure.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.common import run_alone, stage_worker, wait_ready
from workers import envelope
from workers.edge import partition_of
from workers.shop import Shop

TENANT = "bench-revoke"
REVOCATIONS = 300
BACKGROUND_PER_S = 1000
# How long the worker may take to work through a backlog and the opt-ins.
CATCH_UP_S = 300
# Background load before the first timed revocation, so it meets the steady state.
SETTLE_S = 1.0
# The watcher's fetch wait (see above): small, so it sees a status when it is published.
WATCH_FETCH_WAIT_MS = 10


def revoke(contact: str) -> envelope.Out:
    data = {"contact": contact, "optin": "newsletter", "channel": "portal", "ip": "198.51.100.4", "user_agent": "bench"}
    return envelope.Out(envelope.COMMANDS, envelope.key(TENANT, contact), envelope.make_event("consent.revoke", TENANT, data, source="/bench"))


def opted_in_order(shop: Shop, number: int) -> envelope.Out:
    order = shop.order()
    assert order.event is not None
    contact = shop.contact(number) | {"id": f"r-{number}"}
    order.event["data"]["contact"] = contact
    order.event["data"]["optins"] = [{"optin": "newsletter", "answer": True, "prechecked": False, "text_shown": "News", "version": 1}]
    return envelope.Out(envelope.ORDERS, envelope.key(TENANT, contact["id"]), order.event)


def warm_up_contacts(partitions: int) -> list[str]:
    """Contacts whose revocations land in every partition (Kafka's default partitioner)."""
    found: dict[int, str] = {}
    number = 0
    while len(found) < partitions:
        contact = f"w-{number}"
        found.setdefault(partition_of(envelope.key(TENANT, contact).encode(), partitions), contact)
        number += 1
    return sorted(found.values())


async def measure(bootstrap: str, workdir: Path) -> dict[str, Any]:
    shop = Shop(tenant=TENANT, contacts=5_000)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)
    await producer.start()
    watcher = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=WATCH_FETCH_WAIT_MS)
    with stage_worker("consent", bootstrap, workdir, "consent-revoke") as (worker, port):
        try:
            # Positioned at the end before anything is sent, so no status the worker publishes is missed.
            await watcher.start()
            await watcher.topics()
            watched = [TopicPartition(envelope.CONSENT_STATE, p) for p in sorted(watcher.partitions_for_topic(envelope.CONSENT_STATE) or ())]
            watcher.assign(watched)
            await watcher.seek_to_end(*watched)
            for tp in watched:
                await watcher.position(tp)

            settings = {"double_opt_in": False, "default_language": "en"}
            await producer.send_and_wait(envelope.CONFIG, key=f"{TENANT}/settings/default".encode(),
                                         value=envelope.dumps(envelope.make_event("config.settings", TENANT, settings, source="/bench")))
            opting_in = {f"r-{number}" for number in range(REVOCATIONS)}
            for number in range(REVOCATIONS):
                out = opted_in_order(shop, number)
                await producer.send(out.topic, key=out.key.encode(), value=out.value_bytes())
            warming = set(warm_up_contacts(len(await producer.partitions_for(envelope.COMMANDS))))
            for contact in sorted(warming):
                out = revoke(contact)
                await producer.send(out.topic, key=out.key.encode(), value=out.value_bytes())
            await producer.flush()
            await wait_ready(port, worker, workdir / "consent-revoke.log")

            sent_at: dict[str, float] = {}
            latencies: list[float] = []
            caught_up = asyncio.Event()

            async def watch() -> None:
                async for record in watcher:
                    event = envelope.loads(record.value) if record.value else None
                    if not event or event["tenant"] != TENANT:
                        continue
                    contact = event["data"]["contact"]
                    status = event["data"]["optins"].get("newsletter", {}).get("status")
                    if status == "opted_in":
                        opting_in.discard(contact)
                    elif status == "opted_out":
                        warming.discard(contact)
                        if contact in sent_at:
                            latencies.append((time.perf_counter() - sent_at.pop(contact)) * 1000)
                    if not opting_in and not warming:
                        caught_up.set()

            async def background() -> None:
                while True:
                    started = time.perf_counter()
                    for _ in range(BACKGROUND_PER_S // 20):
                        order = shop.order()
                        await producer.send(order.topic, key=order.key.encode(), value=order.value_bytes())
                    await asyncio.sleep(max(0.0, 0.05 - (time.perf_counter() - started)))

            tasks = [asyncio.create_task(watch())]
            try:
                started = time.perf_counter()
                await asyncio.wait_for(caught_up.wait(), CATCH_UP_S)
            except asyncio.TimeoutError:
                for task in tasks:
                    task.cancel()
                return {"revoke_to_state_p99_ms": None,
                        "note": f"worker not caught up after {CATCH_UP_S} s: {len(opting_in)} opt-ins and {len(warming)} warm-up revocations unseen"}
            catch_up_s = time.perf_counter() - started
            tasks.append(asyncio.create_task(background()))
            await asyncio.sleep(SETTLE_S)
            for number in range(REVOCATIONS):
                out = revoke(f"r-{number}")
                sent_at[f"r-{number}"] = time.perf_counter()
                await producer.send(out.topic, key=out.key.encode(), value=out.value_bytes())
                await asyncio.sleep(0.02)
            deadline = time.monotonic() + 30
            while sent_at and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            for task in tasks:
                task.cancel()
            if len(latencies) < REVOCATIONS // 2:
                return {"revoke_to_state_p99_ms": None, "note": f"only {len(latencies)} of {REVOCATIONS} revocations seen"}
            latencies.sort()
            return {
                "revoke_to_state_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 1),
                "revoke_to_state_p50_ms": round(statistics.median(latencies), 1),
                "revocations": len(latencies),
                "background_orders_per_s": BACKGROUND_PER_S,
                "missing": len(sent_at),
                "revoke_catch_up_s": round(catch_up_s, 1),
            }
        finally:
            await watcher.stop()
            await producer.stop()


if __name__ == "__main__":
    run_alone(measure)
