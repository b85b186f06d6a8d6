"""`make bench`: throughput of each stage next to a bare aiokafka baseline.

Everything runs in one go on one fresh embedded broker, so the ratios compare
like with like. The baseline is the floor cost of Kafka I/O in Python: consume,
JSON-decode, JSON-encode and produce contract-sized records, no stage logic.
Each stage is then fed pre-loaded input and timed from its first output to its
last, as a worker process started exactly as in production. For the consent stage the run also
measures its I/O floor (`bench/floor.py`): the baseline's loop producing the stage's own records.
"""
from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench import consent_revoke, messages_send, prompts_http
from bench.common import PARTITIONS, bare_loop, load, stage_worker
from bench.floor import io_floor
from workers import envelope
from workers.broker import free_port, start_broker, stop_broker
from workers.shop import Shop
from workers.topics import create_topics

RESULTS = Path(__file__).resolve().parent / "results.json"
BASELINE_RECORDS = 100_000
IDLE_S = 5.0


@dataclass
class Floor:
    """The stage's inputs and every topic it writes, for `bench.floor` (its tables' changelogs
    are found by their prefix, `usher-{stage}-`)."""

    input_topic: str
    output_topics: tuple[str, ...]


@dataclass
class StageBench:
    stage: str
    output_topic: str
    inputs: Callable[[Shop], list[envelope.Out]]
    expected_outputs: Callable[[int], int]
    records: int = 20_000
    floor: Floor | None = None


def orders(shop: Shop, count: int) -> list[envelope.Out]:
    return [shop.order() for _ in range(count)]


def checkouts(shop: Shop, count: int) -> list[envelope.Out]:
    return [shop.checkout() for _ in range(count)]


def message_requests(shop: Shop, count: int) -> list[envelope.Out]:
    outs = []
    for number in range(count):
        contact = shop.contact(number)
        data = {"request": f"req-{number}", "kind": "event-message", "message": "msg-bench", "contact": contact["id"],
                "channel": "email", "to": {"email": contact["email"]}, "layout": "event-message",
                "language": contact["language"], "vars": {"custom_text": "Doors open at 19:00", "event": {"name": "Hamlet"}}}
        outs.append(envelope.Out(envelope.OUTBOX, envelope.key(shop.tenant, contact["id"]),
                                 envelope.make_event("message.requested", shop.tenant, data, source="/bench")))
    return outs


# Each stage issue's own figures, added to results.json under the names the issue gives.
EXTRA_BENCHES = [
    ("prompts", prompts_http.measure),
    ("consent", consent_revoke.measure),
    ("messages", messages_send.measure),
]

STAGE_BENCHES = [
    StageBench("prompts", envelope.PROMPTS, lambda shop: checkouts(shop, 20_000), lambda n: n),
    # Consent changes, as issue #4 counts them: a `consent.changed` per opt-in whose status an order
    # changes (the shop's orders answer two opt-ins each).
    StageBench("consent", envelope.CONSENT_LOG, lambda shop: orders(shop, 20_000), lambda n: 2 * n,
               floor=Floor(envelope.ORDERS, (envelope.CONSENT_LOG, envelope.CONSENT_STATE, envelope.OUTBOX))),
    StageBench("segments", envelope.CONTACTS_STATE, lambda shop: orders(shop, 20_000), lambda n: n),
    StageBench("messages", envelope.DELIVERIES, lambda shop: message_requests(shop, 20_000), lambda n: n),
]


class OutputCounter:
    """Counts one tenant's records on a topic as a consumer sees them. Not from end offsets: the
    embedded broker reports a partition's end offset without its newest batch."""

    def __init__(self, bootstrap: str, topic: str, tenant: str) -> None:
        self.consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
                                         fetch_max_wait_ms=50, max_poll_records=10_000)
        self.marker = f'"tenant":"{tenant}"'.encode()
        self.count = 0

    async def start(self) -> None:
        await self.consumer.start()

    async def poll(self) -> int:
        for records in (await self.consumer.getmany(timeout_ms=100)).values():
            self.count += sum(1 for record in records if record.value and self.marker in record.value)
        return self.count

    async def stop(self) -> None:
        await self.consumer.stop()


