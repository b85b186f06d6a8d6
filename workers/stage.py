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

from workers import memory
from workers.edge import Edge
from workers.transport import App
from workers.feed import Feed, FeedHandler
from workers.settings import Settings
from workers.tables import use_stage_rocksdb
from workers.web import register_health

STAGES = ("prompts", "consent", "segments", "messages")


@dataclass(frozen=True)
class FetchAhead:
    """What a worker holds fetched but not yet handled: a fetch returns at most `batches` times
    `USHER_BATCH_SIZE` records and `partition_bytes` a partition (of every topic the stage reads),
    and the stage's queue holds at most `queued_batches` partitions' shares of fetches.

    A stage whose records cost little each needs much fetched ahead to stay busy (these defaults);
    a stage module may set its own as `FETCH_AHEAD`, used when it runs alone. A stage module that
    answers requests while they wait sets `COLLECTIONS_ON_A_CLOCK = False` (`memory.keep_memory`)."""

    partition_bytes: int = 1024 * 1024  # faust's default
    queued_batches: int = 16
    batches: int = 4


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
    modules = [importlib.import_module(f"workers.{stage}.app") for stage in stages]
    fetch_ahead = getattr(modules[0], "FETCH_AHEAD", FetchAhead()) if len(modules) == 1 else FetchAhead()
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
        broker_max_poll_records=fetch_ahead.batches * settings.batch_size,
        consumer_max_fetch_size=fetch_ahead.partition_bytes,
        stream_buffer_maxsize=fetch_ahead.queued_batches,
        logging_config=None,
    )
    ready_events: list[asyncio.Event] = []
    register_health(app, ready_events)
    for stage, module in zip(stages, modules, strict=True):
        edge = Edge(app, stage, batch_size=settings.batch_size, batch_within_s=settings.batch_within_s, dedupe_window=settings.dedupe_window)
        module.register(app, StageContext(stage, app, settings, edge, ready_events))
    use_stage_rocksdb(app)
    memory.keep_memory(app, collections_on_a_clock=all(getattr(module, "COLLECTIONS_ON_A_CLOCK", True) for module in modules))
    logging.getLogger("workers").setLevel(logging.INFO)
    return app
