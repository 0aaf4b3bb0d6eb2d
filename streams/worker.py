"""The Faust worker: app, tables, the receiving agent, the document-wait timer, /metrics, /healthz.

The agent is thin: it takes batches of raw events, hands them to ``ReceivingProcessor`` and
commits the batch's outputs, state changes and input marks in one Kafka transaction; the
broker commits it while the agent handles the next batch (whose outputs wait in memory until
then: one transaction at a time), and a batch's events are acked, so Faust commits their
offsets, only after their transaction committed. (Waiting for each commit left the worker
idle ~15 % of the time under a backlog: ~130 ms per transaction while the broker, on the same
cores, wrote it.) The consumer reads
``read_committed`` (tables recover only committed state). Anything that escapes the
per-record handling leaves memory ahead of the changelog, so the process exits and restarts
from committed state instead of going on.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
import socket
import threading
import time
from typing import Any

import faust
from prometheus_client import CollectorRegistry, generate_latest

from lotflow import compiled
from lotflow.kafka_clients import faust_broker_credentials
from lotflow.metrics import WorkerMetrics
from lotflow.schemas.serde import schema_source
from lotflow.settings import Settings
from lotflow.streams import topics, transport
from lotflow.streams.batching import take_batches
from lotflow.streams.faults import crash_injector
from lotflow.streams.health import Health
from lotflow.streams.history import LazyHistory, SharedHistory
from lotflow.streams.learning import ModelFeed, publish_quality
from lotflow.streams.producer import Message, TransactionalOutput
from lotflow.streams.receiving import ALL_READ, NODE, InputEvent, ReceivingProcessor, learner_config
from lotflow.streams.reference import SpecCache
from lotflow.streams.state import ChangelogTable

__all__ = ["create_worker", "instance_id"]

log = logging.getLogger(__name__)
_QUIET = ("faust", "mode", "aiokafka", "kafka", "aiohttp", "venusian")
EXIT_UNRECOVERABLE = 70


def _brokers(bootstrap: str) -> list[str]:
    return [f"{transport.SCHEME}://{host.strip()}" for host in bootstrap.split(",") if host.strip()]


def instance_id(settings: Settings) -> str:
    """Stable per worker: static group membership and the transactional id both use it."""
    return settings.worker_instance_id or f"{socket.gethostname()}-{settings.worker_web_port}"


TRIM_INTERVAL_S = 30.0
MEMBERSHIP_CHECK_S = 5.0
SWEEP_PARTS_PER_TICK = 50  # at most this many sweep transactions per timer tick
LEARN_INTERVAL_S = 0.5


def _libc_malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_malloc_trim = _libc_malloc_trim()


def trim_allocator() -> None:
    """Hand the C allocator's free pages back to the OS.

    glibc keeps freed chunks inside its heaps and returns only the top of a heap: after 100k
    receipts ~60-80 MB of a ~160 MB heap were free yet resident, and the worker's RSS crept
    up ~10 % over the second half of a long run (measured with mallinfo2). ``malloc_trim(0)``
    releases the free pages in the middle too; it takes a few milliseconds, every 30 s.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


