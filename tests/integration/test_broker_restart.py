"""Producers survive a broker restart: nothing lost, nothing duplicated.

The broker is this module's own (``var/restart-lab``, Kafka 9492, ZooKeeper 2581), so
stopping it never disturbs the session's main broker; it is stopped when the module ends.
Everything read back is read with ``isolation.level=read_committed``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from lotflow import localkafka
from lotflow.admin import create_topics, delete_topics_with_prefix, end_offsets
from lotflow.kafka_clients import RedeliveringProducer, client_config, producer_config
from lotflow.schemas.serde import AvroCodec, schema_source
from lotflow.settings import Settings
from lotflow.streams.topics import GROUND_TRUTH, RECEIPTS
from tests.integration.pipeline import seed_distribution

PROJECT_ROOT = Path(__file__).resolve().parents[2]
LAB_VAR_DIR = PROJECT_ROOT / "var" / "restart-lab"
LAB_KAFKA_PORT = 9492
LAB_ZOOKEEPER_PORT = 2581


@pytest.fixture(scope="module")
def lab() -> Iterator[Settings]:
    settings = Settings(var_dir=LAB_VAR_DIR, kafka_port=LAB_KAFKA_PORT, zookeeper_port=LAB_ZOOKEEPER_PORT,
                        bootstrap_servers=f"127.0.0.1:{LAB_KAFKA_PORT}")
    localkafka.stop(settings)  # one left behind by an interrupted run (ours only: pid files)
    busy = [port for port in (LAB_KAFKA_PORT, LAB_ZOOKEEPER_PORT) if localkafka.port_open(port)]
    if busy:
        pytest.fail(f"ports {busy} are in use by processes this test did not start; free them first")
    shutil.rmtree(LAB_VAR_DIR / "kafka" / "data", ignore_errors=True)
    seed_distribution(LAB_VAR_DIR)
    localkafka.start(settings)
    try:
        yield settings
    finally:
        localkafka.stop(settings)


def fresh(lab: Settings) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return lab.model_copy(update={"topic_prefix": f"r{tag}.", "app_id": f"lotflow-restart-{tag}"})


Rec = tuple[int, int, bytes | None, bytes | None]  # partition, offset, key, value


def read_committed(settings: Settings, topics: list[str], timeout: float = 30.0) -> dict[str, list[Rec]]:
    """Every record of ``topics`` up to their current end: topic -> [(partition, offset, key, value)]."""
    consumer = Consumer(client_config(settings, **{
        "group.id": f"restart-read-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
        "isolation.level": "read_committed", "auto.offset.reset": "earliest"}))
    ends = {(t, p): e for t in topics for p, e in end_offsets(settings, t).items()}
    todo = {tp for tp, end in ends.items() if end > 0}
    out: dict[str, list[Rec]] = {t: [] for t in topics}
    try:
        consumer.assign([TopicPartition(t, p, 0) for t, p in ends])
        deadline = time.monotonic() + timeout
        while todo and time.monotonic() < deadline:
            for msg in consumer.consume(5000, timeout=0.5):
                if msg.error() is not None:
                    continue
                topic, partition, offset = str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0)
                key, value = msg.key(), msg.value()
                out[topic].append((partition, offset, key if isinstance(key, bytes) else None,
                                   value if isinstance(value, bytes) else None))
                if offset + 1 >= ends[(topic, partition)]:
                    todo.discard((topic, partition))
        assert not todo, f"partitions not read to their end: {sorted(todo)}"
    finally:
        consumer.close()
    return out


def test_simulator_survives_a_broker_restart(lab: Settings, tmp_path: Path) -> None:
    from lotflow.simulator.faults import parse_fault_spec
    from lotflow.simulator.generate import generate

    settings = fresh(lab)
    create_topics(settings)
    seed, count, rate, faults = 5, 3000, 200.0, "default"
    env = {**os.environ, **settings.to_env()}
    cmd = [sys.executable, "-m", "lotflow.cli", "simulate", "--seed", str(seed), "--count", str(count),
           "--rate", str(rate), "--faults", faults]
    log = tmp_path / "simulate.log"
    restart: dict[str, float] = {}
    try:
        with log.open("w") as out:
            t0 = time.monotonic()
            sim = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
            time.sleep(4.0)  # publishing at full rate
            assert sim.poll() is None, log.read_text()[-3000:]
            restart["stop_at"] = time.monotonic() - t0
            localkafka.stop(lab)  # broker and ZooKeeper, mid-stream
            time.sleep(1.0)
            localkafka.start(lab)
            restart["up_at"] = time.monotonic() - t0
            rc = sim.wait(120)
            elapsed = time.monotonic() - t0
    finally:
        if "sim" in locals() and sim.poll() is None:
            sim.kill()
            sim.wait(10)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert restart["up_at"] < elapsed, (restart, elapsed)  # the restart happened while it published
    summary = re.search(r"delivered (\d+) records, failed (\d+), redelivered (\d+)", text)
    assert summary is not None, text[-3000:]
    delivered, failed, _redelivered = map(int, summary.groups())
    assert failed == 0, text[-3000:]
    print(f"broker down {restart['stop_at']:.1f}-{restart['up_at']:.1f} s of {elapsed:.1f} s: {summary.group(0)}")

    # Every generated record is on its topic exactly once.
    events = list(generate(seed, count, parse_fault_spec(faults), 1_700_000_000_000, gap_ms=1000.0 / rate))
    expected = Counter((settings.topic(e.topic.name), e.key.encode() if e.key else None) for e in events)
    topics = sorted({t for t, _ in expected} | {settings.topic(GROUND_TRUTH.name)})
    records = read_committed(settings, topics)
    found = Counter((t, key) for t, recs in records.items() if t != settings.topic(GROUND_TRUTH.name)
                    for _p, _o, key, _v in recs)
    assert found == expected, {"missing": expected - found, "extra": found - expected}

    # ... and every receipt-topic record has exactly one ground truth, pointing at it.
    truth_codec = AvroCodec(schema_source(None), f"{settings.topic(GROUND_TRUTH.name)}-value", GROUND_TRUTH.schema)
    truths = [truth_codec.decode(v) for _p, _o, _k, v in records[settings.topic(GROUND_TRUTH.name)] if v is not None]
    receipt_topic = settings.topic(RECEIPTS.name)
    receipts_at = Counter((p, o) for p, o, _k, _v in records[receipt_topic])
    truth_at = Counter((t["source_partition"], t["source_offset"]) for t in truths
                       if t["source_topic"] == receipt_topic)
    assert truth_at == receipts_at and len(truths) == len(records[receipt_topic])
    assert delivered == sum(len(recs) for recs in records.values())
    delete_topics_with_prefix(settings, settings.topic_prefix, timeout=30)


def test_redelivers_what_timed_out_while_the_broker_was_down(lab: Settings) -> None:
    settings = fresh(lab)
    create_topics(settings, [RECEIPTS])
    topic = RECEIPTS.full_name(settings)
    producer = RedeliveringProducer(producer_config(settings, **{"message.timeout.ms": 1500}), backoff_s=0.2)
    localkafka.stop(lab)
    try:
        keys = [f"PO-{i:04d}".encode() for i in range(300)]
        for i, key in enumerate(keys):
            producer.send(topic, key, b"v", partition=i % settings.partitions if i % 2 else None)
        deadline = time.monotonic() + 20
        while producer.redelivered == 0 and time.monotonic() < deadline:
            producer.poll(0.1)  # librdkafka gives up after 1.5 s: _MSG_TIMED_OUT, produced again
        assert producer.redelivered > 0 and producer.delivered == 0 and producer.failed == 0
    finally:
        localkafka.start(lab)
    producer.flush(60)
    assert producer.delivered == 300 and producer.failed == 0
    records = read_committed(settings, [topic])[topic]
    assert sorted(k for _p, _o, k, _v in records if k is not None) == keys  # exactly once
    for i, (p, _o, k, _v) in enumerate(sorted(records, key=lambda r: r[2] or b"")):
        if i % 2:
            assert p == i % settings.partitions, (k, p)  # the explicit partition was kept
    delete_topics_with_prefix(settings, settings.topic_prefix, timeout=30)


def test_unknown_topic_is_redelivered_once_it_exists(lab: Settings) -> None:
    settings = fresh(lab)
    topic = settings.topic("late-topic")
    producer = RedeliveringProducer(producer_config(settings, **{"topic.metadata.propagation.max.ms": 300}),
                                    backoff_s=0.2)
    for i in range(50):
        producer.send(topic, f"K{i}".encode(), b"v")
    deadline = time.monotonic() + 20
    while producer.redelivered == 0 and time.monotonic() < deadline:
        producer.poll(0.1)
    assert producer.redelivered > 0 and producer.delivered == 0  # _UNKNOWN_TOPIC: kept, not dropped
    admin = AdminClient(client_config(settings))
    for future in admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)]).values():
        future.result()
    producer.flush(60)
    assert producer.delivered == 50 and producer.failed == 0
    assert len(read_committed(settings, [topic])[topic]) == 50
    delete_topics_with_prefix(settings, settings.topic_prefix, timeout=30)


def test_permanent_failure_is_counted_and_raised(lab: Settings) -> None:
    settings = fresh(lab)
    create_topics(settings, [RECEIPTS])
    topic = RECEIPTS.full_name(settings)
    producer = RedeliveringProducer(producer_config(settings, **{"message.max.bytes": 4_000_000}))
    producer.send(topic, b"small", b"v")
    producer.flush(30)
    producer.send(topic, b"big", os.urandom(2_000_000))  # over the broker's message.max.bytes (1 MB)
    with pytest.raises(KafkaException, match="1 records failed permanently"):
        producer.flush(30)
    assert producer.failed == 1 and producer.delivered == 1 and producer.redelivered == 0
    delete_topics_with_prefix(settings, settings.topic_prefix, timeout=30)


def test_the_worker_survives_a_broker_restart_under_load(lab: Settings, tmp_path: Path) -> None:
    """The worker's transactional output and changelog: a commit that fails while the broker is
    away is retried (``/healthz`` says so meanwhile); a producer the broker cannot take back
    (Kafka < 2.5 cannot bump a producer epoch after a sequence gap) ends the process, which its
    supervisor restarts -- here the test, in production Kubernetes. Either way every receipt
    ends with exactly one decision on the output topics, as a read_committed consumer sees them."""
    from lotflow.reconcile import decision_from_output
    from lotflow.simulator.faults import parse_fault_spec
    from lotflow.simulator.publish import publish
    from lotflow.streams import topics as declared

    from .pipeline import WorkerProcess, free_port, read_all

    # stall_timeout_s: a worker left outside its group by a failed join exits after it (README)
    settings = fresh(lab).model_copy(update={"document_wait_s": 3.0, "worker_web_port": free_port(),
                                             "worker_instance_id": "restart-w1", "stall_timeout_s": 20.0})
    create_topics(settings)
    count = 2000
    report = publish(settings, 9, count, parse_fault_spec("default"), 0.0, None)
    assert report.failed == 0
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        deadline = time.monotonic() + 60
        while worker.records_in() < 1000 and time.monotonic() < deadline:
            time.sleep(0.1)
        localkafka.stop(lab)  # mid-stream, with a transaction open or about to be
        time.sleep(2.0)
        localkafka.start(lab)
        kinds = {declared.VERIFIED: "VERIFIED", declared.EXCEPTIONS: "EXCEPTION",
                 declared.DEAD_LETTERS: "DEAD_LETTER"}
        receipts_topic = declared.RECEIPTS.full_name(settings)
        deadline = time.monotonic() + 120
        restarts = 0
        decided: dict[tuple[str, int, int], int] = {}
        while time.monotonic() < deadline:
            decided = {}
            try:
                for spec, kind in kinds.items():
                    for record in read_all(settings, spec):
                        d = decision_from_output(kind, record)
                        if d is not None and d.ref[0] == receipts_topic:  # (None: a spot check)
                            decided[d.ref] = decided.get(d.ref, 0) + 1
            except KafkaException:  # the broker is still loading its logs
                pass
            if len(decided) >= count:
                break
            if worker.proc is not None and worker.proc.poll() is not None:
                assert worker.proc.returncode == 70, worker.log.read_text()[-3000:]  # an orderly stop
                restarts += 1
                worker = WorkerProcess(settings, tmp_path / "worker.log").start()
            time.sleep(2.0)
        print(f"worker restarts after the broker restart: {restarts}")
    finally:
        worker.stop()
    assert len(decided) == count, f"{len(decided)} of {count} receipts decided"
    assert set(decided.values()) == {1}, "a receipt decided twice"
