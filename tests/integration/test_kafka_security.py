"""Kafka security against a real broker: a SASL_PLAINTEXT listener (PLAIN, SCRAM-SHA-256).

The broker is this module's own (``var/sasl-lab``, PLAINTEXT 9392, SASL 9393, ZooKeeper 2481),
started through ``lotflow kafka start --sasl-port`` and stopped when the session ends, so the
session's main broker is never touched. Every client here connects through the SASL listener
with ``lotflow.kafka_clients``; nothing is mocked.

Fixtures for other tests of this file: ``sasl_settings`` (Settings pointing at the SASL
listener, SCRAM-SHA-256) and ``sasl_topic_set`` (like conftest's ``topic_set``, over it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from pydantic import SecretStr

from lotflow import localkafka
from lotflow.admin import committed_offsets, create_topics, delete_topics_with_prefix, end_offsets
from lotflow.kafka_clients import RedeliveringProducer, client_config, producer_config
from lotflow.settings import Settings
from lotflow.streams.topics import RECEIPTS, TOPICS, TopicSpec
from tests.integration.pipeline import seed_distribution

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SASL_VAR_DIR = PROJECT_ROOT / "var" / "sasl-lab"
SASL_KAFKA_PORT = 9392  # PLAINTEXT (inter-broker)
SASL_PORT = 9393
SASL_ZOOKEEPER_PORT = 2481
SASL_USER = "lotflow-test"
SASL_PASSWORD = "sasl-lab-" + uuid.uuid4().hex[:10]  # a new one every session

TopicSetFactory = Callable[..., Settings]


@pytest.fixture(scope="session")
def sasl_broker() -> Iterator[Settings]:
    """A broker with PLAINTEXT on 9392 and SASL_PLAINTEXT on 9393; Settings for its PLAINTEXT side."""
    broker = Settings(
        var_dir=SASL_VAR_DIR, kafka_port=SASL_KAFKA_PORT, zookeeper_port=SASL_ZOOKEEPER_PORT,
        bootstrap_servers=f"127.0.0.1:{SASL_KAFKA_PORT}", kafka_sasl_port=SASL_PORT,
        kafka_sasl_username=SASL_USER, kafka_sasl_password=SecretStr(SASL_PASSWORD),
    )
    localkafka.stop(broker)  # a broker left behind by an interrupted session (only ours, by pid file)
    busy = [port for port in (SASL_KAFKA_PORT, SASL_PORT, SASL_ZOOKEEPER_PORT) if localkafka.port_open(port)]
    if busy:
        pytest.fail(f"ports {busy} are in use by processes this test did not start; free them first")
    shutil.rmtree(SASL_VAR_DIR / "kafka" / "data", ignore_errors=True)  # fresh topics and users
    seed_distribution(SASL_VAR_DIR)
    env = {**os.environ, **{k: v for k, v in broker.to_env().items() if k != "LOTFLOW_KAFKA_SASL_PORT"}}
    # the CLI path, as documented: credentials from the environment, the port as an option
    proc = subprocess.run([sys.executable, "-m", "lotflow.cli", "kafka", "start", "--sasl-port", str(SASL_PORT)],
                          env=env, capture_output=True, text=True, timeout=180, cwd=PROJECT_ROOT, check=False)
    output = proc.stdout + proc.stderr
    try:
        assert proc.returncode == 0, output
        assert SASL_PASSWORD not in output
        assert localkafka.port_open(SASL_PORT)
        yield broker
    finally:
        localkafka.stop(broker)


@pytest.fixture(scope="session")
def sasl_settings(sasl_broker: Settings) -> Settings:
    """Settings whose Kafka clients all go through the SASL listener (SCRAM-SHA-256)."""
    return Settings(
        bootstrap_servers=f"127.0.0.1:{SASL_PORT}",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username=SASL_USER,
        kafka_sasl_password=SecretStr(SASL_PASSWORD),
        var_dir=SASL_VAR_DIR,
        kafka_port=SASL_KAFKA_PORT,
        zookeeper_port=SASL_ZOOKEEPER_PORT,
    )


@pytest.fixture
def sasl_topic_set(sasl_settings: Settings) -> Iterator[TopicSetFactory]:
    """``sasl_topic_set(specs=TOPICS, *, create=True, **overrides) -> Settings``: a copy of
    ``sasl_settings`` with a fresh topic prefix / app id / sink group and (unless
    ``create=False``) those topics created through SASL; deleted at teardown."""
    made: list[Settings] = []

    def make(specs: Iterable[TopicSpec] = TOPICS, *, create: bool = True, **update: Any) -> Settings:
        tag = uuid.uuid4().hex[:8]
        fields: dict[str, Any] = {"topic_prefix": f"s{tag}.", "app_id": f"lotflow-sasl-{tag}",
                                  "sink_group": f"lotflow-sink-sasl-{tag}", **update}
        settings = sasl_settings.model_copy(update=fields)
        made.append(settings)
        if create:
            create_topics(settings, specs)
        return settings

    yield make

    for settings in made:
        try:
            delete_topics_with_prefix(settings, settings.topic_prefix, timeout=30)
        except Exception as exc:  # teardown must not mask the test's own result
            warnings.warn(f"could not delete topics {settings.topic_prefix}*: {exc!r}", stacklevel=1)


def consume_all(settings: Settings, topic: str, expected: int, timeout: float = 30.0,
                group: str | None = None) -> list[tuple[bytes | None, bytes | None]]:
    consumer = Consumer(client_config(settings, **{
        "group.id": group or f"sasl-read-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "isolation.level": "read_committed"}))
    records: list[tuple[bytes | None, bytes | None]] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout
        while len(records) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=0.5):
                if msg.error() is None:
                    records.append((msg.key(), msg.value()))
        if group is not None:
            consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    return records


# --- authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
def test_wrong_password_is_refused(sasl_settings: Settings, mechanism: str) -> None:
    wrong = sasl_settings.model_copy(update={"kafka_sasl_mechanism": mechanism,
                                             "kafka_sasl_password": SecretStr("not-the-password")})
    errors: list[KafkaError] = []
    producer = Producer(producer_config(wrong, error_cb=errors.append, **{"message.timeout.ms": 2000}))
    delivered: list[Any] = []
    producer.produce("anything", b"v", on_delivery=lambda err, msg: delivered.append(err))
    deadline = time.monotonic() + 20
    while not any(e.code() == KafkaError._AUTHENTICATION for e in errors) and time.monotonic() < deadline:
        producer.poll(0.2)
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors
    assert producer.flush(10) == 0 and delivered and delivered[0] is not None  # nothing got through
    assert "not-the-password" not in " ".join(str(e) for e in errors)


def test_plaintext_client_cannot_use_the_sasl_listener(sasl_settings: Settings) -> None:
    plain = sasl_settings.model_copy(update={"kafka_security_protocol": "PLAINTEXT"})
    with pytest.raises(KafkaException, match=r"_TRANSPORT|_TIMED_OUT"):
        AdminClient(client_config(plain, log_level=0)).list_topics(timeout=3)


# --- admin, produce, consume through SASL ------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
def test_admin_produce_consume(sasl_topic_set: TopicSetFactory, mechanism: str) -> None:
    settings = sasl_topic_set([RECEIPTS], kafka_sasl_mechanism=mechanism)
    topic = RECEIPTS.full_name(settings)
    assert len(end_offsets(settings, topic)) == settings.partitions  # admin metadata via SASL

    producer = RedeliveringProducer(producer_config(settings))
    sent = {f"PO-{i:04d}".encode(): f"value-{i}".encode() for i in range(500)}
    for key, value in sent.items():
        producer.send(topic, key, value)
    producer.flush(30)
    assert producer.delivered == 500 and producer.failed == 0

    group = f"sasl-group-{uuid.uuid4().hex[:8]}"
    records = consume_all(settings, topic, 500, group=group)
    assert dict(records) == sent and len(records) == 500
    assert sum(end_offsets(settings, topic).values()) == 500
    assert committed_offsets(settings, group, topic) == end_offsets(settings, topic)


# --- a Faust app through SASL --------------------------------------------------------------------------

FAUST_APP = textwrap.dedent('''
    """A Faust app on lotflow's settings: relays in -> out, counts keys in a Table."""
    import faust

    from lotflow.kafka_clients import faust_broker_credentials
    from lotflow.settings import Settings

    settings = Settings()
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{hp}" for hp in settings.bootstrap_servers.split(",")],
        broker_credentials=faust_broker_credentials(settings),
        store="memory://",
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
    )
    source = app.topic(settings.topic("faust-in"), key_serializer="raw", value_serializer="raw")
    sink = app.topic(settings.topic("faust-out"), key_serializer="raw", value_serializer="raw")
    counts = app.Table("key-counts", default=int, partitions=settings.partitions)

    @app.agent(source)
    async def relay(stream):
        async for event in stream.events():
            counts[event.key] += 1
            await sink.send(key=event.key, value=event.value.upper())

    if __name__ == "__main__":
        app.main()
