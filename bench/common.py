"""What every benchmark does: start one stage's worker as production does, stop it, or run one
benchmark on its own broker (`python -m bench.<name>`)."""
from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from itertools import islice
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from workers import demo, envelope
from workers.edge import produce_batches
from workers.broker import free_port, start_broker, stop_broker, stop_process
from workers.topics import create_topics

PARTITIONS = int(os.environ.get("USHER_PARTITIONS", "6"))
# Records a bench's load produces at once (a million requests are never all in memory).
LOAD_CHUNK = 10_000


async def load(bootstrap: str, outs: Iterable[envelope.Out]) -> None:
    """Produce a bench's inputs, in order within each partition, and wait for them all."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    try:
        records = iter(outs)
        while chunk := list(islice(records, LOAD_CHUNK)):
            await produce_batches(producer, chunk)
    finally:
        await producer.stop()


async def bare_loop(bootstrap: str, topic: str, count: int, outputs: Callable[[list[ConsumerRecord]], list[envelope.Out]]) -> float:
    """The baseline's loop, as a competent hand-written one would be: consume `topic` from its
    start in batches, produce `outputs(records)` of each batch, commit. Seconds from the first
    batch until `count` records were read."""
    gc.collect()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"bench-{topic}", auto_offset_reset="earliest",
                                max_poll_records=2000, fetch_max_bytes=8 * 1024 * 1024, enable_auto_commit=False)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2, max_batch_size=512 * 1024)
    await consumer.start()
    await producer.start()
    try:
        seen, started = 0, None
        while seen < count:
            batches = await consumer.getmany(timeout_ms=500, max_records=2000)
            if not batches:
                continue
            started = started or time.perf_counter()
            records = [record for records in batches.values() for record in records]
            await produce_batches(producer, outputs(records))
            await consumer.commit()
            seen += len(records)
        return time.perf_counter() - started
    finally:
        await consumer.stop()
        await producer.stop()


@contextmanager
def stage_worker(stage: str, bootstrap: str, workdir: Path, name: str, env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, int]]:
    """`usher worker STAGE` on the bench broker, on RocksDB tables as in production, its
    output in `workdir/NAME.log`; yields (process, web port) and stops it afterwards."""
    port = free_port()
    full_env = {**os.environ, "USHER_BROKER": f"kafka://{bootstrap}", "USHER_STORE": "rocksdb://", "USHER_PARTITIONS": str(PARTITIONS),
                "USHER_DATA_DIR": str(workdir / f"data-{name}"), "USHER_OUTBOX_DIR": str(workdir / f"outbox-{name}"),
                "USHER_SESSION_TIMEOUT_S": "6", "USHER_REBALANCE_TIMEOUT_S": "6", **(env or {})}
    with (workdir / f"{name}.log").open("wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "workers.cli", "worker", stage, "--web-port", str(port)],
                                  env=full_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield worker, port
        finally:
            stop_process(worker, timeout_s=30)


async def wait_ready(port: int, worker: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until the worker's /readyz answers 200 (tables recovered, reference feeds read), as the demo waits."""
    await asyncio.to_thread(demo.wait_ready, port, worker, log, timeout)


def run_alone(measure: Callable[[str, Path], Awaitable[dict[str, Any]]]) -> None:
    """Run one benchmark on a fresh embedded broker of its own and print its figures."""
    async def main() -> dict[str, Any]:
        port = free_port()
        broker = start_broker(port)
        try:
            await create_topics(f"127.0.0.1:{port}", PARTITIONS)
            return await measure(f"127.0.0.1:{port}", Path(tempfile.mkdtemp(prefix="usher-bench-")))
        finally:
            stop_broker(broker)

    print(json.dumps(asyncio.run(main()), indent=2))
