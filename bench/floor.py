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
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.common import bare_loop
from workers import envelope

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


async def io_floor(bootstrap: str, input_topic: str, inputs: int, output_topics: Sequence[str], counted_topic: str,
                   partitions: int) -> dict[str, float]:
    """The baseline's loop over the `inputs` records on `input_topic`, producing the records now on
    `output_topics`; per second, inputs and `counted_topic` records."""
    outs = await written(bootstrap, output_topics, partitions)
    counted = sum(1 for out in outs if out.topic == FLOOR_PREFIX + counted_topic)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(FLOOR_PREFIX + topic, partitions, 1) for topic in output_topics])
    await admin.close()
    per_input = len(outs) / max(1, inputs)
    seen = produced = 0
    decoded: list = []

    def outputs(records: list) -> list[envelope.Out]:
        """Its share of the stage's records for a batch of inputs, each a new `Out`, as the stage
        makes them. The inputs are decoded and kept so until the next batch, as the stage holds a
        batch's events while its records are produced."""
        nonlocal seen, produced, decoded
        decoded = [envelope.loads(record.value) for record in records]
        seen += len(records)
        upto = min(len(outs), round(seen * per_input))
        share, produced = outs[produced:upto], upto
        return [envelope.Out(out.topic, out.key, out.event) for out in share]

    # The records to replay are the bench's, not the stage's: kept out of the collector's view, as
    # the stage keeps what it holds from its start (`workers/memory.py`). Without this each full
    # collection walked through them: the floor came out at 0.33-0.49 of the baseline in four runs,
    # 0.53-0.70 in three with it.
    gc.freeze()
    try:
        elapsed = await bare_loop(bootstrap, input_topic, inputs, outputs)
    finally:
        gc.unfreeze()
    return {"inputs_per_s": inputs / elapsed, "counted_per_s": counted / elapsed, "records_per_input": per_input}
