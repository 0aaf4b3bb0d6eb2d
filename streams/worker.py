"""The Faust worker: app, tables, the receiving agent, the document-wait timer, /metrics.

The agent is thin: it takes batches of raw events, hands them to ``ReceivingProcessor`` and
flushes outputs and state changes before asking for the next batch, so Faust commits an
offset only after what it caused is on the broker.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faust
from prometheus_client import CollectorRegistry, generate_latest

from lotflow.metrics import WorkerMetrics
from lotflow.schemas.serde import DecodeError, schema_source
from lotflow.settings import Settings
from lotflow.streams import topics
from lotflow.streams.producer import OutputProducer
from lotflow.streams.receiving import InputEvent, ReceivingProcessor
from lotflow.streams.reference import SpecCache
from lotflow.streams.state import ChangelogTable

__all__ = ["create_worker"]

log = logging.getLogger(__name__)
_QUIET = ("faust", "mode", "aiokafka", "kafka", "aiohttp", "venusian")


def _brokers(bootstrap: str) -> list[str]:
    return [f"kafka://{host.strip()}" for host in bootstrap.split(",") if host.strip()]


def create_worker(settings: Settings, registry: CollectorRegistry | None = None) -> faust.App:
    registry = registry or CollectorRegistry()
    metrics = WorkerMetrics.create(registry)
    source = schema_source(settings.schema_registry_url)
    datadir = (settings.var_dir / "faust" / settings.app_id).resolve()
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=_brokers(settings.bootstrap_servers),
        store="memory://",
        # Standbys would replay other workers' partitions into this worker's store, and the
        # document-wait sweep would then decide receipts this worker does not own.
        table_standby_replicas=0,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        broker_max_poll_records=settings.max_poll_records,
        consumer_auto_offset_reset="earliest",
        web_port=settings.worker_web_port,
        web_host=settings.worker_web_host,
        web_enabled=True,
        datadir=str(datadir),
    )
    # Raw bytes: decoding is ours, so a bad record becomes a dead letter instead of a Faust error.
    inputs = app.topic(*(spec.full_name(settings) for spec in (topics.PURCHASE_ORDERS, topics.RECEIPTS,
                                                              topics.CERTIFICATES)),
                       partitions=settings.partitions, key_type=bytes, value_type=bytes,
                       key_serializer="raw", value_serializer="raw")
    po_table = ChangelogTable(app.Table("receiving-po", default=None, partitions=settings.partitions))
    vendor_table = ChangelogTable(app.Table("receiving-vendor", default=None, partitions=settings.partitions))
    producer = OutputProducer(settings, source)

    def spec_dead_letter(msg: Any, exc: DecodeError | KeyError) -> None:
        event = InputEvent(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), 0)
        processor.dead_letter(event, getattr(exc, "error_class", "SCHEMA"), str(exc), int(time.time() * 1000))

    specs = SpecCache(settings, source, on_bad_record=spec_dead_letter)
    last_offsets: dict[tuple[str, int], int] = {}
    stream_time: dict[tuple[str, int], int] = {}
    document_topics = [spec.full_name(settings) for spec in (topics.PURCHASE_ORDERS, topics.CERTIFICATES)]

    def documents_settled(partition: int, until_ms: int) -> bool:
        """Have the PO and CoA partitions been read past ``until_ms``, or up to their end?"""
        for topic in document_topics:
            if stream_time.get((topic, partition), 0) >= until_ms:
                continue
            tp = faust.types.TP(topic, partition)
            highwater = app.consumer.highwater(tp)
            if highwater is None:
                return False
            if (topic, partition) in last_offsets:
                next_offset = last_offsets[(topic, partition)] + 1
            else:  # nothing read since start: Faust resumed from the committed offset
                committed: Any = app.consumer._committed_offset  # type: ignore[attr-defined]
                next_offset = committed.get(tp) or 0
            if next_offset < highwater:
                return False
        return True

    processor = ReceivingProcessor(settings, source, po_table, vendor_table, specs.specs, producer, metrics,
                                   documents_settled=documents_settled)
    batch_timer = metrics.batch_duration.labels("receiving")

    def flush() -> None:
        # Outputs first, state second: a state that says "decided" implies the decision is on
        # the broker, so a receipt re-delivered after a crash is skipped, never decided twice.
        producer.flush()
        if po_table.flush_to(producer) + vendor_table.flush_to(producer):
            producer.flush()
        processor.publish_metrics()

    @app.task
    async def quiet_loggers() -> None:
        # The Faust worker resets log levels on start; per-event debug records cost more than the work.
        for name in _QUIET:
            logging.getLogger(name).setLevel(logging.WARNING)
        specs.load()

    @app.agent(inputs)
    async def receiving(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_size, within=settings.batch_within_s):
            started = time.perf_counter()
            specs.poll()
            handle = processor.handle
            for event in events:
                m = event.message
                timestamp_ms = int(m.timestamp * 1000)
                handle(InputEvent(m.topic, m.partition, m.offset, m.key, m.value, timestamp_ms))
                tp = (m.topic, m.partition)
                last_offsets[tp] = m.offset
                if timestamp_ms > stream_time.get(tp, 0):
                    stream_time[tp] = timestamp_ms
            flush()
            batch_timer.observe(time.perf_counter() - started)

    @app.timer(settings.sweep_interval_s)
    async def document_wait() -> None:
        recovery: Any = app.tables.recovery  # type: ignore[attr-defined]
        if app.rebalancing or not recovery.completed.is_set():
            return  # decide only on fully recovered state
        specs.poll()
        if processor.sweep():
            flush()
        for (topic, partition), offset in list(last_offsets.items()):
            highwater = app.consumer.highwater(faust.types.TP(topic, partition))
            if highwater is not None:
                metrics.consumer_lag.labels(topic, str(partition)).set(max(0, highwater - offset - 1))

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        # aiohttp rejects a charset inside content_type; Prometheus text format 0.0.4 is UTF-8 anyway.
        return web.bytes(generate_latest(registry), content_type="text/plain; version=0.0.4")

    app.lotflow_processor = processor  # type: ignore[attr-defined]
    return app
