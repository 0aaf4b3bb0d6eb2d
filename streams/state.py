"""Keyed state on a Faust table, with changelog writes through the fast producer.

Faust's own table path sends one changelog record per assignment through its slow producer
and needs the current event to pick the partition. Here state changes are collected per
batch, each changed key is written once, with an explicit partition, in Faust's changelog
format (JSON key and value) so Faust's own recovery rebuilds the table after a restart.
Memory store only: the store's key -> partition map is kept as Faust keeps it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import orjson

__all__ = ["ChangelogTable", "DictState", "KeyedState"]


class KeyedState(Protocol):
    def get(self, key: str) -> Any: ...

    def put(self, partition: int, key: str, value: Any) -> None: ...

    def items(self) -> Iterator[tuple[str, Any]]: ...

    def partition_of(self, key: str) -> int: ...


class DictState:
    """The same contract in memory, for pure tests and benchmarks."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.partitions: dict[str, int] = {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, partition: int, key: str, value: Any) -> None:
        if value is None:
            self.data.pop(key, None)
            self.partitions.pop(key, None)
            return
        self.data[key] = value
        self.partitions[key] = partition

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(list(self.data.items()))

    def partition_of(self, key: str) -> int:
        return self.partitions[key]


class Sender(Protocol):
    def send_raw(self, topic: str, key: bytes, value: bytes | None, partition: int | None = None) -> None: ...


class ChangelogTable:
    """A Faust ``Table`` (memory store) whose writes are batched and produced by ``Sender``."""

    def __init__(self, table: Any) -> None:
        self._table = table
        self._dirty: dict[str, int] = {}

    @property
    def _store(self) -> Any:
        return self._table.data

    def get(self, key: str) -> Any:
        return self._store.data.get(key)

    def put(self, partition: int, key: str, value: Any) -> None:
        """Set ``key``; ``None`` deletes it (a tombstone in the changelog)."""
        store = self._store
        if value is None:
            store.data.pop(key, None)
            store._key_partition.pop(key, None)
        else:
            store.data[key] = value
            store._key_partition[key] = partition  # Faust drops keys of revoked partitions by this map
        self._dirty[key] = partition

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(list(self._store.data.items()))

    def partition_of(self, key: str) -> int:
        return int(self._store._key_partition[key])

    def flush_to(self, sender: Sender) -> int:
        """Produce one changelog record per key changed since the last flush."""
        if not self._dirty:
            return 0
        topic = self._table.changelog_topic.get_topic_name()
        data = self._store.data
        for key, partition in self._dirty.items():
            value = data.get(key)
            sender.send_raw(topic, orjson.dumps(key), None if value is None else orjson.dumps(value), partition)
        n = len(self._dirty)
        self._dirty.clear()
        return n
