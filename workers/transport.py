"""The faust App every stage runs on: faust's Kafka transport with batch topics, a cheaper
hand-off of each fetched record, a short fetch wait, and no per-event statistics nobody reads.

Batch topics (`BatchTopic`, what every stage's edge consumes): faust passes each record alone
through the conductor (a lock, the flow control, a decode, a queue put) and the stream (a loop
turn, the sensors, an ack under a lock), which costs more than most stages' own work on a record.
For a batch topic the fetcher instead hands over each partition's share of a fetch as one
message (`RecordBatch`), which goes through that same machinery once, flow control, rebalances and
offset commits included, and is acknowledged record by record when the stage is done with it.

faust's fetcher hands every record to the streams with
`wait_first(deliver(record), suspend_flow.wait())`, so that a delivery blocked
on a full stream buffer gives way when a rebalance suspends the flow. That
costs four asyncio tasks per record (about 23 µs here, as much as a whole
record of the bare aiokafka baseline). Almost every delivery is a put into a
buffer with room, which completes without waiting: here it runs at once, and
only a delivery that has to wait goes through faust's `wait_first`, carried on
from where it stopped, with the same semantics as before.
"""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import Coroutine, Generator, Mapping
from time import monotonic
from typing import Any

import aiokafka
import faust
from aiokafka import TopicPartition
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.sensors.monitor import Monitor
from faust.transport.consumer import CONSUMER_FETCHING
from faust.types import TP, EventT, Message, StreamT
from faust.types.tuples import ConsumerMessage, ack_lock
from mode import ServiceT
from mode.services import WaitArgT, WaitResults
from mode.utils.times import Seconds

# Reading the partitions' last batches at recovery (see ConsumerThread._highwaters).
TAIL_READ_ATTEMPTS = 5
TAIL_READ_WAIT_MS = 500