''')


def test_faust_app_consumes_and_produces_through_sasl(sasl_topic_set: TopicSetFactory, tmp_path: Path) -> None:
    from tests.integration.pipeline import free_port

    settings = sasl_topic_set(create=False, partitions=2)
    admin = AdminClient(client_config(settings))  # Faust does not create its source topics
    futures = admin.create_topics([NewTopic(settings.topic(n), num_partitions=2, replication_factor=1)
                                   for n in ("faust-in", "faust-out")])
    for future in futures.values():
        future.result()

    producer = RedeliveringProducer(producer_config(settings))
    sent = {f"K{i:03d}".encode(): f"v{i}".encode() for i in range(200)}
    for key, value in sent.items():
        producer.send(settings.topic("faust-in"), key, value)
    producer.flush(30)

    script = tmp_path / "sasl_faust_app.py"
    script.write_text(FAUST_APP)
    log = tmp_path / "faust.log"
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(PROJECT_ROOT)}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, str(script), "worker", "-l", "warn", "--web-port", str(free_port()),
                                 "--web-host", "127.0.0.1"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=str(tmp_path))
    try:
        records = consume_all(settings, settings.topic("faust-out"), 200, timeout=90)
        text = log.read_text(errors="replace")
        assert len(records) == 200, text[-3000:]
        assert dict(records) == {k: v.upper() for k, v in sent.items()}
        assert SASL_PASSWORD not in text
        # the Table's changelog was created and written through SASL too
        changelog = f"{settings.app_id}-key-counts-changelog"
        assert sum(end_offsets(settings, changelog).values()) >= 1
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    # the app id's internal topics are not under the prefix: remove them too
    delete_topics_with_prefix(settings, settings.app_id, timeout=30)


def test_the_pipeline_runs_through_sasl(sasl_topic_set: TopicSetFactory) -> None:
    """``lotflow worker`` (Faust consumer, transactional librdkafka producer, spec and history
    readers) with every client on the SASL listener: receipts in, decisions out, read back
    read_committed through SASL too."""
    from lotflow.demo import OutputReader
    from lotflow.simulator.faults import parse_fault_spec
    from lotflow.simulator.publish import publish

    from .pipeline import WorkerProcess, free_port, wait_for

    settings = sasl_topic_set(document_wait_s=3.0, worker_web_port=free_port())
    count = 300
    report = publish(settings, 5, count, parse_fault_spec("default"), 0.0, None)
    assert report.failed == 0
    log = PROJECT_ROOT / "var" / "test-logs" / f"sasl-pipeline-{settings.app_id}.log"
    worker = WorkerProcess(settings, log).start()
    try:
        reader = OutputReader(settings)
        wait_for(reader, lambda: reader.decided_receipts() >= count, 120, "every receipt decided through SASL")
        assert reader.counts["VERIFIED"] > 0 and reader.counts["EXCEPTION"] > 0
        reader.close()
        assert SASL_PASSWORD not in log.read_text()  # the secret is never logged
    finally:
        worker.stop()
