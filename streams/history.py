"""Every partition's vendor history, read by every worker: one history whichever worker decides.

Each partition writes its own slice of a vendor's history (``<vendor>@<partition>``) to the
vendor table; its changelog is read here, whole and ``read_committed``, by every worker, so a
decision pools the slices of all partitions, not only those its worker owns. Slices of other
workers' partitions lag by their worker's transaction (one batch, two while a batch's
transaction commits in the background as the next is handled), plus one poll here (before
every batch and every sweep, ``sweep_interval_s``), plus one fetch (at most 50 ms): about a
second with the defaults. That is the documented propagation lag.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from lotflow.kafka_clients import client_config
from lotflow.settings import Settings

__all__ = ["LazyHistory", "SharedHistory"]


class SharedHistory(Mapping[str, Any]):
    def __init__(self, settings: Settings, changelog_topic: str) -> None:
        self.topic = changelog_topic
        self._values: dict[str, Any] = {}
        self._consumer = Consumer(client_config(
            settings,
            **{"group.id": f"{settings.app_id}-history-unused",  # required by librdkafka; never committed
               "enable.auto.commit": False, "enable.partition.eof": False,
               # the propagation lag: an idle partition's fetch returns after at most this
               "fetch.wait.max.ms": 50,
               "isolation.level": "read_committed"}))
        self._consumer.assign([TopicPartition(changelog_topic, p, OFFSET_BEGINNING)
                               for p in range(settings.partitions)])

    def poll(self, max_messages: int = 10000) -> int:
        """Apply what was committed since the last poll; never blocks. Returns the records applied."""
        messages = self._consumer.consume(max_messages, timeout=0)
        applied = 0
        for msg in messages:
            raw_key = msg.key()
            if msg.error() or raw_key is None:
                continue
            applied += 1
            key = orjson.loads(raw_key)
            value = msg.value()
            if value is None:
                self._values.pop(key, None)
            else:
                self._values[key] = orjson.loads(value)
        return applied

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._values.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def close(self) -> None:
        self._consumer.close()


class LazyHistory(Mapping[str, Any]):
    """Empty until ``attach``: the worker builds its processor before Faust declares topics."""

    def __init__(self) -> None:
        self._history: SharedHistory | None = None

    def attach(self, history: SharedHistory) -> None:
        self._history = history

    def poll(self) -> int:
        return self._history.poll() if self._history is not None else 0

    def __getitem__(self, key: str) -> Any:
        if self._history is None:
            raise KeyError(key)
        return self._history[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._history.get(key, default) if self._history is not None else default

    def __iter__(self) -> Iterator[str]:
        return iter(self._history) if self._history is not None else iter(())

    def __len__(self) -> int:
        return len(self._history) if self._history is not None else 0
