"""Which worker answers an HTTP request about a key, and passing the request on to it.

State keyed `{tenant}/{contact}` (or `{tenant}/{message}`) lives on the worker active for the key's
partition; another worker passes a GET on to that one and returns its answer, so any worker of a
stage can be asked.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import faust
from faust.web import Request, Response, View
from yarl import URL

from workers import web
from workers.settings import Settings

FORWARD_TIMEOUT = aiohttp.ClientTimeout(total=10)
# Marks a passed-on request, so two workers that disagree during a rebalance do not pass it around.
FORWARDED_HEADER = "X-Usher-Forwarded"
# Headers of the owner's answer that go back with it.
PASSED_BACK_HEADERS = ("Content-Disposition", "Cache-Control")


def active_partitions(app: faust.App, topic: str) -> set[int]:
    """The partitions of `topic` this worker is active for (its tables also hold standby copies)."""
    return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic}


class Owners:
    def __init__(self, app: faust.App, ready: list[asyncio.Event]) -> None:
        self.app, self.ready = app, ready
        self.here = str(app.conf.canonical_url)

    def settled(self) -> bool:
        return web.settled(self.app, self.ready)

    def owner(self, topic: str, key: str) -> str | None:
        """The web address of the worker active for the key's partition of `topic` (None while
        unassigned). Not faust's router: it hashes table keys as JSON, not as record keys are partitioned."""
        partition = self.app.consumer.key_partition(topic, key.encode())
        if partition is None:
            return None
        distribution = self.app.router.external_topics_metadata()
        return next((url for url, topics in distribution.items() if partition in topics.get(topic, ())), None)

    def owned_here(self, topic: str, key: str) -> bool:
        """Whether this worker's tables hold the key's current state."""
        return self.settled() and self.owner(topic, key) == self.here

    async def answer_for_tenant(self, view: View, request: Request, settings: Settings, tenant: str, topic: str, key: str,
                                answer: Callable[[], Response]) -> Response:
        """A `/v1` GET about one of the tenant's keys: its token checked, then `answer` as below."""
        refused = web.authorize(view, request, settings, tenant)
        return refused if refused is not None else await self.answer(view, request, topic, key, answer)

    async def answer(self, view: View, request: Request, topic: str, key: str | None, answer: Callable[[], Response]) -> Response:
        """`answer()` here when this worker owns the key (None: any worker may answer), else the
        owner's answer to the same request."""
        owner = self.here if key is None else self.owner(topic, key)
        if owner == self.here and self.settled():
            return answer()
        if owner is None or owner == self.here or FORWARDED_HEADER in request.headers:
            return not_settled(view)
        headers = {name: value for name, value in request.headers.items() if name.lower() != "host"} | {FORWARDED_HEADER: self.here}
        try:
            async with self.app.http_client.get(URL(owner).join(request.rel_url), headers=headers, timeout=FORWARD_TIMEOUT) as response:
                passed_back = {name: response.headers[name] for name in PASSED_BACK_HEADERS if name in response.headers}
                return view.bytes(await response.read(), content_type=response.content_type, status=response.status, headers=passed_back)
        except (aiohttp.ClientError, TimeoutError):
            return web.error(view, 503, "owner_unavailable", "The worker holding these records does not answer; try again shortly.")


def not_settled(view: View) -> Response:
    """The answer while a stage's partitions are being assigned (starting, or rebalancing)."""
    return web.error(view, 503, "rebalancing", "The records are moving between workers; try again shortly.")
