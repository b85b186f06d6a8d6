"""Faust tables as the stages keep them: on one RocksDB budget per worker, written after the
batch's records are in Kafka, and (`ContactTable`) with their changes produced by the stage.

A stage's table entry changes with a record, and its changelog record goes out with the
record's outputs. The store was written at once, as faust writes it, so a crash after the
write and before Kafka had the outputs left a store holding a change nothing else had seen:
the record, read again, found its change made and produced nothing (with RocksDB's write-ahead
log any crash did so). `Entries` keeps a batch's writes in memory, readable at once, and writes
them to the store only once the edge has the batch's records acknowledged (`edge.staging_in_batch`).
A table is written by one subscription's handlers: a batch writes the tables its own handlers
wrote, and another subscription's batch, done first, must not write them before their records.
A handler that raises has its record parked and its outputs dropped, so the writes it made
before raising are undone with them.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import faust
import orjson
from faust.stores import rocksdb as faust_rocksdb
from faust.stores.memory import Store as MemoryStore
from faust.streams import current_event
from faust.utils import json as faust_json

from workers import envelope

from workers.edge import staging_in_batch

if TYPE_CHECKING:
    from workers.edge import Edge

# RocksDB's defaults (per partition of every table: up to three 64 MB write buffers and a
# 2 GB block cache) let a worker's memory grow with every record. The tables, all their
# partitions together, share one block cache and one memtable budget instead.
ROCKSDB_OPTIONS = {"write_buffer_size": 2 << 20, "max_write_buffer_number": 2, "block_cache_size": 8 << 20}
MEMTABLE_BUDGET = 16 << 20
# Decoded entries a table keeps at hand (`Entries`): a contact's state is a few KB decoded.
CACHED_ENTRIES = 10_000


class StageRocksDBOptions(faust_rocksdb.RocksDBOptions):
    """faust's RocksDB options (rocksdict), with the block cache and the memtable budget of
    all the worker's tables shared, and no write-ahead log.

    A table is recovered from its changelog, from after the offset persisted in its own store.
    Without a WAL a crash loses the store's latest writes together with the offsets persisted
    after them (one column family: what survives is a prefix of the writes), so recovery reads
    those changes from the changelog again. A WAL would only cost a write() per change: on the
    consent stage, 15% of its time."""

    _shared: tuple[Any, Any] | None = None

    @classmethod
    def shared(cls) -> tuple[Any, Any]:
        """(block cache, write buffer manager), one per process."""
        if cls._shared is None:
            rocksdict = faust_rocksdb.rocksdict
            cls._shared = (rocksdict.Cache(ROCKSDB_OPTIONS["block_cache_size"]), rocksdict.WriteBufferManager(MEMTABLE_BUDGET, False))
        return cls._shared

    def as_options(self) -> Any:
        rocksdict = faust_rocksdb.rocksdict
        cache, write_buffers = self.shared()
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_max_open_files(self.max_open_files)
        options.set_write_buffer_size(self.write_buffer_size)
        options.set_target_file_size_base(self.target_file_size_base)
        options.set_max_write_buffer_number(self.max_write_buffer_number)
        options.set_write_buffer_manager(write_buffers)
        table = rocksdict.BlockBasedOptions()
        table.set_bloom_filter(self.bloom_filter_size, block_based=True)
        table.set_block_cache(cache)
        table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
        options.set_block_based_table_factory(table)
        return options

    def open(self, path: Any, *, read_only: bool = False) -> Any:
        rocksdict = faust_rocksdb.rocksdict
        options = self.as_options()
        options.set_db_paths([rocksdict.DBPath(str(path), self.target_file_size_base)])
        db = rocksdict.Rdict(str(path), options=options, access_type=rocksdict.AccessType.read_write())
        db.set_read_options(rocksdict.ReadOptions())
        write = rocksdict.WriteOptions()
        write.disable_wal = True
        db.set_write_options(write)
        return db


def with_stage_rocksdb(store: Any) -> Any:
    """`store` on `StageRocksDBOptions`, when it is a RocksDB store (not memory://)."""
    if isinstance(store, faust_rocksdb.Store) and store.use_rocksdict:
        store.rocksdb_options = StageRocksDBOptions(**(dict(ROCKSDB_OPTIONS) | dict(store.options)), use_rocksdict=True)
    return store


def use_stage_rocksdb(app: faust.App) -> None:
    """Every table of `app` on `StageRocksDBOptions`. Call once the stages are registered and
    before any store is opened: left on faust's defaults, the messages stage's seen table alone
    grew its memtables by about 15 MB per 100,000 mails sent."""
    for table in app.tables.values():
        if table._data is not None:
            raise RuntimeError(f"table {table.name}'s store was opened before its options were set")
        table._new_store = _on_stage_rocksdb(table._new_store)  # type: ignore[method-assign]


def _on_stage_rocksdb(new_store: Callable[[], Any]) -> Callable[[], Any]:
    return lambda: with_stage_rocksdb(new_store())


# faust's `faust.utils.json.dumps` with orjson (which Usher installs), called straight: the stages
# encode several keys and values a record, and faust's wrapper cost as much as the encoding.
_faust_json_dumps = partial(orjson.dumps, default=faust_json.on_default, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z)
_join = b"".join


def json_bytes(value: Any) -> bytes:
    """What faust's `json` codec makes of a value, in a bytes object of its own size.

    orjson (3.12 on) hands its output over in the buffer it wrote it in, 4 KB at the least, and
    the stages keep encoded keys and values until their batch is written: kept as orjson made
    them, the messages worker's peak memory sending 200,000 mails went from 222 to 323 MB. Joined
    with nothing, the output is copied into a bytes object of its length."""
    return _join((_faust_json_dumps(value), b""))


class Entries:
    """A table's entries (keys as bytes, values in faust's json) as the stage's handlers read and
    write them: straight through its store, not faust's `Table`, whose key events, serializer
    registry and `__missing__` cost more than a rule. Writes are kept until the edge's batch is
    acknowledged, then written together (see the module's docstring); reads see them at once.
    Write in a record's context: the entry belongs to that record's partition."""

    def __init__(self, table: faust.Table) -> None:
        self.table = table
        self.name = table.name
        # The decoded entries of this worker's partitions lately read or written (None: no entry),
        # as the store holds them: a contact's next record finds them without a store read and a
        # JSON decode. Emptied when partitions move, since recovery writes the store directly.
        self._cache: dict[bytes, Any] = {}
        self._cache_generation: int | None = None
        # key -> (partition, value (None for a delete, _UNDECODED), the value's bytes if known)
        self._staged: dict[bytes, tuple[int, Any, bytes | None]] = {}
        # What each key staged before the current handler's first write to it (_ABSENT: nothing).
        self._before_handler: dict[bytes, tuple[int, Any, bytes | None] | object] = {}
        self._batch: object = None  # the batch whose writes are staged

    def get(self, key: bytes, partition: int | None = None) -> Any:
        """The entry in `partition` (default: the current record's). Outside a record's context
        and without `partition` (a web view), faust looks in every partition's DB."""
        staged = self._staged.get(key)
        if staged is not None:
            return orjson.loads(staged[2]) if staged[1] is _UNDECODED else staged[1]
        store = self.table.data
        if isinstance(store, MemoryStore):
            return store.data.get(key)
        if partition is None and current_event() is None:
            return store.get(key)
        cache = self._current_cache()
        value = cache.get(key, _ABSENT)
        if value is _ABSENT:
            raw = self._stored_bytes(store, key, partition)
            value = None if raw is None else orjson.loads(raw)
            self._remember(cache, key, value)
        return value

    def _current_cache(self) -> dict[bytes, Any]:
        generation = self.table.app.consumer_generation_id
        if generation != self._cache_generation:
            self._cache = {}
            self._cache_generation = generation
        return self._cache

    @staticmethod
    def _remember(cache: dict[bytes, Any], key: bytes, value: Any) -> None:
        if len(cache) >= CACHED_ENTRIES and key not in cache:
            del cache[next(iter(cache))]  # the oldest
        cache[key] = value

    def extend(self, key: bytes, items: list[Any]) -> None:
        """Adds `items` to the end of the list entry `key` (made if missing). An encoded entry is
        added to as bytes, not decoded: `[a, b]` and `[c]` make `[a, b, c]`."""
        partition = current_event().message.partition
        store = self.table.data
        if isinstance(store, MemoryStore):  # a new list: the stored one stays as it is until `write`
            self._stage(key, (partition, [*(self.get(key) or ()), *items], None))
            return
        staged = self._staged.get(key)
        if staged is None:
            stored = self._stored_bytes(store, key, partition)
        else:
            stored = None if staged[1] is None else staged[2] or json_bytes(staged[1])
        added = json_bytes(items)
        self._stage(key, (partition, _UNDECODED, added if not stored or stored == b"[]" else stored[:-1] + b"," + added[1:]))

    @staticmethod
    def _stored_bytes(store: Any, key: bytes, partition: int | None) -> bytes | None:
        return store._db_for_partition(current_event().message.partition if partition is None else partition).get(key)

    def set(self, key: bytes, value: Any, encoded: bytes | None = None) -> None:
        """`encoded`: `json_bytes(value)`, when the caller has it already."""
        self._stage(key, (current_event().message.partition, value, encoded))

    def delete(self, key: bytes) -> None:
        self._stage(key, (current_event().message.partition, None, None))

    def _stage(self, key: bytes, write: tuple[int, Any, bytes | None]) -> None:
        batch = staging_in_batch(self)
        if self._staged and batch is not self._batch:
            raise RuntimeError(f"table {self.name} is written by two subscriptions' batches at once")
        self._batch = batch
        if key not in self._before_handler:
            self._before_handler[key] = self._staged.get(key, _ABSENT)
        self._staged[key] = write

    def handler_done(self) -> None:
        """The writes the handler made stand (its outputs go with the batch)."""
        self._before_handler.clear()

    def undo_handler(self) -> None:
        """Undo the writes the handler made since `handler_done` was last called: it raised."""
        for key, before in self._before_handler.items():
            if before is _ABSENT:
                del self._staged[key]
            else:
                self._staged[key] = before  # type: ignore[assignment]
        self._before_handler.clear()

    def items(self) -> Iterator[tuple[bytes, Any]]:
        staged = dict(self._staged)
        for key, value in self.table.items():
            if key not in staged:
                yield key, value
        for key, (_, value, encoded) in staged.items():
            if value is not None:
                yield key, orjson.loads(encoded) if value is _UNDECODED else value

    def discard(self) -> None:
        """Forget the staged writes: their records never reached Kafka, and will be handled again."""
        self._staged = {}
        self._before_handler.clear()

    def write(self) -> None:
        """The staged writes to the store: call once Kafka has the records they go with."""
        staged, self._staged = self._staged, {}
        if not staged:
            return
        store = self.table.data
        if isinstance(store, MemoryStore):
            for key, (_, value, _) in staged.items():
                if value is None:
                    store.data.pop(key, None)
                else:
                    store.data[key] = value
            return
        batches: dict[int, Any] = {}
        cache = self._current_cache()
        for key, (partition, value, encoded) in staged.items():
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = faust_rocksdb.rocksdict.WriteBatch(raw_mode=True)
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, json_bytes(value) if encoded is None else encoded)
            if value is _UNDECODED:
                cache.pop(key, None)
            else:
                self._remember(cache, key, value)
        for partition, batch in batches.items():
            store._db_for_partition(partition).write(batch)


