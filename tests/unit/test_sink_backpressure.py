"""The sink's consumer while its writer is behind: wait for the write first, pause only when it lasts."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from lotflow.metrics import SinkMetrics
from lotflow.settings import Settings
from lotflow.sinks import sink as sink_module
from lotflow.sinks.sink import ClickHouseSink


class RecordingConsumer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def assignment(self) -> list[Any]:
        return ["tp"]

    def pause(self, partitions: list[Any]) -> None:
        self.calls.append("pause")

    def resume(self, partitions: list[Any]) -> None:
        self.calls.append("resume")


def _behind_sink(batch_rows: int = 10) -> tuple[ClickHouseSink, Future[bool]]:
    metrics = SinkMetrics.create(CollectorRegistry())
    sink = ClickHouseSink(Settings(sink_batch_rows=batch_rows), None, metrics)  # type: ignore[arg-type]
    write: Future[bool] = Future()
    sink._pending.append((object(), write))  # type: ignore[arg-type]
    sink._pending_records = 2 * batch_rows  # two batches' worth wait for the writer
    return sink, write


def test_a_writer_behind_is_waited_for_without_pausing() -> None:
    # pausing makes librdkafka drop what it prefetched: a short wait for the write costs less
    sink, _ = _behind_sink()
    consumer = RecordingConsumer()
    started = time.monotonic()
    assert sink._backpressure(consumer, 0.05) is True  # type: ignore[arg-type]
    assert time.monotonic() - started >= 0.04  # it waited on the write (which did not finish)
    assert consumer.calls == []


def test_a_writer_behind_for_long_pauses_and_reads_on_then_resumes(monkeypatch: pytest.MonkeyPatch) -> None:
    # ClickHouse down: the consumer must keep polling (paused) to stay in its group
    monkeypatch.setattr(sink_module, "_PAUSE_AFTER_S", 0.05)
    sink, write = _behind_sink()
    consumer = RecordingConsumer()
    assert sink._backpressure(consumer, 0.06) is True  # type: ignore[arg-type]
    assert sink._backpressure(consumer, 0.06) is False  # type: ignore[arg-type]
    assert consumer.calls == ["pause"]
    write.set_result(True)
    sink._pending.clear()
    sink._pending_records = 0  # the writer caught up
    assert sink._backpressure(consumer, 0.06) is False  # type: ignore[arg-type]
    assert consumer.calls == ["pause", "resume"]
