"""What Kafka I/O alone allows a stage: the baseline's bare aiokafka loop, but producing for each
input the records the stage itself produced for it.

Run right after a stage's bench, on its input topic and the topics it wrote in that bench. The
loop consumes the same inputs and decodes them, and produces the stage's own output records, in
the same proportion and to topics of the same partitioning, with no decisions, tables, checks or
dedupe. So it is the ceiling for the stage as it is built (what it writes), measured in the same
run as the baseline; the stage's rate over it is what its own work costs.
"""
from __future__ import annotations

import gc
import random
import time
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from workers import envelope
from workers.edge import produce_batches

FLOOR_PREFIX = "bench.floor."


async def written(bootstrap: str, topics: Sequence[str], partitions: int) -> list[envelope.Out]:
    """Every record now on `topics`, as `Out`s to their floor copies (the stage's writes), mixed
    as the stage mixes them: each of its batches writes to every one of its topics."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=10_000, fetch_max_wait_ms=100)
    await consumer.start()
    try:
        assigned = [TopicPartition(topic, partition) for topic in topics for partition in range(partitions)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        outs, idle = [], 0
        # Until polls come back empty: the embedded broker's end offsets can leave out its newest batch.
        while idle < 2:
            batches = await consumer.getmany(timeout_ms=500)
            idle = 0 if batches else idle + 1
            outs += [envelope.Out(FLOOR_PREFIX + tp.topic, r.key.decode(), envelope.loads(r.value) if r.value else None)
                     for tp, records in batches.items() for r in records if r.key is not None]
    finally:
        await consumer.stop()
    random.Random(0).shuffle(outs)
    return outs


async def io_floor(bootstrap: str, input_topic: str, input_type: str, output_topics: Sequence[str], counted_topic: str,
                   partitions: int) -> dict[str, float]:
    """The bare loop over `input_topic`'s `input_type` records; per second, inputs and `counted_topic` records."""
    outs = await written(bootstrap, output_topics, partitions)
    counted = sum(1 for out in outs if out.topic == FLOOR_PREFIX + counted_topic)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(FLOOR_PREFIX + topic, partitions, 1) for topic in output_topics])
    await admin.close()
    consumer = AIOKafkaConsumer(input_topic, bootstrap_servers=bootstrap, group_id=f"bench-floor-{input_topic}", auto_offset_reset="earliest",
                                max_poll_records=2000, fetch_max_bytes=8 * 1024 * 1024, enable_auto_commit=False)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2, max_batch_size=512 * 1024)
    await consumer.start()
    await producer.start()
    try:
        inputs = [o.event for o in await written(bootstrap, [input_topic], partitions) if o.event and o.event["type"] == input_type]
        per_input = len(outs) / max(1, len(inputs))
        gc.collect()
        seen, produced, started = 0, 0, None
        while seen < len(inputs):
            batches = await consumer.getmany(timeout_ms=500, max_records=2000)
            if not batches:
                continue
            started = started or time.perf_counter()
            events = [envelope.loads(r.value) for records in batches.values() for r in records]
            seen += sum(1 for event in events if event["type"] == input_type)
            upto = min(len(outs), round(seen * per_input))
            await produce_batches(producer, [envelope.Out(o.topic, o.key, o.event) for o in outs[produced:upto]])
            produced = upto
            await consumer.commit()
        elapsed = time.perf_counter() - started
        return {"inputs_per_s": len(inputs) / elapsed, "counted_per_s": counted / elapsed, "records_per_input": per_input}
    finally:
        await consumer.stop()
        await producer.stop()
