"""The review service on the real broker, the real ClickHouse engine and a running worker:
queues per role, the API's status codes, one decision per exception, CSRF and escaping."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
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
from lotflow.sinks.rows import EXCEPTION_COLUMNS, exception_row
from lotflow.streams import topics

from .pipeline import PROJECT_ROOT, WorkerProcess, free_port

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


def _wait(what: str, check: Callable[[], bool], timeout: float = 120.0) -> None:
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
    _wait("the service answers", lambda: _answers(f"http://127.0.0.1:{port}/healthz"), 30)
    svc = Service(settings, f"http://127.0.0.1:{port}", tokens, connect(settings))
    _wait("exceptions stored in ClickHouse",
          lambda: bool(svc.open_in("receiving")) and bool(svc.open_in("supplier_quality")))
    try:
        yield svc
    finally:
        server.should_exit = True
        thread.join(10)
        stop.set()
        sink.join(60)
        specs.close()
        svc.client.command(f"DROP DATABASE IF EXISTS {database} SYNC")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _decisions_on_kafka(settings: Settings) -> list[dict[str, Any]]:
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


def test_api_queues_roles_and_one_decision_per_exception(service: Service) -> None:
    receiving = service.open_in("receiving", "rita")
    assert receiving and all(e["queue"] == "receiving" for e in receiving)
    # ordered: HIGH first, then oldest first
    keys = [(e["priority"] != "HIGH", e["decision_time"]) for e in receiving]
    assert keys == sorted(keys)
    with service.api(None) as anonymous:
        assert anonymous.get("/api/exceptions", params={"queue": "receiving"}).status_code == 401
        assert anonymous.post(f"/api/exceptions/{receiving[0]['id']}/decision", json={}).status_code == 401
    with service.api("rita") as rita:
        assert rita.get("/api/exceptions", params={"queue": "supplier_quality"}).status_code == 403
        other = service.open_in("supplier_quality")[0]
        assert rita.get(f"/api/exceptions/{other['id']}").status_code == 403
        assert rita.post(f"/api/exceptions/{other['id']}/decision",
                         json={"resolution": "ACCEPT", "reasoning": "x", "certainty": 1}).status_code == 403
        assert rita.get("/api/exceptions/no-such-id").status_code == 404
        counts = rita.get("/api/queues").json()
        assert set(counts) == {"receiving"} and counts["receiving"] >= len(receiving)

        target = receiving[0]
        detail = rita.get(f"/api/exceptions/{target['id']}").json()
        assert detail["reasons"] and detail["pattern"]["reason_code"]
        assert detail["pattern_stored"]["prior_receipts"] >= 1
        bad = rita.post(f"/api/exceptions/{target['id']}/decision",
                        json={"resolution": "CONDITIONAL_ACCEPT", "reasoning": "rework", "certainty": 0.8})
        assert bad.status_code == 422  # a conditional accept needs its condition
        first = rita.post(f"/api/exceptions/{target['id']}/decision",
                          json={"resolution": "ACCEPT", "reasoning": "recounted: the slip was right",
                                "certainty": 0.9})
        assert first.status_code == 201, first.text
        again = rita.post(f"/api/exceptions/{target['id']}/decision",
                          json={"resolution": "REJECT", "reasoning": "changed my mind", "certainty": 0.5})
        assert again.status_code == 409
        assert again.json()["first_decision"]["decision_id"] == first.json()["decision_id"]
        # it left every queue at once
        assert target["id"] not in {e["id"] for e in service.open_in("receiving", "rita")}

    # two reviewers racing on one exception: exactly one decision takes effect
    race = receiving[1]["id"]

    def decide(who: str) -> int:
        with service.api(who) as api:
            return api.post(f"/api/exceptions/{race}/decision",
                            json={"resolution": "REJECT", "reasoning": f"{who} says no", "certainty": 1.0}).status_code

    with ThreadPoolExecutor(2) as pool:
        codes = sorted(pool.map(decide, ["rita", "admin"]))
    assert codes == [201, 409]

    # reassign: it moves to the QC technician's queue and stays open there
    moved = receiving[2]["id"]
    with service.api("rita") as rita:
        answer = rita.post(f"/api/exceptions/{moved}/reassign", json={"queue": "qc_technician",
                                                                       "note": "needs a re-weigh"})
        assert answer.status_code == 201, answer.text
    _wait("the reassigned exception in the QC queue", lambda: moved in {e["id"] for e in
                                                                          service.open_in("qc_technician", "quinn")})
    assert moved not in {e["id"] for e in service.open_in("receiving", "rita")}

    on_kafka = {d["exception_id"]: d for d in _decisions_on_kafka(service.settings)}
    accepted = on_kafka[target["id"]]
    assert (accepted["resolution"], accepted["decided_by"], accepted["role"]) == ("ACCEPT", "rita", "receiving")
    assert accepted["reasoning"] == "recounted: the slip was right" and accepted["certainty"] == 0.9
    assert accepted["confidence_shown"] == pytest.approx(target["confidence"])
    assert on_kafka[moved]["resolution"] == "REASSIGN" and on_kafka[moved]["reassign_to"] == "qc_technician"
    assert len([d for d in _decisions_on_kafka(service.settings) if d["exception_id"] == race]) == 1


def _login(page: httpx.Client, user: str, password: str = PASSWORD) -> httpx.Response:
    form = page.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert csrf is not None
    return page.post("/login", data={"username": user, "password": password, "csrf_token": csrf.group(1),
                                     "next": "/"})


def test_pages_need_a_session_and_csrf_and_escape_record_text(service: Service) -> None:
    # an exception whose vendor id is a script: it must render as text
    hostile: dict[str, Any] = {
               "id": f"receiving:hostile:{uuid.uuid4().hex[:6]}", "node": "receiving", "subject_key": "PO-X",
               "subject_id": "R-X", "decision": "EXCEPTION", "confidence": 0.2,
               "reasons": [{"code": "UNKNOWN_PO", "message": "<b>bold</b>", "severity": "BLOCK", "evidence": {}}],
               "model_version": "prior-1", "input_refs": [], "event_time": 0, "decision_time": 0,
               "vendor_id": "<script>alert(1)</script>", "lot_ids": ["L<img src=x>"], "priority": "HIGH",
               "route_to": "receiving", "recommended_action": "<i>x</i>", "historical_pattern": "", "features": {}}
    service.client.insert("exceptions", [exception_row(hostile, "t", 0, 0, datetime.now(UTC))],
                          column_names=list(EXCEPTION_COLUMNS), database=service.settings.clickhouse_database)
    with httpx.Client(base_url=service.url, timeout=30) as page:
        assert page.get("/queue/receiving").status_code == 303  # to the login page
        assert page.post(f"/exceptions/{hostile['id']}/decide", data={"resolution": "ACCEPT"}).status_code == 401
        form = page.get("/login")
        assert page.post("/login", data={"username": "rita", "password": PASSWORD, "csrf_token": "forged",
                                         "next": "/"}).status_code == 403
        wrong = _login(page, "rita", "not the password")
        assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
        assert form.status_code == 200
        ok = _login(page, "rita")
        assert ok.status_code == 303 and "httponly" in ok.headers["set-cookie"].lower()
        assert "samesite=strict" in ok.headers["set-cookie"].lower()
        queue = page.get("/queue/receiving")
        assert queue.status_code == 200 and hostile["id"] in queue.text
        assert "<script>alert(1)</script>" not in queue.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in queue.text
        assert page.get("/queue/supplier_quality").status_code == 403
        detail = page.get(f"/exceptions/{hostile['id']}")
        assert detail.status_code == 200
        for raw in ("<script>alert(1)</script>", "<b>bold</b>", "<i>x</i>", "<img src=x>"):
            assert raw not in detail.text
        assert "&lt;b&gt;bold&lt;/b&gt;" in detail.text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', detail.text)
        assert csrf is not None
        decision = {"resolution": "REJECT", "reasoning": "no such PO", "certainty": "95"}
        assert page.post(f"/exceptions/{hostile['id']}/decide", data=decision).status_code == 403  # no token
        done = page.post(f"/exceptions/{hostile['id']}/decide", data={**decision, "csrf_token": csrf.group(1)})
        assert done.status_code == 303
        assert hostile["id"] not in page.get("/queue/receiving").text
        again = page.post(f"/exceptions/{hostile['id']}/decide", data={**decision, "csrf_token": csrf.group(1)})
        assert again.status_code == 409 and "Already decided" in again.text


def test_login_attempts_are_rate_limited(service: Service) -> None:
    with httpx.Client(base_url=service.url, timeout=30) as page:
        codes = [_login(page, "sam", f"guess {i}").status_code for i in range(7)]
    assert codes[:5] == [401] * 5 and codes[5:] == [429, 429]


def test_a_decision_takes_effect_and_the_audit_chain_shows_tampering(service: Service) -> None:
    from lotflow.audit import verify_chain, why

    db = service.settings.clickhouse_database
    target, rejected = service.open_in("receiving", "rita")[:2]
    with service.api("rita") as rita:
        assert rita.post(f"/api/exceptions/{target['id']}/decision",
                         json={"resolution": "ACCEPT", "reasoning": "slip checked with the buyer",
                               "certainty": 0.95}).status_code == 201
        assert rita.post(f"/api/exceptions/{rejected['id']}/decision",
                         json={"resolution": "REJECT", "reasoning": "not ours", "certainty": 1.0}).status_code == 201

    def one(sql: str, **params: Any) -> list[tuple[Any, ...]]:
        return list(service.client.query(sql, parameters=params).result_rows)

    _wait("the person's release in ClickHouse", lambda: bool(one(
        f"SELECT 1 FROM {db}.verified FINAL WHERE exception_id = {{x:String}} AND decision_source = 'HUMAN'",
        x=target["id"])) and bool(one(f"SELECT 1 FROM {db}.lot_events FINAL WHERE event_type = 'REJECTED' "
                                      "AND attributes['exception_id'] = {x:String}", x=rejected["id"])))
    [(decided_by, lines)] = one(f"SELECT decided_by, lines FROM {db}.verified FINAL WHERE exception_id = {{x:String}}",
                                x=target["id"])
    assert decided_by == "rita" and target["lot_ids"][0] in lines
    released = one(f"SELECT lot_id FROM {db}.lot_events FINAL WHERE event_type = 'RELEASED' "
                   "AND attributes['exception_id'] = {x:String}", x=target["id"])
    assert sorted(r[0] for r in released) == sorted(target["lot_ids"])
    [(role, reasoning, certainty)] = one(f"SELECT role, reasoning, certainty FROM {db}.audit FINAL "
                                         "WHERE output_id = {o:String} AND actor = 'person:rita'",
                                         o=f"{target['id']}:released")
    assert (role, reasoning, certainty) == ("receiving", "slip checked with the buyer", 0.95)

    story = "\n".join(why(service.client, db, target["subject_id"]))
    assert "PERSON person:rita" in story and "RELEASED (by rita)" in story and "check " in story

    checked, broken = verify_chain(service.client, db)
    assert broken is None and checked >= 300  # one per decided receipt, plus the two decisions
    victim = one(f"SELECT id, kafka_partition, kafka_offset FROM {db}.audit FINAL "
                 "ORDER BY kafka_partition, kafka_offset LIMIT 1 OFFSET 5")[0]
    service.client.command(f"ALTER TABLE {db}.audit UPDATE reasoning = 'edited afterwards' WHERE id = '{victim[0]}'",
                           settings={"mutations_sync": 2})
    _, broken = verify_chain(service.client, db)
    assert broken is not None and broken.id == victim[0] and "altered" in broken.problem
    service.client.command(f"ALTER TABLE {db}.audit DELETE WHERE id = '{victim[0]}'", settings={"mutations_sync": 2})
    _, broken = verify_chain(service.client, db)
    assert broken is not None and broken.partition == victim[1] and "deleted or inserted" in broken.problem
