"""``lotflow demo``: the whole pipeline on a local broker and the embedded ClickHouse engine.

Starts what is not running (broker), creates a fresh topic set and database for this run,
starts the worker and the sink as their own processes, publishes simulated traffic, waits
until every receipt is decided and every output is in ClickHouse, prints a reconciled summary
with accuracy against ground truth, writes it to ``var/demo-summary.json`` and stops what it
started, also on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from lotflow import admin, localkafka
from lotflow.childproc import child_env, metric_value, scrape_metrics
from lotflow.kafka_clients import client_config
from lotflow.reconcile import WAIT_REASONS, Decision, decision_from_output, score
from lotflow.schemas.serde import AvroCodec, schema_source
from lotflow.settings import Settings
from lotflow.streams import topics

__all__ = ["run_demo"]

DEMO_PREFIX = "demo"
DEMO_WAIT_S = 5.0
DEMO_RATE = 0.0  # receipts/s offered by the simulator; 0 publishes as fast as it can


def _spawn(name: str, settings: Settings, log_dir: Path) -> subprocess.Popen[bytes]:
    log = (log_dir / f"{name}.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "lotflow.cli", name], env=child_env(settings),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{log.stem} exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s; see {log}")


class OutputReader:
    """Reads decisions, dead letters, ground truth and input timestamps from Kafka as they arrive.

    Reads ``read_committed``: records of aborted worker transactions are never seen. From the
    start of every topic (a fresh group), or from ``start`` (``(topic, partition) -> offset``)
    where given: then only the topics in ``start`` are read.
    """

    def __init__(self, settings: Settings, start: Mapping[tuple[str, int], int] | None = None,
                 consume_timeout_s: float = 0.2) -> None:
        self.settings = settings
        # consume() returns when it holds 5,000 records or after this: a latency measurement
        # needs it short, since what arrives is stamped when consume() returns (late by up to
        # this, and by the decoding of the records before it: the figure errs on the high side)
        self.consume_timeout_s = consume_timeout_s
        source = schema_source(settings.schema_registry_url)
        self.kinds = {
            topics.VERIFIED.full_name(settings): ("VERIFIED", topics.VERIFIED),
            topics.EXCEPTIONS.full_name(settings): ("EXCEPTION", topics.EXCEPTIONS),
            topics.DEAD_LETTERS.full_name(settings): ("DEAD_LETTER", topics.DEAD_LETTERS),
            topics.GROUND_TRUTH.full_name(settings): ("TRUTH", topics.GROUND_TRUTH),
        }
        self.codecs = {name: AvroCodec(source, f"{name}-value", spec.schema) for name, (_, spec) in self.kinds.items()}
        self.inputs = {spec.full_name(settings) for spec in (topics.RECEIPTS, topics.PURCHASE_ORDERS,
                                                             topics.CERTIFICATES)}
        self.decisions: list[Decision] = []
        self.ids: set[str] = set()
        self.truths: list[dict[str, Any]] = []
        self.input_ts: dict[tuple[str, int, int], int] = {}
        # receipt -> wall-clock ms when this reader received its first decision (read_committed:
        # once the worker's transaction had committed)
        self.visible_ms: dict[tuple[str, int, int], int] = {}
        self.counts: Counter[str] = Counter()
        self.consumer = Consumer(client_config(settings, **{
            "group.id": f"{settings.app_id}-demo-reader", "auto.offset.reset": "earliest",
            "enable.auto.commit": False, "isolation.level": "read_committed"}))
        if start is None:
            self.consumer.subscribe([*self.kinds, *self.inputs])
        else:
            self.consumer.assign([TopicPartition(t, p, o) for (t, p), o in sorted(start.items())])

    def poll(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            messages = self.consumer.consume(5000, timeout=self.consume_timeout_s)
            received_ms = int(time.time() * 1000)
            for msg in messages:
                if msg.error():
                    continue
                topic = str(msg.topic())  # a message without an error has its topic
                if topic in self.inputs:
                    ref = (str(topic), int(msg.partition() or 0), int(msg.offset() or 0))
                    self.input_ts[ref] = msg.timestamp()[1]
                    continue
                kind, _ = self.kinds[topic]
                record = self.codecs[topic].decode(msg.value())
                if kind == "TRUTH":
                    self.truths.append(record)
                    continue
                self.counts[kind] += 1
                self.ids.add(record["id"])
                if kind != "DEAD_LETTER" or record["source_topic"] == topics.RECEIPTS.full_name(self.settings):
                    decision = decision_from_output(kind, record)
                    if decision is not None:  # a spot check is not the receipt's decision
                        self.decisions.append(decision)
                        self.visible_ms.setdefault(decision.ref, received_ms)

    def decided_receipts(self) -> int:
        return len({d.ref for d in self.decisions})

    def close(self) -> None:
        self.consumer.close()


def _latencies(reader: OutputReader, visible: bool = False) -> list[float]:
    """Decision time minus the broker time of the last input the decision waited for; ``visible``:
    the time this reader received the decision (read_committed: after its transaction committed)."""
    out = []
    for d in reader.decisions:
        if d.outcome == "DEAD_LETTER" or WAIT_REASONS.intersection(d.reasons):
            continue  # dead letters have no decision time; expired waits measure the wait
        stamps = [reader.input_ts[r] for r in d.input_refs if r in reader.input_ts]
        if stamps:
            decided = reader.visible_ms.get(d.ref) if visible else d.decision_time_ms
            if decided is not None:  # (a decision this reader did not receive itself is no sample)
                out.append(max(0.0, decided - max(stamps)))
    return out


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 1000) - 1] if len(values) > 1 \
        else values[0]


def _worker_decisions(settings: Settings) -> tuple[int, int, int]:
    """(verified, exceptions, dead letters of receipts) from the worker's Prometheus counters."""
    try:
        samples = scrape_metrics(settings.worker_web_port, settings.worker_web_host)
    except OSError:
        return (0, 0, 0)
    out = "lotflow_records_out_total"
    return (int(metric_value(samples, out, topic=topics.VERIFIED.name)),
            int(metric_value(samples, out, topic=topics.EXCEPTIONS.name)),
            int(metric_value(samples, "lotflow_dead_letters_total", topic=topics.RECEIPTS.full_name(settings))))