class _Resumed:
    """Awaits a coroutine that has already run up to its first suspension (`yielded`)."""

    def __init__(self, coroutine: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self.coroutine = coroutine
        self.yielded = yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        coroutine, step = self.coroutine, self.yielded
        while True:
            try:
                sent = yield step
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as exc:  # cancellation and the like go on into the coroutine
                try:
                    step = coroutine.throw(exc)
                except StopIteration as finished:
                    return finished.value
            else:
                try:
                    step = coroutine.send(sent)
                except StopIteration as finished:
                    return finished.value


class RecordBatch(ConsumerMessage):
    """One partition's records from one fetch, delivered to a batch topic's channels as one message.

    It stands in the consumer's unacknowledged set for its records, so a rebalance waits for the
    stage to finish the batch; its final ack acknowledges every record, so offsets are committed
    only up to what the stage has finished."""

    def __init__(self, records: list[ConsumerMessage]) -> None:
        first = records[0]
        super().__init__(first.topic, first.partition, first.offset, first.timestamp, first.timestamp_type, None,
                         None, None, None, tp=first.tp, generation_id=first.generation_id)
        self.records = records

    def on_final_ack(self, consumer: Any) -> bool:
        with ack_lock:
            self.acked = True
            consumer.unacked.discard(self)
            # A batch fetched before a rebalance and delivered after it is skipped unhandled, and
            # a skipped event is acknowledged: its records must not be, or the commit passes them.
            # The consumer reads them again from the committed offsets.
            if self.generation_id == consumer.app.consumer_generation_id:
                for record in self.records:
                    consumer.ack(record)
        return True


class BatchTopic(faust.Topic):
    """A topic the fetcher of this module's App delivers in batches (see `records_of`).
    Only batch channels may consume a batch topic: the fetcher batches every record of it."""

    def __init__(self, app: App, *args: Any, **kwargs: Any) -> None:
        # Raw bytes: the edge decodes and validates each record itself. (faust's clones pass them on.)
        for setting, raw in (("key_type", bytes), ("value_type", bytes), ("key_serializer", "raw"), ("value_serializer", "raw")):
            kwargs.setdefault(setting, raw)
        super().__init__(app, *args, **kwargs)
        app.batch_topics.update(self.topics)


def records_of(event: EventT) -> list[Message]:
    """The records an event of a batch topic carries: a partition's share of a fetch, or the one
    record of an event delivered otherwise (faust's agent test context)."""
    message = event.message
    return message.records if isinstance(message, RecordBatch) else [message]


class ConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: aiokafka_driver.Transport) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # faust fixes the fetch wait at 1.5 s. The embedded broker answers a fetch only when that
        # wait is over, which held every stage to a fetch per partition per 1.5 s; Apache Kafka
        # answers as soon as there is data either way, so a short wait costs only idle polls.
        consumer._fetch_max_wait_ms = self.app.fetch_max_wait_ms
        conf = self.app.conf
        self._tail_reader_settings = {
            "bootstrap_servers": aiokafka_driver.server_list(transport.url, transport.default_port),
            "client_id": conf.broker_client_id,
            "enable_auto_commit": False,
            "fetch_max_wait_ms": self.app.fetch_max_wait_ms,
            "max_poll_records": 1_000_000,  # a whole batch at once, however many records it holds
            **aiokafka_driver.credentials_to_aiokafka_auth(conf.broker_credentials, conf.ssl_context),
        }
        return consumer

    async def _highwaters(self, partitions: list[TP]) -> Mapping[TP, int]:
        """The end offsets faust recovers tables up to, read off the partitions' last batches.

        The embedded broker reports a partition's end offset as its newest batch's first offset
        plus one, whatever the batch holds (a changelog batch holds many changes). Recovery then
        stopped inside that batch, and a restarted worker lost the newest changes of its tables:
        seen as ledger rows recovered as `queued` after the mail had been sent. Apache Kafka's end
        offsets are right, and reading the last batch finds the same ones."""
        ends = dict(await super()._highwaters(partitions))
        last = {tp: end - 1 for tp, end in ends.items() if end and end > 0}
        if not last:
            return ends
        reader = aiokafka.AIOKafkaConsumer(**self._tail_reader_settings)
        await reader.start()
        try:
            reader.assign([TopicPartition(tp.topic, tp.partition) for tp in last])
            for tp, offset in last.items():
                reader.seek(TopicPartition(tp.topic, tp.partition), offset)
            waiting = set(last)
            for _ in range(TAIL_READ_ATTEMPTS):
                if not waiting:
                    break
                for part, records in (await reader.getmany(*[TopicPartition(tp.topic, tp.partition) for tp in waiting],
                                                           timeout_ms=TAIL_READ_WAIT_MS)).items():
                    tp = TP(part.topic, part.partition)
                    if records:
                        ends[tp] = max(ends[tp], records[-1].offset + 1)
                        waiting.discard(tp)
        finally:
            await reader.stop()
        return ends

    async def committed_offsets(self) -> dict[TP, int | None]:
        """The group's committed offsets of the assigned partitions (nothing is sought)."""
        return await self.call_thread(self._committed_offsets)

    async def _committed_offsets(self) -> dict[TP, int | None]:
        consumer = self._ensure_consumer()
        return {tp: await consumer.committed(tp) for tp in self.assignment()}

    async def seek_assigned(self, offsets: Mapping[TP, int | None]) -> set[TP]:
        """Seek the partitions still assigned to their offsets (as aiokafka's seek_to_committed
        does: none for an offset of 0 or None); returns the partitions still assigned."""
        return await self.call_thread(self._seek_assigned, offsets)

    async def _seek_assigned(self, offsets: Mapping[TP, int | None]) -> set[TP]:
        assigned = self.assignment()
        for tp, offset in offsets.items():
            if tp in assigned and offset:
                self.seek(tp, offset)
        return assigned


