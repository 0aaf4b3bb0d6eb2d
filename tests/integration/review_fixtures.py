"""The review service for integration tests: a running worker and sink on simulated traffic,
users per role with API tokens, and the service itself under uvicorn on a free port."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from argon2 import PasswordHasher
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from lotflow import admin
from lotflow.kafka_clients import client_config
from lotflow.metrics import SinkMetrics
from lotflow.review.app import create_app
from lotflow.review.server import build_services
from lotflow.review.users import UserStore
from lotflow.schemas.serde import AvroCodec, schema_source
from lotflow.settings import Settings
from lotflow.simulator.faults import parse_fault_spec
from lotflow.simulator.publish import publish
from lotflow.sinks.clickhouse import ClickHouseSink, connect
from lotflow.sinks.migrations import migrate
from lotflow.streams import topics

from .pipeline import PROJECT_ROOT, WorkerProcess, free_port

__all__ = ["PASSWORD", "Service", "decisions_on_kafka", "service", "wait_until"]

TopicSetFactory = Callable[..., Settings]
LOGS = PROJECT_ROOT / "var" / "test-logs"
PASSWORD = "correct horse battery"


@dataclass
class Service:
    settings: Settings
    url: str
    tokens: dict[str, str]
    client: Any  # ClickHouse

    def api(self, who: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def open_in(self, queue: str, who: str = "admin") -> list[dict[str, Any]]:
        with self.api(who) as api:
            answer = api.get("/api/exceptions", params={"queue": queue, "limit": 500})
            assert answer.status_code == 200, answer.text
            return list(answer.json())


def _run_sink(settings: Settings, stop: threading.Event) -> threading.Thread:
    client = connect(settings)
    migrate(client, settings.clickhouse_database)
    sink = ClickHouseSink(settings, client, SinkMetrics.create(CollectorRegistry()))
    thread = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    thread.start()
    return thread


def wait_until(what: str, check: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout}s")


@pytest.fixture
def service(topic_set: TopicSetFactory, workers: list[WorkerProcess], clickhouse_dsn: SecretStr,
            tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Service]:
    database = f"review_{uuid.uuid4().hex[:10]}"
    settings = topic_set(document_wait_s=2.0, worker_web_port=free_port(), clickhouse_database=database,
                         clickhouse_dsn=clickhouse_dsn, sink_batch_s=0.2,
                         review_users_file=tmp_path / "users.json")
    report = publish(settings, 5, 400, parse_fault_spec("default"), 0.0, None)
    assert report.failed == 0, report.errors
    workers.append(WorkerProcess(settings, LOGS / f"{request.node.name}-{settings.app_id}.log").start())
    stop = threading.Event()
    sink = _run_sink(settings, stop)
    users = UserStore(settings.users_file, hasher=PasswordHasher(time_cost=1, memory_cost=1024))
    tokens = {}
    for name, roles in (("rita", ["receiving"]), ("sam", ["supplier_quality"]), ("admin", ["admin"]),
                        ("quinn", ["qc_technician"])):
        users.add(name, roles, PASSWORD)
        tokens[name] = users.issue_token(name, "test")
    services, specs = build_services(settings)
    services.users = users
    app = create_app(services)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until("the service answers", lambda: _answers(f"http://127.0.0.1:{port}/healthz"), 30)
    svc = Service(settings, f"http://127.0.0.1:{port}", tokens, connect(settings))
    # the tests take up to three receiving exceptions: wait for them, not only for the first one
    wait_until("three receiving exceptions and a supplier-quality one stored in ClickHouse",
               lambda: len(svc.open_in("receiving")) >= 3 and bool(svc.open_in("supplier_quality")))
    try:
        yield svc
    finally:
        server.should_exit = True
        thread.join(10)
        stop.set()
        sink.join(60)
        specs.close()
        if services.inputs is not None:
            services.inputs.close()
        svc.client.command(f"DROP DATABASE IF EXISTS {database} SYNC")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def decisions_on_kafka(settings: Settings) -> list[dict[str, Any]]:
    topic = topics.DECISIONS.full_name(settings)
    codec = AvroCodec(schema_source(None), f"{topic}-value", topics.DECISIONS.schema)
    consumer = Consumer(client_config(settings, **{"group.id": f"review-test-{uuid.uuid4().hex[:6]}",
                                                   "enable.auto.commit": False}))
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in admin.end_offsets(settings, topic)])
    out, idle = [], 0
    while idle < 3:
        batch = consumer.consume(1000, timeout=1.0)
        idle = 0 if batch else idle + 1
        out += [codec.decode(m.value()) for m in batch if not m.error() and m.value()]
    consumer.close()
    return out


