"""The faust App every stage runs on: faust's Kafka transport with a cheaper hand-off of each
fetched record, a short fetch wait, and no per-event statistics nobody reads.

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

import inspect
from collections.abc import Coroutine, Generator, Mapping
from time import monotonic
from typing import Any

import aiokafka
import faust
from aiokafka import TopicPartition
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.sensors.monitor import Monitor
from faust.types import TP, EventT, Message, StreamT
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


class Consumer(aiokafka_driver.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

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
        super().__init__(*args, monitor=LeanMonitor(), **kwargs)

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)