def _sink_caught_up(settings: Settings) -> bool:
    for spec in (*topics.OUTPUTS, topics.DECISIONS):
        topic = spec.full_name(settings)
        ends = admin.end_offsets(settings, topic)
        committed = admin.committed_offsets(settings, settings.sink_group, topic)
        if any(end > 0 and committed.get(p, 0) < end for p, end in ends.items()):
            return False
    return True


DEMO_USERS = (("rita", "receiving"), ("sam", "supplier_quality"), ("quinn", "qc_technician"),
              ("olga", "operations_analyst"), ("max", "manufacturing_engineering"), ("admin", "admin"))


def _seed_review_users(settings: Settings) -> list[tuple[str, str, str]]:
    """One demo user per role with a fresh random password each run: (user, role, password)."""
    import secrets

    from lotflow.review.users import UserStore

    users = UserStore(settings.users_file)
    seeded = []
    for name, role in DEMO_USERS:
        password = secrets.token_urlsafe(9)
        if users.get(name) is None:
            users.add(name, [role], password)
        else:
            users.set_password(name, password)
            users.enable(name)
        seeded.append((name, role, password))
    return seeded


def _serve_review(settings: Settings, worker: subprocess.Popen[bytes]) -> int:
    """The review service on the demo's data, in this process: it already holds the embedded
    engine (one process per engine), and runs the sink in a thread, while the worker keeps
    running to apply the decisions. Until Ctrl-C."""
    from lotflow.review.server import run_review

    seeded = _seed_review_users(settings)
    url = f"http://{settings.review_host}:{settings.review_port}"
    print(f"== review service: {url}/  (API: {url}/docs)")
    print("   demo users (passwords are new each run):")
    for name, role, password in seeded:
        print(f"     {name:<6} {role:<26} {password}")
    print("   Ctrl-C stops the review service and the worker", flush=True)
    run_review(settings)
    if worker.poll() is not None:
        raise RuntimeError(f"the worker exited with {worker.returncode}")
    print("\n== review service stopped; stopping the worker")
    return 0


def prepare_topics(settings: Settings, prefix: str, say: Callable[[str], None]) -> bool:
    """The local broker if none answers (True: started here), topics of earlier runs under ``prefix``
    removed, this run's created."""
    started = False
    if not localkafka.broker_answers(settings.kafka_port):
        say("starting the local Kafka broker")
        localkafka.start(settings)
        started = True
    removed = admin.delete_topics_with_prefix(settings, prefix)
    if removed:
        say(f"removed {len(removed)} topics of earlier runs")
    admin.create_topics(settings)
    return started


