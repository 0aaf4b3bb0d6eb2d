"""The review service on the real broker, the real ClickHouse engine and a running worker:
queues per role, the API's status codes, one decision per exception, CSRF and escaping."""

from __future__ import annotations

import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from lotflow.sinks.rows import EXCEPTION_COLUMNS, exception_row

from .review_fixtures import PASSWORD, Service, decisions_on_kafka, service, wait_until

__all__ = ["service"]  # the fixture, imported for pytest


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
    wait_until("the reassigned exception in the QC queue", lambda: moved in {e["id"] for e in
                                                                          service.open_in("qc_technician", "quinn")})
    assert moved not in {e["id"] for e in service.open_in("receiving", "rita")}

    on_kafka = {d["exception_id"]: d for d in decisions_on_kafka(service.settings)}
    accepted = on_kafka[target["id"]]
    assert (accepted["resolution"], accepted["decided_by"], accepted["role"]) == ("ACCEPT", "rita", "receiving")
    assert accepted["reasoning"] == "recounted: the slip was right" and accepted["certainty"] == 0.9
    assert accepted["confidence_shown"] == pytest.approx(target["confidence"])
    assert on_kafka[moved]["resolution"] == "REASSIGN" and on_kafka[moved]["reassign_to"] == "qc_technician"
    assert len([d for d in decisions_on_kafka(service.settings) if d["exception_id"] == race]) == 1


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
    target, rejected, conditional = service.open_in("receiving", "rita")[:3]
    with service.api("rita") as rita:
        assert rita.post(f"/api/exceptions/{target['id']}/decision",
                         json={"resolution": "ACCEPT", "reasoning": "slip checked with the buyer",
                               "certainty": 0.95}).status_code == 201
        assert rita.post(f"/api/exceptions/{rejected['id']}/decision",
                         json={"resolution": "REJECT", "reasoning": "not ours", "certainty": 1.0}).status_code == 201
        assert rita.post(f"/api/exceptions/{conditional['id']}/decision",
                         json={"resolution": "CONDITIONAL_ACCEPT", "reasoning": "usable after rework",
                               "certainty": 0.7, "condition": "rework, deviation DV-17"}).status_code == 201

    def one(sql: str, **params: Any) -> list[tuple[Any, ...]]:
        return list(service.client.query(sql, parameters=params).result_rows)

    wait_until("the person's release in ClickHouse", lambda: bool(one(
        f"SELECT 1 FROM {db}.verified FINAL WHERE exception_id = {{x:String}} AND decision_source = 'HUMAN'",
        x=target["id"])) and bool(one(f"SELECT 1 FROM {db}.lot_events FINAL WHERE event_type = 'REJECTED' "
                                      "AND attributes['exception_id'] = {x:String}", x=rejected["id"])))
    wait_until("the conditional release in ClickHouse", lambda: bool(one(
        f"SELECT 1 FROM {db}.lot_events FINAL WHERE event_type = 'CONDITIONALLY_RELEASED' "
        "AND attributes['exception_id'] = {x:String}", x=conditional["id"])))
    [(condition,)] = one(f"SELECT condition FROM {db}.verified FINAL WHERE exception_id = {{x:String}}",
                         x=conditional["id"])
    assert condition == "rework, deviation DV-17"
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