async def baseline(bootstrap: str, shop: Shop) -> float:
    """Bare aiokafka: consume, decode, encode and produce in batches; records per second."""
    topic_in, topic_out = "bench.baseline.in", "bench.baseline.out"
    await load(bootstrap, [envelope.Out(topic_in, out.key, out.event) for out in orders(shop, BASELINE_RECORDS)])

    def forwarded(records: list) -> list[envelope.Out]:
        return [envelope.Out(topic_out, record.key.decode(), envelope.loads(record.value)) for record in records]

    return BASELINE_RECORDS / await bare_loop(bootstrap, topic_in, BASELINE_RECORDS, forwarded)


async def measure_stage(bootstrap: str, bench: StageBench, workdir: Path) -> dict[str, Any]:
    shop = Shop(tenant=f"bench-{bench.stage}", contacts=5_000)
    inputs = bench.inputs(shop)
    # The venue's configuration first, so each stage does its real work (opt-ins to ask, double
    # opt-in mails, segments to judge) rather than the little an unconfigured tenant needs.
    await load(bootstrap, shop.setup() + inputs)
    expected = bench.expected_outputs(len(inputs))
    outputs = OutputCounter(bootstrap, bench.output_topic, shop.tenant)
    await outputs.start()
    try:
        with stage_worker(bench.stage, bootstrap, workdir, bench.stage) as (worker, _):
            first_at = last_at = None
            produced = 0
            deadline = time.monotonic() + 300
            # Done when every expected output is there, or nothing new came for a few seconds.
            while produced < expected and time.monotonic() < deadline:
                now_total = await outputs.poll()
                if now_total > produced:
                    first_at = first_at or time.perf_counter()
                    last_at = time.perf_counter()
                    produced = now_total
                elif last_at and time.perf_counter() - last_at > IDLE_S:
                    break
                if worker.poll() is not None:
                    break
    finally:
        await outputs.stop()
    if not first_at or produced < 2 or last_at == first_at:
        return {"per_s": 0.0, "outputs": produced, "note": f"no outputs; see {workdir / bench.stage}.log"}
    return {"per_s": round(produced / (last_at - first_at), 1), "counts": f"{bench.output_topic} records", "outputs": produced,
            "inputs": len(inputs)}


async def measure_floor(bootstrap: str, bench: StageBench, inputs: int, base: float) -> dict[str, Any]:
    """Run right after the stage's bench, while its topics hold only what that bench wrote
    (`inputs` records on the input topic, and what the stage made of them)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    changelogs = sorted(topic for topic in await admin.list_topics() if topic.startswith(f"usher-{bench.stage}-"))
    await admin.close()
    spec = bench.floor
    found = await io_floor(bootstrap, spec.input_topic, inputs, [*spec.output_topics, *changelogs], bench.output_topic, PARTITIONS)
    return {"io_floor_per_s": round(found["counted_per_s"], 1), "io_floor_ratio": round(found["counted_per_s"] / base, 3) if base else 0.0,
            "io_floor_records_per_input": round(found["records_per_input"], 2)}


async def main() -> dict[str, Any]:
    port = free_port()
    broker = start_broker(port)
    bootstrap = f"127.0.0.1:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="usher-bench-"))
    try:
        await create_topics(bootstrap, PARTITIONS)
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic("bench.baseline.in", PARTITIONS, 1), NewTopic("bench.baseline.out", PARTITIONS, 1)])
        await admin.close()
        base = await baseline(bootstrap, Shop(tenant="bench-baseline"))
        results: dict[str, Any] = {"baseline_per_s": round(base, 1), "stages": {}, "partitions": PARTITIONS, "machine_cores": os.cpu_count()}
        print(f"baseline (bare aiokafka consume+produce): {base:10.0f} records/s", flush=True)
        for bench in STAGE_BENCHES:
            figures = await measure_stage(bootstrap, bench, workdir)
            figures["ratio"] = round(figures["per_s"] / base, 3) if base else 0.0
            if bench.floor is not None:
                figures |= await measure_floor(bootstrap, bench, figures["inputs"], base)
            results["stages"][bench.stage] = figures
            print(f"{bench.stage:9} {figures['per_s']:10.0f} records/s  ratio {figures['ratio']:.3f}  ({figures})", flush=True)
        for name, extra in EXTRA_BENCHES:
            figures = await extra(bootstrap, workdir)
            results.update(figures)
            print(f"{name:9} {figures}", flush=True)
        return results
    finally:
        stop_broker(broker)


if __name__ == "__main__":
    results = asyncio.run(main())
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")
