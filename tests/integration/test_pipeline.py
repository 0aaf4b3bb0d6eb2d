"""The receiving pipeline end to end: real broker, real worker processes, real ClickHouse engine."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from lotflow.demo import OutputReader
from lotflow.metrics import SinkMetrics
from lotflow.reconcile import score
from lotflow.settings import Settings
from lotflow.simulator.faults import parse_fault_spec
from lotflow.simulator.publish import publish
from lotflow.sinks.clickhouse import ClickHouseSink, connect, table_counts
from lotflow.sinks.migrations import migrate
from lotflow.streams import topics
from tests.unit.receiving_fixtures import coa, po, receipt

from .pipeline import PROJECT_ROOT, Inputs, WorkerProcess, free_port, spec_record, wait_for

TopicSetFactory = Callable[..., Settings]
LOGS = PROJECT_ROOT / "var" / "test-logs"


@pytest.fixture
def pipeline(topic_set: TopicSetFactory, request: pytest.FixtureRequest) -> Iterator[tuple[Settings, Path]]:
    settings = topic_set(document_wait_s=3.0, worker_web_port=free_port())
    log = LOGS / f"{request.node.name}-{settings.app_id}.log"
    yield settings, log


def start_worker(settings: Settings, log: Path, workers: list[WorkerProcess]) -> WorkerProcess:
    worker = WorkerProcess(settings, log).start()
    workers.append(worker)
    return worker


def test_po_before_or_after_the_receipt_gives_the_same_decision(pipeline: tuple[Settings, Path],
                                                                workers: list[WorkerProcess]) -> None:
    settings, log = pipeline
    inputs = Inputs(settings)
    inputs.send(topics.MATERIAL_SPECS, "MAT-1", spec_record("MAT-1"))
    inputs.send(topics.PURCHASE_ORDERS, "PO-A", po("PO-A"))          # PO first
    inputs.send(topics.CERTIFICATES, "PO-A", coa("PO-A", lot="LA"))
    inputs.send(topics.RECEIPTS, "PO-A", receipt("R-A", "PO-A", lot="LA"))
    inputs.send(topics.RECEIPTS, "PO-B", receipt("R-B", "PO-B", lot="LB"))  # receipt first
    inputs.send(topics.CERTIFICATES, "PO-B", coa("PO-B", lot="LB"))
    inputs.flush()
    start_worker(settings, log, workers)
    inputs.send(topics.PURCHASE_ORDERS, "PO-B", po("PO-B"))
    inputs.flush()
    reader = OutputReader(settings)
    wait_for(reader, lambda: reader.counts["VERIFIED"] + reader.counts["EXCEPTION"] >= 2, 60, "two decisions")
    outcomes = {d.ref[2] for d in reader.decisions}
    assert len(outcomes) >= 1
    assert [(d.outcome, d.reasons) for d in reader.decisions] == [("VERIFIED", ()), ("VERIFIED", ())]
    reader.close()


def test_bad_bytes_go_to_dead_letters_and_the_worker_goes_on(pipeline: tuple[Settings, Path],
                                                            workers: list[WorkerProcess]) -> None:
    settings, log = pipeline
    inputs = Inputs(settings)
    inputs.send(topics.MATERIAL_SPECS, "MAT-1", spec_record("MAT-1"))
    inputs.send(topics.RECEIPTS, "PO-C", b"\xde\xad\xbe\xef not avro")
    inputs.send(topics.RECEIPTS, "PO-C", receipt("R-bad", "PO-C", quantity=-5.0))
    inputs.send(topics.PURCHASE_ORDERS, "PO-C", po("PO-C"))
    inputs.send(topics.CERTIFICATES, "PO-C", coa("PO-C"))
    inputs.send(topics.RECEIPTS, "PO-C", receipt("R-C", "PO-C"))
    inputs.flush()
    worker = start_worker(settings, log, workers)
    reader = OutputReader(settings)
    wait_for(reader, lambda: reader.counts["DEAD_LETTER"] == 2 and reader.counts["VERIFIED"] == 1, 60,
             "two dead letters and one verified")
    assert worker.proc is not None and worker.proc.poll() is None
    reader.close()


def test_missing_document_timer_fires_after_a_restart(pipeline: tuple[Settings, Path],
                                                      workers: list[WorkerProcess]) -> None:
    settings, log = pipeline
    settings = settings.model_copy(update={"document_wait_s": 8.0})
    inputs = Inputs(settings)
    inputs.send(topics.MATERIAL_SPECS, "MAT-1", spec_record("MAT-1"))
    inputs.flush()
    worker = start_worker(settings, log, workers)
    inputs.send(topics.RECEIPTS, "PO-NEVER", receipt("R-N", "PO-NEVER"))
    inputs.flush()
    deadline = time.monotonic() + 30
    while worker.records_in() < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # one more batch flush: the wait is in the changelog
    worker.kill()  # before the deadline: no decision yet
    reader = OutputReader(settings)
    reader.poll(1.0)
    assert reader.decided_receipts() == 0
    time.sleep(8.0)
    start_worker(settings, log, workers)
    wait_for(reader, lambda: reader.decided_receipts() == 1, 60, "the expired wait to decide")
    [decision] = reader.decisions
    assert decision.outcome == "EXCEPTION" and "UNKNOWN_PO" in decision.reasons
    reader.close()


def test_worker_killed_mid_stream_loses_nothing_and_clickhouse_has_no_duplicates(
        pipeline: tuple[Settings, Path], workers: list[WorkerProcess], clickhouse_dsn: SecretStr) -> None:
    settings, log = pipeline
    database = f"pipe_{uuid.uuid4().hex[:10]}"
    settings = settings.model_copy(update={"clickhouse_database": database, "sink_batch_s": 0.2,
                                           "clickhouse_dsn": clickhouse_dsn})
    count = 3000
    report = publish(settings, 21, count, parse_fault_spec("default"), 0.0, None)
    assert report.failed == 0
    worker = start_worker(settings, log, workers)
    deadline = time.monotonic() + 60
    while worker.records_in() < 1500 and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.kill()
    start_worker(settings, log, workers)

    reader = OutputReader(settings)
    wait_for(reader, lambda: reader.decided_receipts() >= count and len(reader.truths) >= count, 120,
             "every receipt decided after the restart")
    board = score(reader.truths, reader.decisions)
    assert board.undecided == 0 and board.records_in == count
    assert board.verified + board.exceptions + board.dead_letters == count
    reader.close()

    client = connect(settings)
    migrate(client, database)
    sink = ClickHouseSink(settings, client, SinkMetrics.create(CollectorRegistry()))
    stop = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not sink.caught_up() and time.monotonic() < deadline:
        time.sleep(0.2)
    caught_up = sink.caught_up()
    stop.set()
    thread.join(60)
    assert caught_up
    rows = table_counts(client, database)
    receipts_topic = topics.RECEIPTS.full_name(settings)
    dead = client.query(f"SELECT count() FROM {database}.dead_letters FINAL WHERE source_topic = %(t)s",
                        parameters={"t": receipts_topic}).result_rows[0][0]
    assert rows["verified"] + rows["exceptions"] + dead == count  # re-processed inputs replaced, not added
    assert rows["audit"] == rows["verified"] + rows["exceptions"]
    client.command(f"DROP DATABASE IF EXISTS {database} SYNC")