class Consumer(aiokafka_driver.Consumer):
    # Committed offsets the fetch loop seeks to before its next fetch (see perform_seek).
    _pending_seek: Mapping[TP, int | None] | None = None

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def perform_seek(self) -> None:
        """faust's seek to the committed offsets after a rebalance, made by the fetch loop.

        faust seeks in the consumer's thread while the fetch loop goes on, and sets the read
        offsets once every partition is sought. Records fetched in between were then measured
        against read offsets that no longer matched the positions: a run of them was skipped and
        counted as a gap in the partition, and the gap was committed as handled. Seen as 34
        checkouts never prompted when a worker took over partitions during its recovery. Here
        the commits count from the committed offsets at once, and the fetch loop seeks, holding no
        records, before it fetches again: a record delivered before that is read again, and the
        edge drops the second copy."""
        committed = await self._thread.committed_offsets()
        self._committed_offset.update({tp: offset or None for tp, offset in committed.items() if offset is not None})
        self._pending_seek = committed

    async def _seek_pending(self) -> None:
        offsets, self._pending_seek = self._pending_seek, None
        assigned = await self._thread.seek_assigned(offsets)
        self._read_offset.update({tp: offset if offset is not None and offset >= 0 else None
                                  for tp, offset in offsets.items() if tp in assigned})

    async def _drain_messages(self, fetcher: ServiceT) -> None:
        """faust's fetch loop (the same checks, in the same order), except that records of batch
        topics are gathered per partition and delivered once a fetch has been read, and that the
        loop makes the seeks after a rebalance itself (see perform_seek)."""
        deliver = self.callback
        batch_topics = self.app.batch_topics
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        stopped = lambda: self._stopped.is_set() or fetcher._stopped.is_set()  # noqa: E731
        try:
            while not stopped():
                if self._pending_seek is not None:
                    await self._seek_pending()
                self.diag.set_flag(CONSUMER_FETCHING)
                fetched = self.getmany(timeout=1.0)
                await self.sleep(0)  # getmany may return at once, again and again
                if self.should_stop:
                    continue
                batches: dict[TP, list[ConsumerMessage]] = {}
                since_yield = 0
                async for tp, message in fetched:
                    since_yield += 1
                    if since_yield > 100:
                        await asyncio.sleep(0)
                        since_yield = 0
                    batch = batches.get(tp)
                    offset, last = message.offset, batch[-1].offset if batch else read_offset[tp]
                    if last is not None and offset < last:
                        continue  # read before a seek back: faust drops it the same way
                    if last and offset - last > 1 and acks_enabled_for(message.topic):
                        await self._add_gap(tp, last + 1, offset)  # compacted away, or a control record
                    if tp.topic in batch_topics:
                        batches.setdefault(tp, []).append(message)
                        continue
                    await self._commit_when_due()
                    await self.wait_first(deliver(message), self.suspend_flow.wait())
                    read_offset[tp] = offset
                for tp, records in batches.items():
                    generation = records[0].generation_id
                    if generation != self.app.consumer_generation_id:
                        break  # fetched before a rebalance: read again from the committed offsets
                    await self._commit_when_due()
                    await self.wait_first(deliver(RecordBatch(records)), self.suspend_flow.wait())
                    if generation != self.app.consumer_generation_id:
                        break  # the rebalance came while delivering: its seek stands
                    read_offset[tp] = records[-1].offset
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)

    async def _commit_when_due(self) -> None:
        if self._commit_every is not None and self._n_acked >= self._commit_every:
            self._n_acked = 0
            await self.commit()

    async def wait_first(self, *coros: WaitArgT, timeout: Seconds | None = None) -> WaitResults:
        # Only the fetcher calls this on a consumer: (delivery, the suspend-flow wait).
        first, *others = coros
        if inspect.iscoroutine(first):
            try:
                yielded = first.send(None)
            except StopIteration as finished:
                for other in others:
                    if inspect.iscoroutine(other):
                        other.close()
                return WaitResults([first], [finished.value], False)
            first = _Resumed(first, yielded)
        return await super().wait_first(first, *others, timeout=timeout)


class Transport(aiokafka_driver.Transport):
    Consumer = Consumer


class LeanMonitor(Monitor):
    """faust's Monitor keeps statistics of every message and event for faust's own stats pages,
    which Usher does not serve (workers/metrics.py counts what it needs, per batch). This one
    keeps only what faust's consumer reads to tell a stalled stream (`stream_inbound_time`)."""

    def on_message_in(self, tp: TP, offset: int, message: Message) -> None:
        pass

    def on_stream_event_in(self, tp: TP, offset: int, stream: StreamT, event: EventT) -> None:
        self.stream_inbound_time[tp] = monotonic()

    def on_stream_event_out(self, tp: TP, offset: int, stream: StreamT, event: EventT, state: dict | None = None) -> None:
        pass

    def on_message_out(self, tp: TP, offset: int, message: Message) -> None:
        pass


class App(faust.App):
    """A faust App on the transport above (the `kafka://` broker URLs stay as they are), with the
    lean monitor above; `fetch_max_wait_ms` is the consumer's fetch wait (see ConsumerThread)."""

    def __init__(self, *args: Any, fetch_max_wait_ms: int, **kwargs: Any) -> None:
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.batch_topics: set[str] = set()  # see BatchTopic
        super().__init__(*args, monitor=LeanMonitor(), **kwargs)

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)
