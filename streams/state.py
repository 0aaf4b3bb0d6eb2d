"""Keyed state on Faust tables: changed in units of work, written to the changelog once per batch.

Faust's own table path sends one changelog record per assignment through its slow producer.
Here a handler changes state inside a ``StateUnit``: reads are private copies, writes are
staged, and nothing reaches the table until the unit commits, after the unit's outputs were
encoded. A record whose handling raises leaves the state as it was (its unit is dropped).
Committed changes are produced once per key per batch, each with an explicit partition, in
Faust's changelog format (JSON key and value), so Faust's own recovery rebuilds the table.
Memory store only: the store's key -> partition map is kept as Faust keeps it.

A table with many keys (the PO state: receipts waiting, certificates, duplicates, lots) holds
each value as its changelog bytes (``encoded=True``; the Faust table's value serializer is
``raw``, so recovery stores the same bytes): a JSON document takes a third of the memory of the
dicts it decodes to, and ``get`` returns a private copy by decoding it. A small table read on
every event (the vendor history) holds the decoded values and ``get`` returns the live one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import orjson

__all__ = ["ChangelogTable", "DictState", "StateTooLarge", "StateUnit", "encode_value"]


class StateTooLarge(ValueError):
    """A state value would not fit in one changelog record."""


class Sender(Protocol):
    def send_raw(self, topic: str, key: bytes, value: bytes | None, partition: int | None = None) -> None: ...


def encode_value(value: Any) -> bytes:
    """A state value's changelog bytes, right-sized.

    ``orjson.dumps`` returns its bytes in the ~4 KiB buffer it wrote into (measured: 200k
    126-byte values held 786 MB of RSS); a copy of the exact size is what a store, or a batch
    of pending changelog records, should keep.
    """
    return memoryview(orjson.dumps(value)).tobytes()


def _copy(value: Any) -> Any:
    # State values are JSON documents (that is what the changelog holds): a round trip is a deep copy.
    return None if value is None else orjson.loads(orjson.dumps(value))


class ChangelogTable:
    """A Faust ``Table`` (memory store) whose writes are batched and produced by a ``Sender``.

    ``encoded``: the store holds each value's JSON bytes (the Faust table must use
    ``value_serializer="raw"``) and ``get`` decodes a private copy; otherwise the store holds
    the values and ``get`` returns the live one (read it, never change it).
    """

    def __init__(self, table: Any, *, encoded: bool = False) -> None:
        self._table = table
        self.encoded = encoded
        # key -> (partition, encoded value or None, whether the key was absent when the batch first changed it)
        self._dirty: dict[str, tuple[int, bytes | None, bool]] = {}
        self._store: dict[str, Any] | None = None
        self._key_partition: dict[str, int] | None = None

    # Faust creates the store lazily; these two are the store's own maps. The memory store keeps
    # the same two dicts for its life, so they are looked up once: get and apply run several
    # times per event.
    def _data(self) -> dict[str, Any]:
        if self._store is None:
            self._store = self._table.data.data
        return self._store

    def _partitions(self) -> dict[str, int]:
        if self._key_partition is None:
            self._key_partition = self._table.data._key_partition
        return self._key_partition

    def changelog_topic(self) -> str:
        return str(self._table.changelog_topic.get_topic_name())

    def get(self, key: str) -> Any:
        """The value (encoded: a private copy; otherwise the live value: read it, never change it).
        Changes go through a ``StateUnit``."""
        store = self._store
        value = (store if store is not None else self._data()).get(key)
        if self.encoded and value is not None:
            return orjson.loads(value)
        return value

    def __contains__(self, key: str) -> bool:
        store = self._store
        return key in (store if store is not None else self._data())

    def items(self) -> Iterator[tuple[str, Any]]:
        """Every key and value, over a snapshot of the keys (encoded values decoded one at a time)."""
        data = self._data()
        for key in list(data):
            value = data.get(key)
            if value is not None:
                yield key, (orjson.loads(value) if self.encoded else value)

    def partition_of(self, key: str) -> int:
        return int(self._partitions()[key])

    def __len__(self) -> int:
        return len(self._data())

    def apply(self, partition: int, key: str, value: Any, encoded: bytes | None) -> None:
        """Set ``key`` (``None`` deletes it: a tombstone in the changelog)."""
        data = self._store if self._store is not None else self._data()
        partitions = self._key_partition if self._key_partition is not None else self._partitions()
        earlier = self._dirty.get(key)
        new = key not in data if earlier is None else earlier[2]
        if value is None:
            data.pop(key, None)
            partitions.pop(key, None)
        else:
            data[key] = encoded if self.encoded else value
            partitions[key] = partition  # Faust drops keys of revoked partitions by this map
        self._dirty[key] = (partition, encoded, new)

    def flush_to(self, sender: Sender) -> int:
        """Produce one changelog record per key changed since the last flush; a key created and
        deleted again since then (a receipt's wait, a certificate used at once) needs none."""
        if not self._dirty:
            return 0
        topic = self.changelog_topic()
        n = 0
        for key, (partition, encoded, new) in self._dirty.items():
            if encoded is None and new:
                continue
            sender.send_raw(topic, orjson.dumps(key), encoded, partition)
            n += 1
        self._dirty.clear()
        return n

    def pending_changes(self) -> int:
        return len(self._dirty)


class _DictStore:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self._key_partition: dict[str, int] = {}


class _Topic:
    def __init__(self, name: str) -> None:
        self._name = name

    def get_topic_name(self) -> str:
        return self._name


class _DictTable:
    def __init__(self, name: str) -> None:
        self.data = _DictStore()
        self.changelog_topic = _Topic(name)


class DictState(ChangelogTable):
    """The same contract without Faust, for pure tests and benchmarks."""

    def __init__(self, name: str = "state-changelog", *, encoded: bool = False) -> None:
        super().__init__(_DictTable(name), encoded=encoded)


class StateUnit:
    """The state changes of handling one record: staged, checked, then applied all at once."""

    def __init__(self, max_value_bytes: int) -> None:
        self._max = max_value_bytes
        self._writes: dict[tuple[int, str], tuple[ChangelogTable, int, Any]] = {}

    def get(self, table: ChangelogTable, key: str) -> Any:
        """A private copy of the value (or of what this unit staged for it)."""
        staged = self._writes.get((id(table), key))
        if staged is not None:
            return staged[2]
        return table.get(key) if table.encoded else _copy(table.get(key))

    def peek(self, table: ChangelogTable, key: str) -> Any:
        """The value (or what this unit staged for it) to read only: no copy. Values read this
        way are replaced on change, never changed in place, so a reader may hold on to one."""
        staged = self._writes.get((id(table), key))
        if staged is not None:
            return staged[2]
        return table.get(key)

    def put(self, table: ChangelogTable, partition: int, key: str, value: Any) -> None:
        self._writes[(id(table), key)] = (table, partition, value)

    def delete(self, table: ChangelogTable, partition: int, key: str) -> None:
        self.put(table, partition, key, None)

    def encode(self) -> list[tuple[ChangelogTable, int, str, Any, bytes | None]]:
        """Serialise every staged value; raises ``StateTooLarge`` before anything is applied."""
        out = []
        for (_, key), (table, partition, value) in self._writes.items():
            encoded = None if value is None else encode_value(value)
            if encoded is not None and len(encoded) + len(key) > self._max:
                raise StateTooLarge(f"state of {key[:80]!r} would be {len(encoded)} bytes, "
                                    f"above the {self._max}-byte record limit")
            out.append((table, partition, key, value, encoded))
        return out

    @staticmethod
    def apply(encoded: list[tuple[ChangelogTable, int, str, Any, bytes | None]]) -> None:
        for table, partition, key, value, data in encoded:
            table.apply(partition, key, value, data)