def run_demo(base: Settings, seed: int = 7, count: int = 20000, faults: str = "default",
             rate: float = DEMO_RATE, review: bool = False) -> int:
    from lotflow.simulator.faults import parse_fault_spec
    from lotflow.simulator.publish import publish

    mix = parse_fault_spec(faults)  # fail on a bad spec before starting anything
    run_id = time.strftime("%Y%m%d%H%M%S")
    wait = base.document_wait_s if "LOTFLOW_DOCUMENT_WAIT_S" in os.environ else DEMO_WAIT_S
    settings = base.model_copy(update={
        "topic_prefix": f"{DEMO_PREFIX}{run_id}.", "app_id": f"lotflow-demo-{run_id}",
        "sink_group": f"lotflow-demo-sink-{run_id}", "clickhouse_database": f"lotflow_demo_{run_id}",
        "document_wait_s": wait,
    })
    var = settings.var_dir
    log_dir = var / "demo-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started_broker = False
    worker = sink = None
    reader: OutputReader | None = None
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        started_broker = prepare_topics(settings, DEMO_PREFIX, lambda line: print(f"== {line}"))
        print(f"== topics ready under prefix {settings.topic_prefix!r}; document wait {wait:g}s")
        subprocess.run([sys.executable, "-m", "lotflow.cli", "db", "migrate"], env=child_env(settings), check=True)
        worker = _spawn("worker", settings, log_dir)
        sink = _spawn("sink", settings, log_dir)
        _wait_http(f"http://{settings.worker_web_host}:{settings.worker_web_port}/metrics", worker,
                   log_dir / "worker.log")
        _wait_http(f"http://127.0.0.1:{settings.sink_metrics_port}/metrics", sink, log_dir / "sink.log")
        print(f"== worker and sink running (logs in {log_dir})")
        print(f"== publishing {count} receipts (seed {seed}, faults {faults!r}, rate {rate or 'max'}/s)")
        t0 = time.monotonic()
        report = publish(settings, seed, count, mix, rate, progress=lambda line: print(f"   {line}"))
        published = time.monotonic() - t0
        print(f"== published in {published:.1f}s; waiting for every receipt to be decided")
        # Progress from the worker's own counters: reading every output here would compete with it.
        deadline = time.monotonic() + max(120.0, 3 * wait + count / 200)
        last: tuple[int, ...] = ()
        while time.monotonic() < deadline:
            counts = _worker_decisions(settings)
            if counts != last:
                print(f"   decided {sum(counts)}/{count}: verified {counts[0]}, exceptions {counts[1]}, "
                      f"dead letters {counts[2]}")
                last = counts
            if sum(counts) >= count:
                break
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited with {worker.returncode}; see {log_dir / 'worker.log'}")
            time.sleep(1.0)
        processing = time.monotonic() - t0
        print("== waiting for the sink to write everything to ClickHouse")
        sink_deadline = time.monotonic() + 120
        while not _sink_caught_up(settings):
            if time.monotonic() > sink_deadline:
                raise TimeoutError("the sink did not catch up within 120s")
            if sink.poll() is not None:
                raise RuntimeError(f"sink exited with {sink.returncode}; see {log_dir / 'sink.log'}")
            time.sleep(0.5)
        if not review:
            _stop(worker)
        _stop(sink)
        print("== reading decisions and ground truth back from Kafka")
        reader = OutputReader(settings)
        while reader.decided_receipts() < count or len(reader.truths) < count:
            before = reader.decided_receipts() + len(reader.truths)
            reader.poll(2.0)
            if reader.decided_receipts() + len(reader.truths) == before:
                break  # nothing more arrives: the summary shows what is missing
        summary = _summary(settings, reader, report, processing)
        _print_summary(summary)
        out = var / "demo-summary.json"
        out.write_text(json.dumps(summary, indent=2, default=str))
        print(f"== summary written to {out}")
        if review:
            assert worker is not None
            return _serve_review(settings, worker)
        return 0 if summary["reconciled"] else 1
    except KeyboardInterrupt:
        print("\n== interrupted: stopping what the demo started")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if reader is not None:
            reader.close()
        _stop(worker)
        _stop(sink)
        if started_broker:
            localkafka.stop(settings)


