"""How a worker process keeps its memory: the collector's pace, and glibc's malloc arenas.

Measured on the send bench (one message to 300,000 recipients): the worker's resident memory
reached 581 MB, of which the Python heap held under 70 MB. The rest was glibc's: each thread
(faust's consumer thread, RocksDB's) gets its own 64 MB malloc arena, and records allocated on
one thread and freed on another leave those arenas fragmented and never returned. Fewer arenas
and a periodic `malloc_trim` brought it to 317 MB at the same speed.

Buffers of 256 KB and more (fetch responses, SendGrid request bodies and their answers) are
mapped on their own and unmapped when freed. glibc's default threshold starts at 128 KB but rises
to the size of each mapped buffer freed, up to 32 MB, after which such buffers come from the
arenas and leave them fragmented: at a million recipients, 281 MB at the peak with the default,
246 MB with the threshold fixed, at the same speed (3,911 and 4,122 mails/s, one run each).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc

import faust

# glibc's mallopt parameters (malloc.h): the most arenas it makes; the size from which it maps a buffer alone.
M_ARENA_MAX = -8
M_MMAP_THRESHOLD = -3
MALLOC_ARENAS = 2
# Fixed, so glibc does not raise it (see above).
MMAP_FROM = 256 << 10
YOUNG_COLLECTION_EVERY_S = 1.0
FULL_COLLECTION_EVERY_S = 10.0
TRIM_EVERY_S = 2.0


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_LIBC = _glibc()


def tune_process() -> None:
    """At a worker's start, before its threads exist."""
    # Collections less often: a stage makes and drops many small dicts per record, and with the
    # default thresholds the collector ran through every live object far more often than needed.
    gc.set_threshold(50_000, 20, 20)
    if _LIBC is not None:
        _LIBC.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
        _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_FROM)


def release_free_memory() -> None:
    """Give the pages malloc holds free back to the system (glibc's `malloc_trim`, every arena)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def keep_memory(app: faust.App, *, collections_on_a_clock: bool) -> None:
    """malloc's free pages go back to the system on a clock; with `collections_on_a_clock`, what
    exists once the worker has started (modules, the app) is frozen out of collections and
    collections run on a clock rather than on allocations.

    Allocations started a collection mostly while a batch was being handled, so each one walked
    the batch's records and what the stage made of them, all still alive: without automatic
    collections the consent stage made 5-19% more changes a second (four runs on each store).
    Refcounting frees what a batch leaves; only cycles wait for the clock. On the send bench,
    once records came in batches rather than one faust event each, a full collection found a few
    hundred objects to free and cost about 33 ms, so it runs every 10 s.

    A worker that answers checkouts' HTTP requests keeps CPython's own collector: its full
    collections walk every contact it holds, and on the clock they held requests up long enough
    to take the prompts p99 from 5-6 ms to 10-37 ms (100,000 contacts, 500 requests a second).
    CPython's collector runs a full collection only once the old generation has grown by a
    quarter, which a steady stream of requests rarely makes it do."""

    @app.timer(TRIM_EVERY_S)
    async def trim() -> None:
        release_free_memory()

    if not collections_on_a_clock:
        return

    @app.task
    async def freeze_startup_objects() -> None:
        gc.collect()
        gc.freeze()
        gc.disable()

    @app.timer(YOUNG_COLLECTION_EVERY_S)
    async def collect_young() -> None:
        gc.collect(1)

    @app.timer(FULL_COLLECTION_EVERY_S)
    async def collect_batches() -> None:
        # With young collections rare, what a batch leaves in cycles is often promoted before
        # it dies, and only a full collection frees it.
        gc.collect()
