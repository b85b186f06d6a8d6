"""Building a faust App for one stage, or for all four in one process.

Each stage module has `register(app, ctx)`, which puts its agents, tables,
timers and views on whichever App it is given. One App per stage is the
production shape (its own consumer group, so a slow stage never starves
another); `usher worker all` registers the four on one App, because a second
App in the same worker would not consume.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import faust

from workers.edge import Edge
from workers.transport import App
from workers.feed import Feed, FeedHandler
from workers.settings import Settings
from workers.web import register_health

STAGES = ("prompts", "consent", "segments", "messages")


@dataclass
class StageContext:
    """What a stage's `register` gets besides the App."""

    name: str
    app: faust.App
    settings: Settings
    edge: Edge
    ready_events: list[asyncio.Event] = field(default_factory=list)

    def feed(self, topics: Sequence[str], handler: FeedHandler) -> Feed:
        """Read compacted reference topics whole on this worker (see workers/feed.py);
        the stage's agents and /readyz wait until it has caught up."""
        feed = Feed(self.app, self.name, topics, handler, self.settings.bootstrap_servers)
        self.edge.waits.append(feed.ready)
        self.ready_events.append(feed.ready)
        return feed


def app_id(stages: tuple[str, ...]) -> str:
    return "usher-all" if len(stages) > 1 else f"usher-{stages[0]}"


def build_app(stages: tuple[str, ...], settings: Settings) -> faust.App:
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage {sorted(unknown)}; choose from {', '.join(STAGES)} or all")
    name = app_id(stages)
    (settings.data_dir / name).mkdir(parents=True, exist_ok=True)
    app = App(
        name,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        broker=settings.broker,
        store=settings.store,
        datadir=str(settings.data_dir / name),
        autodiscover=False,
        web_enabled=True,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_in_thread=False,
        topic_partitions=settings.partitions,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_s,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        producer_linger_ms=2,
        # The edge produces a batch per partition (workers/edge.py): 16 KB batches made it a future
        # and a request part every dozen records.
        producer_max_batch_size=512 * 1024,
        producer_acks=-1,
        # What a worker holds fetched but not yet handled: a fetch returns at most four batches'
        # records and 256 KB a partition (faust's default, 1 MB, times every partition of every
        # topic a stage reads), and a stage's queue holds at most four partitions' shares of
        # fetches. Measured on the send bench (300,000 mails), peak memory 290 -> 267 MB.
        broker_max_poll_records=4 * settings.batch_size,
        consumer_max_fetch_size=256 * 1024,
        stream_buffer_maxsize=4,
        logging_config=None,
    )
    ready_events: list[asyncio.Event] = []
    register_health(app, ready_events)
    for stage in stages:
        module = importlib.import_module(f"workers.{stage}.app")
        edge = Edge(app, stage, batch_size=settings.batch_size, batch_within_s=settings.batch_within_s, dedupe_window=settings.dedupe_window)
        module.register(app, StageContext(stage, app, settings, edge, ready_events))
    logging.getLogger("workers").setLevel(logging.INFO)
    return app
