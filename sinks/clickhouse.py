"""The ClickHouse sink: output topics + decisions → one table each, exactly once in effect.

``lotflow sink`` runs :func:`run_sink`. The parts, one concept a module:

- ``sinks/client.py``: DSN → the process's ClickHouse client (embedded chdb or a server);
  row counts.
- ``sinks/migrations.py``, ``sinks/rows.py``: the tables, and records → rows.
- ``sinks/framing.py``: Confluent-framed Avro values as Avro containers ClickHouse decodes.
- ``sinks/batches.py``: per-partition batches and their deduplication tokens.
- ``sinks/writer.py`` + ``sinks/retry.py``: insert a batch, retried with back-off.
- ``sinks/offsets.py``: commit after insert (the consumer's position), lag, caught up.
- ``sinks/sink.py``: the consumer loop that ties them together.

A value that does not decode (or map) goes to ``sink_rejects`` with its raw bytes and the
error, in the same flush and under the same commit rule: never silently dropped.

This module re-exports the sink's public names, so ``lotflow.sinks.clickhouse`` stays the
one import for the CLI, the demo and the tests.
"""

from __future__ import annotations

import logging
import signal
import threading

from prometheus_client import CollectorRegistry

from lotflow.metrics import SinkMetrics, serve
from lotflow.settings import Settings
from lotflow.sinks.client import connect, table_counts
from lotflow.sinks.framing import avro_container, container_block, container_header
from lotflow.sinks.migrations import migrate
from lotflow.sinks.sink import ClickHouseSink, SinkProgress

__all__ = [
    "ClickHouseSink",
    "SinkProgress",
    "avro_container",
    "connect",
    "container_block",
    "container_header",
    "run_sink",
    "table_counts",
]

log = logging.getLogger(__name__)


def run_sink(settings: Settings, stop: threading.Event | None = None) -> None:
    """``lotflow sink``: migrate, serve /metrics, and sink until SIGTERM/SIGINT (or ``stop``)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: stop.set())
    registry = CollectorRegistry()
    metrics = SinkMetrics.create(registry)
    serve(registry, settings.sink_metrics_port, settings.sink_metrics_host)
    client = connect(settings)
    applied = migrate(client, settings.clickhouse_database)
    if applied:
        log.info("sink: applied ClickHouse migrations %s", applied)
    ClickHouseSink(settings, client, metrics).run(stop)
