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
import os
from collections.abc import Coroutine, Generator
from time import monotonic
from typing import Any

import aiokafka
import faust
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.sensors.monitor import Monitor
from faust.types import TP, EventT, Message, StreamT
from mode.services import WaitArgT, WaitResults
from mode.utils.times import Seconds

FETCH_MAX_WAIT_MS = int(os.environ.get("USHER_FETCH_MAX_WAIT_MS", "50"))


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
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


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
    lean monitor above."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, monitor=LeanMonitor(), **kwargs)

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)
