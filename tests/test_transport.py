"""The transport's record hand-off: same outcome as faust's wait_first, without its tasks when nothing waits."""
from __future__ import annotations

import asyncio

import pytest
from mode import Service

from workers.transport import Consumer


def bare_consumer() -> Consumer:
    """A Consumer with just its Service parts, enough for wait_first (no app or broker)."""
    consumer = Consumer.__new__(Consumer)
    Service.__init__(consumer)
    return consumer


async def test_a_delivery_that_does_not_wait_completes_at_once_and_the_other_wait_is_closed() -> None:
    delivered = []

    async def deliver() -> str:
        delivered.append(1)
        return "done"

    suspended = asyncio.Event()
    other = suspended.wait()
    results = await bare_consumer().wait_first(deliver(), other)
    assert len(results.done) == 1 and results.results == ["done"] and not results.stopped and delivered == [1]
    assert other.cr_frame is None  # closed, not left to warn "never awaited"


async def test_a_delivery_that_waits_is_carried_on_until_it_completes() -> None:
    room = asyncio.Event()
    steps = []

    async def deliver() -> str:
        steps.append("started")
        await room.wait()
        steps.append("put")
        return "done"

    suspended = asyncio.Event()
    waiting = asyncio.ensure_future(bare_consumer().wait_first(deliver(), suspended))
    await asyncio.sleep(0.01)
    assert steps == ["started"] and not waiting.done()
    room.set()
    results = await asyncio.wait_for(waiting, 1)
    assert steps == ["started", "put"] and "done" in results.results


async def test_a_waiting_delivery_gives_way_when_the_flow_is_suspended() -> None:
    async def deliver() -> None:
        await asyncio.Event().wait()  # a buffer that never gets room

    suspended = asyncio.Event()
    waiting = asyncio.ensure_future(bare_consumer().wait_first(deliver(), suspended))
    await asyncio.sleep(0.01)
    suspended.set()
    results = await asyncio.wait_for(waiting, 1)
    assert results.done == [suspended]


async def test_an_error_in_a_delivery_propagates() -> None:
    async def deliver() -> None:
        raise ValueError("bad record")

    with pytest.raises(ValueError, match="bad record"):
        await bare_consumer().wait_first(deliver(), asyncio.Event())