def tune_garbage_collector() -> None:
    """Fewer, cheaper cyclic collections on the hot path.

    With CPython's defaults a full collection walks every object (Faust, modules, the state
    store) and ran ~8 times per 65k events for ~140 ms each (measured): an eighth of the
    processor's time and a latency spike each. Objects alive after start-up are frozen (never
    scanned again), the young generation is collected every 100k allocations instead of 700,
    and the middle one every 50 of those (measured on a 65k-message backlog: collector time
    1.5 s -> 0.9 s, throughput +8 %). State values are JSON documents without reference cycles,
    so they are freed by reference counting; cycles elsewhere (asyncio, exceptions) are still
    collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


def create_worker(settings: Settings, registry: CollectorRegistry | None = None, *,
                  membership_watchdog_thread: bool = False) -> faust.App:
    """The worker app. ``membership_watchdog_thread``: the running worker exits when it holds no input
    partition for ``stall_timeout_s`` (started before the app, as a join can hang its start-up)."""
    registry = registry or CollectorRegistry()
    metrics = WorkerMetrics.create(registry)
    metrics.compiled_core.set(1 if compiled.status()["compiled"] else 0)
    source = schema_source(settings.schema_registry_url)
    datadir = (settings.var_dir / "faust" / settings.app_id).resolve()
    datadir.parent.mkdir(parents=True, exist_ok=True)
    transport.register(settings.fault_seek_delay_s)
    member = instance_id(settings)
    app = faust.App(
        settings.app_id,
        broker=_brokers(settings.bootstrap_servers),
        broker_credentials=faust_broker_credentials(settings),
        store="memory://",
        TableManager=f"{transport.__name__}:MarkerAwareTableManager",
        # Standbys would replay other workers' partitions into this worker's store, and the
        # document-wait sweep would then decide receipts this worker does not own.
        table_standby_replicas=0,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        broker_max_poll_records=settings.max_poll_records,
        # Static membership: a restarted worker rejoins with its id and gets its partitions back
        # without waiting for the group to notice it left.
        consumer_group_instance_id=member,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(0.5, settings.session_timeout_s / 5),
        consumer_auto_offset_reset="earliest",
        web_port=settings.worker_web_port,
        web_host=settings.worker_web_host,
        web_enabled=True,
        datadir=str(datadir),
    )
    # Raw bytes: decoding is ours, so a bad record becomes a dead letter instead of a Faust error.
    inputs = app.topic(*(spec.full_name(settings) for spec in (topics.PURCHASE_ORDERS, topics.RECEIPTS,
                                                              topics.CERTIFICATES)),
                       partitions=settings.partitions, schema=transport.RawSchema())
    # The PO state holds its values as their changelog bytes (value_type=bytes: recovery stores
    # them as read): a third of the memory of decoded values (streams/state.py).
    faust_po_table = app.Table("receiving-po", default=None, partitions=settings.partitions, value_type=bytes)
    po_table = ChangelogTable(faust_po_table, encoded=True)
    vendor_table = ChangelogTable(app.Table("receiving-vendor", default=None, partitions=settings.partitions))
    # Created on start, when Faust has declared the changelog topic it reads.
    shared_history = LazyHistory()
    output: TransactionalOutput | None = None  # created on start: init_transactions fences a previous instance
    health = Health(settings.stall_timeout_s)

    def spec_dead_letter(msg: Any, exc: Exception) -> None:
        event = InputEvent(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), 0)
        processor.dead_letter(event, getattr(exc, "error_class", "INVALID_VALUE"), str(exc),
                              int(time.time() * 1000))

    specs = SpecCache(settings, source, on_bad_record=spec_dead_letter)
    last_offsets: dict[tuple[str, int], int] = {}
    stream_time: dict[tuple[str, int], int] = {}
    input_topics = [spec.full_name(settings) for spec in (topics.PURCHASE_ORDERS, topics.RECEIPTS,
                                                         topics.CERTIFICATES)]
    document_topics = [input_topics[0], input_topics[2]]
    decisions_topic = topics.DECISIONS.full_name(settings)
    input_topics.append(decisions_topic)  # watched for progress like the others

    def next_offset(tp: faust.types.TP) -> int:
        if (tp.topic, tp.partition) in last_offsets:
            return last_offsets[(tp.topic, tp.partition)] + 1
        committed: Any = app.consumer._committed_offset  # type: ignore[attr-defined]
        return int(committed.get(tp) or 0)  # nothing read since start: Faust resumed from here

    def documents_read_until(partition: int) -> int:
        """Publish time up to which the PO and CoA partitions were read (everything: read to the end)."""
        until = ALL_READ
        for topic in document_topics:
            tp = faust.types.TP(topic, partition)
            highwater = app.consumer.highwater(tp)
            if highwater is None or next_offset(tp) < highwater:
                until = min(until, stream_time.get((topic, partition), 0))
        return until

    def emit(message: Message) -> None:
        # Into the open transaction as soon as its record is handled (the broker takes it while the
        # rest of the batch is computed); with the next commit while the previous batch's
        # transaction is still committing, or before the start task created the producer.
        if output is None or committing is not None:
            processor.outbox.append(message)
        else:
            output.send(message)

    processor = ReceivingProcessor(settings, source, po_table, vendor_table, specs.specs, metrics,
                                   documents_read_until=documents_read_until, remote_history=shared_history, emit=emit)
    feed = ModelFeed(settings, source, NODE, learner_config(settings))
    batch_timer = metrics.batch_duration.labels("receiving")
    transaction_timer = metrics.transaction_duration.labels("receiving")
    lock = asyncio.Lock()  # the agent's batch and the timer's sweep never interleave in one transaction

    committing: asyncio.Future[None] | None = None  # the last batch's transaction, while it commits

    async def settle() -> None:
        """Wait for the transaction in flight, if any (one at a time); its failure is raised here."""
        nonlocal committing
        if committing is not None:
            try:
                # shielded: a cancelled waiter (shutdown) must not cancel the commit itself, whose
                # executor thread may be committing already
                await asyncio.shield(committing)
            finally:
                if committing is not None and committing.done():
                    committing = None

    async def commit(*, overlap: bool = False) -> None:
        """Everything handled since the last commit, in one transaction, after the one in flight.
        ``overlap``: start it and return (the agent handles its next batch while the broker
        commits this one; the next ``commit`` or ``settle`` waits for it)."""
        nonlocal committing
        assert output is not None
        await settle()
        messages = processor.end_batch()
        if messages or output.in_transaction or po_table.pending_changes() or vendor_table.pending_changes():
            for m in messages:
                output.send(m)
            po_table.flush_to(output)
            vendor_table.flush_to(output)
            if overlap:
                committing = asyncio.ensure_future(timed_commit(output))
            else:
                await timed_commit(output)
        processor.publish_metrics()

    async def timed_commit(out: TransactionalOutput) -> None:
        await out.commit()
        # the broker's flush and commit as timed in the executor thread: in the background, the
        # task itself resumes only when the next batch's handling yields
        transaction_timer.observe(out.last_commit_s)

    def unrecoverable(exc: BaseException) -> None:
        # Memory is now ahead of what was committed: restart from the changelog, never go on.
        log.critical("receiving worker stops: %r; restarting from committed state", exc, exc_info=exc)
        os._exit(EXIT_UNRECOVERABLE)

    @app.task
    async def start() -> None:
        nonlocal output
        # The Faust worker resets log levels on start; per-event debug records cost more than the work.
        for name in _QUIET:
            logging.getLogger(name).setLevel(logging.WARNING)
        # Faust's Monitor sensor keeps its own per-message statistics (four callbacks per
        # message); lotflow's metrics are its own Prometheus ones, so the monitor stops listening.
        app.sensors.remove(app.monitor)
        specs.load()
        # before any record is scored: the newest checkpoint plus every label after it
        processor.node.learner = feed.restore()
        publish_quality(processor.node.learner, metrics, NODE)
        shared_history.attach(SharedHistory(settings, vendor_table.changelog_topic()))
        output = TransactionalOutput(settings, f"{settings.app_id}-{member}",
                                     crash_at=crash_injector(settings.fault_inject))
        tune_garbage_collector()

    async def handle_batches(stream: Any) -> None:
        """The body of both agents: a batch is handled under the lock and committed in one
        transaction, which commits while the next batch is handled; a batch's events are acked
        (Faust then commits their offsets) once their transaction committed."""
        handled: list[Any] = []  # this agent's last batch, its transaction maybe still committing

        async def ack(events: list[Any]) -> None:
            for event in events:
                await stream.ack(event)

        async def ack_when_idle() -> None:
            # no more records came: the last batch's events are acked once its transaction committed
            if not handled:
                return
            try:
                async with lock:
                    await settle()
                    await ack(handled)
                    handled.clear()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                unrecoverable(exc)

        async for events in take_batches(stream, settings.batch_size, settings.batch_within_s, acks=False,
                                         on_idle=ack_when_idle):
            try:
                async with lock:
                    while output is None:  # the start task has not finished yet
                        await asyncio.sleep(0.05)
                    started = time.perf_counter()
                    if specs.poll():
                        processor.recheck_waiting()
                    metrics.shared_history_records.inc(shared_history.poll())
                    feed.poll(processor.node.learner)
                    handle = processor.handle
                    for event in events:
                        m = event.message
                        timestamp_ms = int(m.timestamp * 1000)
                        handle(InputEvent(m.topic, m.partition, m.offset, m.key, m.value, timestamp_ms))
                        tp = (m.topic, m.partition)
                        last_offsets[tp] = m.offset
                        if timestamp_ms > stream_time.get(tp, 0):
                            stream_time[tp] = timestamp_ms
                    processor.expire(2 * len(events))  # keys are created at about one per event
                    await commit(overlap=True)
                    # the transactions before this batch's have committed: the last batch's among them
                    await ack(handled)
                    handled[:] = events
                    health.batch_done()
                    batch_timer.observe(time.perf_counter() - started)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                unrecoverable(exc)

    @app.agent(inputs)
    async def receiving(stream: Any) -> None:
        await handle_batches(stream)

    # People's decisions on the exceptions: keyed by PO like the inputs, so co-partitioned with
    # them; applied under the same lock, in the same kind of transaction, with their own marks.
    @app.agent(app.topic(decisions_topic, partitions=settings.partitions, schema=transport.RawSchema()))
    async def decisions(stream: Any) -> None:
        await handle_batches(stream)

    @faust_po_table.on_recover
    async def rebuild_indexes() -> None:
        # Called after every recovery (each rebalance), once the store holds exactly the
        # partitions this worker owns and before streams resume.
        processor.rebuild_indexes()

    def owns_recovered_state() -> bool:
        recovery: Any = app.tables.recovery  # type: ignore[attr-defined]
        return not app.rebalancing and recovery.completed.is_set() and output is not None

    @app.timer(settings.sweep_interval_s)
    async def document_wait() -> None:
        if not owns_recovered_state():
            return  # decide only on fully recovered state
        try:
            # A transaction per batch-sized part; the agent may run in between. Bounded per tick
            # (keys put back by the expiry come due again), and it stops when a rebalance starts
            # while it waited for the lock: the partitions may be another worker's by then.
            for _ in range(SWEEP_PARTS_PER_TICK):
                async with lock:
                    if not owns_recovered_state():
                        break
                    if specs.poll():
                        processor.recheck_waiting()
                    metrics.shared_history_records.inc(shared_history.poll())
                    processor.sweep(limit=settings.batch_size)
                    await commit()
                if not processor.more_due:
                    break
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            unrecoverable(exc)

    @app.timer(MEMBERSHIP_CHECK_S)
    async def progress() -> None:
        # Its own timer, not the sweep's, which may wait for the lock behind a long batch.
        assigned = [tp for tp in app.consumer.assignment() if tp.topic in input_topics]
        health.observe_assignment(len(assigned))
        committed_offsets: Any = app.consumer._committed_offset  # type: ignore[attr-defined]
        lag = handled = committed = 0
        for tp in assigned:
            position = next_offset(tp)
            done = int(committed_offsets.get(tp) or 0)
            handled += max(position, done)
            committed += done
            highwater = app.consumer.highwater(tp)
            if highwater is not None:
                behind = max(0, highwater - position)
                lag += behind
                metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(behind)
        if owns_recovered_state():  # input waits while the tables recover: not a stall
            health.observe_lag(lag)
        health.observe_offsets(handled, committed)

    def membership_watchdog() -> None:
        # A thread, not a timer: a worker stuck outside its group may never run its timers.
        while True:
            time.sleep(MEMBERSHIP_CHECK_S)
            if health.unassigned_for() > settings.stall_timeout_s:
                # Outside the group (a failed join that aiokafka does not retry): a restart rejoins.
                log.critical("receiving worker stops: no input partition assigned for %.0fs; restarting",
                             health.unassigned_for())
                os._exit(EXIT_UNRECOVERABLE)


    @app.timer(TRIM_INTERVAL_S)
    async def release_memory() -> None:
        trim_allocator()

    @app.timer(LEARN_INTERVAL_S)
    async def learn() -> None:
        # Labels also arrive while no input does; applied between batches, never inside one.
        if output is None:
            return
        async with lock:
            if feed.poll(processor.node.learner):
                publish_quality(processor.node.learner, metrics, NODE)

    @app.page("/model")
    async def model_page(web: Any, request: Any) -> Any:
        learner = processor.node.learner
        quality = learner.quality()
        restored = feed.restored_from
        return web.json({
            "node": NODE, "version": learner.version, "labels": learner.n_labels,
            "labels_offset": learner.labels_offset, "fingerprint": learner.fingerprint(),
            "restored_from": None if restored is None else {"labels": restored.labels, "source": restored.source,
                                                            "fingerprint": restored.fingerprint},
            "ece_all_labels": quality.ece_all, "ece_spot_checks": quality.ece_spot,
            "spot_checks": quality.spot_checks, "spot_precision": quality.spot_precision,
            "spot_interval": list(quality.spot_interval), "tightened_vendors": sorted(learner.tightened),
            "drift_events": learner.drift_events[-20:]})

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        # aiohttp rejects a charset inside content_type; Prometheus text format 0.0.4 is UTF-8 anyway.
        return web.bytes(generate_latest(registry), content_type="text/plain; version=0.0.4")

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        ok, detail = health.check(output.failing_since if output is not None else None)
        return web.json(detail, status=200 if ok else 503)

    if membership_watchdog_thread:
        threading.Thread(target=membership_watchdog, name="lotflow-membership", daemon=True).start()
    app.lotflow_processor = processor  # type: ignore[attr-defined]
    return app