def _summary(settings: Settings, reader: OutputReader, report: Any, seconds: float) -> dict[str, Any]:
    from lotflow.sinks.client import connect, table_counts

    board = score(reader.truths, reader.decisions)
    client = connect(settings)
    rows = table_counts(client, settings.clickhouse_database)
    exceptions_by_reason: Counter[str] = Counter(board.exceptions_by_reason)
    lat = _latencies(reader)
    in_total = board.records_in
    kafka_out = board.verified + board.exceptions + board.dead_letters
    receipts_topic = topics.RECEIPTS.full_name(settings)
    ch_dead = client.query(
        f"SELECT count() FROM {settings.clickhouse_database}.dead_letters FINAL WHERE source_topic = %(t)s",
        parameters={"t": receipts_topic}).result_rows[0][0]
    # a PO revision can reopen a verified receipt: one more exception row, same receipt
    ch_out = rows.get("verified", 0) + rows.get("exceptions", 0) + ch_dead - board.reopened
    return {
        "records_in": in_total,
        "verified": board.verified,
        "exceptions": board.exceptions,
        "dead_letters": board.dead_letters,
        "undecided": board.undecided,
        "reopened_by_revision": board.reopened,
        "reprocessed_duplicates_on_kafka": board.duplicates,
        "reconciled_kafka": in_total == kafka_out and board.undecided == 0,
        "reconciled_clickhouse": in_total == ch_out,
        "reconciled": in_total == kafka_out == ch_out and board.undecided == 0,
        "clickhouse_rows": rows,
        "exceptions_by_reason": dict(exceptions_by_reason.most_common()),
        "precision_verified": round(board.precision_verified, 5),
        "recall_faults": round(board.recall_faults, 5),
        "false_alarm_rate": round(board.false_alarm_rate, 5),
        "faults_injected": board.faults,
        "faults_caught_by_confidence_only": board.caught_by_model_only,
        "silent_faults": board.silent_faults,
        "recall_silent_faults": round(board.recall_silent, 5),
        "false_alarms_by_benign": dict(board.false_alarms_by_benign),
        "recall_by_fault": {k: round(v, 4) for k, v in board.recall_by_fault.items()},
        "missed_faults": board.missed,
        "throughput_per_s": round(in_total / seconds, 1) if seconds else 0.0,
        "offered_rate_per_s": getattr(report, "receipts_per_s", None),
        "input_messages": getattr(report, "counts", {}),
        "latency_p50_ms": round(_percentile(lat, 0.50), 1),
        "latency_p99_ms": round(_percentile(lat, 0.99), 1),
        "elapsed_s": round(seconds, 1),
        "topic_prefix": settings.topic_prefix,
        "clickhouse_database": settings.clickhouse_database,
    }


def _print_summary(s: dict[str, Any]) -> None:
    print("\n================ lotflow demo summary ================")
    print(f"receipts in        {s['records_in']:>8}")
    print(f"  verified         {s['verified']:>8}")
    print(f"  exceptions       {s['exceptions']:>8}")
    print(f"  dead letters     {s['dead_letters']:>8}")
    if s["reopened_by_revision"]:
        print(f"  reopened by a PO revision {s['reopened_by_revision']}")
    print(f"reconciled         Kafka {'yes' if s['reconciled_kafka'] else 'NO'}, "
          f"ClickHouse {'yes' if s['reconciled_clickhouse'] else 'NO'}")
    print("ClickHouse rows    " + ", ".join(f"{k} {v}" for k, v in s["clickhouse_rows"].items()))
    print("exceptions by reason:")
    for code, n in s["exceptions_by_reason"].items():
        print(f"  {code:<24}{n:>6}")
    print(f"precision of verified  {100 * s['precision_verified']:.2f} %   (target >= 99.5 %)")
    print(f"recall of faults       {100 * s['recall_faults']:.2f} %   (target >= 99 %)")
    print(f"false alarms           {100 * s['false_alarm_rate']:.2f} % of clean receipts")
    print(f"caught by confidence only (no rule failed): {s['faults_caught_by_confidence_only']}")
    print(f"silent faults          {s['silent_faults']}, recall {100 * s['recall_silent_faults']:.1f} % "
          "(invisible to every rule; the learning issue is measured on them)")
    if s["false_alarms_by_benign"]:
        print(f"false alarms by kind   {s['false_alarms_by_benign']}")
    if s["missed_faults"]:
        print(f"missed faults          {s['missed_faults']}")
    print(f"throughput             {s['throughput_per_s']} receipts/s end to end ({s['elapsed_s']} s)")
    print(f"latency                p50 {s['latency_p50_ms']} ms, p99 {s['latency_p99_ms']} ms")
    print("=======================================================")