# A staged value known only as its JSON (`Entries.extend`).
_UNDECODED = object()
# No write staged for a key (`Entries.undo_handler`).
_ABSENT = object()


class _Change(envelope.Out):
    """A table change as its changelog record, its value encoded once for the store and Kafka
    (None: the entry is deleted)."""

    __slots__ = ("encoded",)
    table_change = True

    def __init__(self, topic: str, key: str, value: Any, encoded: bytes | None) -> None:
        super().__init__(topic, key, value)
        self.encoded = encoded

    def value_bytes(self) -> bytes | None:
        return self.encoded


class ContactTable:
    """A faust table keyed `{tenant}/{contact}` whose changes are produced with the stage's other
    records, in one batch per partition, instead of by faust one send at a time (which costs more
    than the consent rules themselves). Call `set`/`delete` in the record's context and return
    their `Out` with the handler's. Keys are kept as bytes, which faust serializes raw, so a change
    lands in the changelog partition of the record's own partition (the key's, murmur2 as
    everywhere), as faust's would; recovery and standbys read that changelog as usual."""

    def __init__(self, edge: Edge, name: str) -> None:
        self.table = edge.app.Table(name, default=None, key_type=bytes)
        self.changelog = self.table.changelog_topic.get_topic_name()
        self.entries = Entries(self.table)

    def get(self, key: str, partition: int | None = None) -> dict[str, Any] | None:
        return self.entries.get(key.encode(), partition)

    def items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return ((key.decode(), value) for key, value in self.entries.items())

    def on_recover(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Call `callback` whenever the table has been recovered, after every rebalance."""
        self.table.on_recover(callback)

    def set(self, key: str, value: dict[str, Any]) -> envelope.Out:
        change = _Change(self.changelog, key, value, json_bytes(value))
        self.entries.set(key.encode(), value, change.encoded)
        return change

    def delete(self, key: str) -> envelope.Out:
        self.entries.delete(key.encode())
        return _Change(self.changelog, key, None, None)
