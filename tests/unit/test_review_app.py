"""The review app built with a store and a producer standing in for ClickHouse and Kafka: routing,
authentication, validation without 500s. (The integration tests run it on the real ones.)"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient

from lotflow.review.app import ReviewServices, create_app
from lotflow.review.decisions import DecisionWriter
from lotflow.review.store import DecisionRow, ExceptionRow, QueueFilter
from lotflow.review.users import UserStore
from lotflow.settings import Settings

T = datetime(2026, 1, 1, tzinfo=UTC)
PASSWORD = "password for tests"


def row(xid: str, queue: str) -> ExceptionRow:
    return ExceptionRow(id=xid, subject_key="PO-1", subject_id="R-1", queue=queue, priority="HIGH", confidence=0.2,
                        reason_codes=["COA_OUT_OF_SPEC"], vendor_id="V-1", material_id="MAT-1", lot_ids=["L-1"],
                        event_time=T, decision_time=T, reasons=[], contributions=[], pattern={}, features={},
                        input_refs=[], model_version="m1")


@dataclass
class StandInStore:
    """Answers what the app asks ClickHouse, from a dict (this test is about the app, not SQL)."""

    rows: dict[str, ExceptionRow]
    decisions: list[DecisionRow] = field(default_factory=list)

    def open_exceptions(self, queues: Any, f: QueueFilter | None = None, exclude: Any = ()) -> list[ExceptionRow]:
        return [r for r in self.rows.values() if r.queue in set(queues) and r.id not in set(exclude)]

    def queue_counts(self, queues: Any, exclude: Any = ()) -> dict[str, int]:
        return {q: len(self.open_exceptions([q], exclude=exclude)) for q in queues}

    def exception(self, xid: str) -> ExceptionRow | None:
        return self.rows.get(xid)

    def decisions_on(self, xid: str) -> list[DecisionRow]:
        return [d for d in self.decisions if d.exception_id == xid]

    def earlier_decisions(self, vendor: str, material: str) -> list[tuple[DecisionRow, str]]:
        return []

    def lot_events(self, lots: Any) -> list[dict[str, Any]]:
        return []

    def pattern(self, vendor: str, material: str, code: str) -> dict[str, int]:
        return {"prior_receipts": 0, "with_reason": 0, "decided_by_person": 0, "accepted_by_person": 0}


class Produced:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Any = None) -> None:
        self.sent.append((topic, key, value))
        if on_delivery is not None:
            on_delivery(None, None)

    def flush(self, timeout: float | None = None) -> int:
        return 0


@pytest.fixture
def app(tmp_path: Path) -> tuple[TestClient, dict[str, str], Produced]:
    users = UserStore(tmp_path / "users.json", hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
    tokens = {}
    for name, role in (("rita", "receiving"), ("sam", "supplier_quality"), ("root", "admin"),
                       ("quinn", "qc_technician")):
        users.add(name, [role], PASSWORD)
        tokens[name] = users.issue_token(name)
    store = StandInStore({"x1": row("x1", "receiving"), "x2": row("x2", "supplier_quality"),
                          "x3": row("x3", "receiving")})
    produced = Produced()
    writer = DecisionWriter(Settings(), lambda xid: None, producer=produced)  # type: ignore[arg-type]
    services = ReviewServices(store=store, users=users, decisions=writer)  # type: ignore[arg-type]
    return TestClient(create_app(services)), tokens, produced


def bearer(tokens: dict[str, str], who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens[who]}"}


def test_the_api_answers_a_token_and_refuses_without_one(app: tuple[TestClient, dict[str, str], Produced]) -> None:
    client, tokens, _ = app
    assert client.get("/api/queues", headers=bearer(tokens, "rita")).json() == {"receiving": 2}
    assert client.get("/api/queues").status_code == 401
    assert client.get("/api/queues", headers={"Authorization": "Bearer lft_forged"}).status_code == 401
    assert client.get("/api/exceptions/x2", headers=bearer(tokens, "rita")).status_code == 403
    assert client.get("/api/exceptions/x2", headers=bearer(tokens, "root")).status_code == 200


@pytest.mark.parametrize("body", [
    b'{"resolution": "ACCEPT", "reasoning": "x", "certainty": NaN}',
    b'{"resolution": "ACCEPT", "reasoning": "x", "certainty": 1e400}',
    b'{"resolution": "ACCEPT", "reasoning": "\\ud800", "certainty": 0.5}',
    b'{"resolution": "MAYBE", "reasoning": "x", "certainty": 0.5}',
    b'not json', b'[]', b'{}',
])
def test_malformed_decisions_are_422_never_500(app: tuple[TestClient, dict[str, str], Produced], body: bytes) -> None:
    client, tokens, produced = app
    answer = client.post("/api/exceptions/x1/decision", content=body,
                         headers={**bearer(tokens, "rita"), "Content-Type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert not produced.sent


def test_a_reassignment_moves_the_exception_at_once(app: tuple[TestClient, dict[str, str], Produced]) -> None:
    client, tokens, produced = app
    moved = client.post("/api/exceptions/x1/reassign", json={"queue": "qc_technician", "note": "re-weigh"},
                        headers=bearer(tokens, "rita"))
    assert moved.status_code == 201
    decide = {"resolution": "ACCEPT", "reasoning": "fine", "certainty": 0.9}
    assert client.post("/api/exceptions/x1/decision", json=decide, headers=bearer(tokens, "rita")).status_code == 403
    assert client.post("/api/exceptions/x1/decision", json=decide, headers=bearer(tokens, "quinn")).status_code == 201
    assert len(produced.sent) == 2


def test_parallel_password_guesses_are_counted_before_they_are_checked(
        app: tuple[TestClient, dict[str, str], Produced]) -> None:
    client, _, _ = app
    form = client.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert csrf is not None

    def guess(i: int) -> int:
        return client.post("/login", data={"username": "sam", "password": f"guess {i}", "csrf_token": csrf.group(1),
                                           "next": "/"}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(guess, range(16)))
    assert codes.count(401) == 5 and codes.count(429) == 11


def test_pages_carry_security_headers(app: tuple[TestClient, dict[str, str], Produced]) -> None:
    client, _, _ = app
    page = client.get("/login")
    assert page.headers["X-Frame-Options"] == "DENY" and page.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    cookie = page.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie


def test_an_accept_may_rebaseline_the_charts_a_reject_may_not(app: tuple[TestClient, dict[str, str], Produced]) -> None:
    from lotflow.schemas.serde import AvroCodec, schema_source
    from lotflow.streams import topics

    client, tokens, produced = app
    body = {"resolution": "REJECT", "reasoning": "off", "certainty": 0.9, "rebaseline": True}
    assert client.post("/api/exceptions/x1/decision", json=body, headers=bearer(tokens, "rita")).status_code == 422
    body = {**body, "resolution": "ACCEPT", "reasoning": "new test method"}
    assert client.post("/api/exceptions/x1/decision", json=body, headers=bearer(tokens, "rita")).status_code == 201
    codec = AvroCodec(schema_source(None), "x", topics.DECISIONS.schema)
    [(_, _, value)] = produced.sent
    assert codec.decode(value)["rebaseline"] is True
