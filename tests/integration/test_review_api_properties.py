"""Property-based tests of the review service's JSON API, generated from its own OpenAPI document.

Schemathesis (4.x) reads ``/openapi.json`` from the running service and Hypothesis generates the
requests: every API operation, as admin (valid bearer token) and unauthenticated (no or a made-up
token), with inputs that fit the schema and inputs that break it, on generated exception ids and on
real ones (so a decision gets written and then answers 409), plus a few inputs parsers choke on
(NaN, 1e400, lone surrogates, bytes that are no UTF-8). Every response must be no 5xx, have a
documented status code, and match the documented schema for it; an unauthenticated call never gets
a 2xx. Failures are collected for the whole run (no shrinking, to keep it bounded) and reported
together, each with its request.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from .review_fixtures import Service, service, wait_until

__all__ = ["service"]  # the fixture, imported for pytest

OPERATIONS = {
    ("GET", "/api/queues"),
    ("GET", "/api/exceptions"),
    ("GET", "/api/exceptions/{exception_id}"),
    ("POST", "/api/exceptions/{exception_id}/decision"),
    ("POST", "/api/exceptions/{exception_id}/reassign"),
}
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
# examples per operation and run: 5 operations x (50 + 30 + 30 + 20) + 3 x 40 on real ids ~ 750 requests
POSITIVE, NEGATIVE, ANON_POSITIVE, ANON_NEGATIVE, ON_REAL_IDS = 50, 30, 30, 20, 40


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


@dataclass
class Run:
    """Sends cases, checks the responses and keeps the first request of each distinct failure."""

    service: Service
    http: requests.Session = field(default_factory=requests.Session)
    failures: dict[tuple[str, str, str, int], str] = field(default_factory=dict)
    counts: Counter[tuple[str, str, str, int]] = field(default_factory=Counter)
    statuses: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    nothing_to_negate: list[str] = field(default_factory=list)

    def send(self, case: Case, who: str) -> None:
        response = case.call(base_url=self.service.url, session=self.http, timeout=60)
        status = response.status_code
        self.statuses[(case.operation.label, who, status)] += 1
        found: list[tuple[str, str]] = []
        try:
            case.validate_response(response, checks=CHECKS, headers=dict(case.headers or {}),
                                   transport_kwargs={"base_url": self.service.url, "session": self.http})
        except FailureGroup as group:
            found += [(type(f).__name__, f"{f.title}\n{f.message}") for f in group.exceptions]
        if who == "anonymous" and 200 <= status < 300:
            found.append(("AnonymousSuccess", "an unauthenticated call got a 2xx"))
        for kind, message in found:
            key = (case.operation.label, who, kind, status)
            self.counts[key] += 1
            self.failures.setdefault(key, self._describe(response, message))

    def send_raw(self, method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> None:
        """A request schemathesis cannot make (bytes that are no UTF-8 in the path or query): no 5xx."""
        response = self.http.request(method, self.service.url + path, headers=headers, data=body, timeout=60)
        self.statuses[(f"{method} {path}", "admin", response.status_code)] += 1
        if response.status_code >= 500:
            key = (f"{method} {path}", "admin", "ServerError", response.status_code)
            self.counts[key] += 1
            self.failures.setdefault(key, self._describe(response, "Server error"))

    def _describe(self, response: Any, message: str) -> str:
        request = response.request
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        for name, token in self.service.tokens.items():
            headers = {k: v.replace(token, f"<{name} token>") for k, v in headers.items()}
        body = request.body
        if isinstance(body, bytes):
            with contextlib.suppress(UnicodeDecodeError):  # else shown as bytes
                body = body.decode()
        return (f"    {request.method} {request.url}\n    headers: {headers}\n    body: {body!r}\n"
                f"    -> {response.status_code}: {response.text[:1500]}\n    {message.strip()[:1500]}")

    def explore(self, strategy: st.SearchStrategy[Case], who: str, examples: int,
                explicit: tuple[Case, ...] = (), anonymous: bool = False, negative: str = "") -> None:
        """Send ``examples`` generated cases (and the explicit ones first); ``negative``: the
        operation, when the cases break the schema (an operation may have nothing to break)."""

        @_settings(examples)
        @given(case=strategy, drop_token=st.booleans())
        def send_one(case: Case, drop_token: bool) -> None:
            if anonymous and drop_token:
                case.headers.pop("Authorization", None)
            self.send(case, who)

        for case in reversed(explicit):  # Hypothesis runs the last one added first
            send_one = example(case=case, drop_token=False)(send_one)
        try:
            send_one()
        except Unsatisfiable:
            if not negative:
                raise
            self.nothing_to_negate.append(f"{negative} as {who}")

    def report(self) -> str:
        lines = [f"{len(self.failures)} distinct failures (operation, caller, failure, status x count):"]
        for key, text in sorted(self.failures.items()):
            lines.append(f"- {key[0]} as {key[1]}: {key[2]} on {key[3]} (x{self.counts[key]})\n{text}")
        return "\n".join(lines)


def test_every_api_operation_with_generated_requests(service: Service) -> None:
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json", timeout=30)
    results = list(schema.get_all_operations())
    loaded = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(loaded) == len(results), [result for result in results if not isinstance(result, Ok)]
    assert {(op.method.upper(), op.path) for op in loaded} == OPERATIONS, "other operations than expected"
    operations = {op.path: op for op in loaded}  # one method per path
    admin = {"Authorization": f"Bearer {service.tokens['admin']}"}
    real: dict[str, list[str]] = {}

    def enough_open() -> bool:  # the sink is still storing exceptions when the fixture starts
        real.update({q: [e["id"] for e in service.open_in(q)] for q in ("receiving", "supplier_quality")})
        return all(len(ids) >= 8 for ids in real.values())

    wait_until("8 open exceptions in each of receiving and supplier_quality", enough_open)
    run = Run(service)

    # 1. generated ids, queries and bodies: valid per the schema and invalid, admin and anonymous
    for op in loaded:
        run.explore(op.as_strategy(GenerationMode.POSITIVE, headers=admin), "admin", POSITIVE)
        run.explore(op.as_strategy(GenerationMode.NEGATIVE, headers=admin), "admin", NEGATIVE, negative=op.label)
        run.explore(op.as_strategy(GenerationMode.POSITIVE), "anonymous", ANON_POSITIVE, anonymous=True)
        run.explore(op.as_strategy(GenerationMode.NEGATIVE), "anonymous", ANON_NEGATIVE, anonymous=True,
                    negative=op.label)

    # 2. inputs JSON and query parsing have choked on before: out-of-range and non-finite numbers,
    # a lone surrogate (each was a 500 once, when the 422 echoed the input back)
    listing = operations["/api/exceptions"]
    for value in ("NaN", "Infinity", "-inf", "1e400"):
        run.send(listing.Case(query={"queue": "receiving", "max_confidence": value}, headers=admin), "admin")
        run.send(listing.Case(query={"queue": "receiving", "limit": value}, headers=admin), "admin")
    awkward = {"/api/exceptions/{exception_id}/decision": [
        b'{"resolution": "ACCEPT", "reasoning": "r", "certainty": NaN}',
        b'{"resolution": "ACCEPT", "reasoning": "r", "certainty": -Infinity}',
        b'{"resolution": "ACCEPT", "reasoning": "r", "certainty": 1e400}',
        b'{"resolution": "ACCEPT", "reasoning": "\\ud800", "certainty": 2}',
        b'{"resolution": "NOPE\\udfff", "reasoning": "r", "certainty": 0.5}',
    ], "/api/exceptions/{exception_id}/reassign": [
        b'{"queue": "qc_technician", "note": 1e400}',
        b'{"queue": "nowhere\\ud800", "note": "n"}',
    ]}
    for path, bodies in awkward.items():
        for body in bodies:
            run.send(operations[path].Case(path_parameters={"exception_id": real["receiving"][-1]}, headers=admin,
                                           body=body, media_type="application/json"), "admin")

    json_type = {**admin, "Content-Type": "application/json"}
    decide = b'{"resolution": "ACCEPT", "reasoning": "r", "certainty": 0.5}'
    for path in ("/api/exceptions/%ED%A0%80", "/api/exceptions/%FF%FE", "/api/exceptions/%00",
                 "/api/exceptions?queue=receiving&vendor=%FF&reason=%ED%A0%80&material=%00"):
        run.send_raw("GET", path, admin)
    run.send_raw("POST", "/api/exceptions/%ED%A0%80%00/decision", json_type, decide)

    # 3. real exception ids, so detail, reassign and decision get past the 404
    detail, reassign, decision = (operations["/api/exceptions/{exception_id}"],
                                  operations["/api/exceptions/{exception_id}/reassign"],
                                  operations["/api/exceptions/{exception_id}/decision"])

    def on(op: Any, ids: list[str]) -> st.SearchStrategy[Case]:
        return st.sampled_from(ids).flatmap(
            lambda i: op.as_strategy(GenerationMode.POSITIVE, headers=admin, path_parameters={"exception_id": i}))

    def case(op: Any, exception_id: str, body: dict[str, Any]) -> Case:
        return op.Case(path_parameters={"exception_id": exception_id}, headers=admin, body=body,
                       media_type="application/json")

    run.explore(on(detail, real["receiving"][:10] + real["supplier_quality"][:10]), "admin", ON_REAL_IDS)
    blank_note = case(reassign, real["supplier_quality"][0], {"queue": "qc_technician", "note": "  "})
    run.explore(on(reassign, real["supplier_quality"][:5]), "admin", ON_REAL_IDS, (blank_note,))
    first, *others = real["receiving"][:6]
    accept = {"resolution": "ACCEPT", "reasoning": "recounted", "certainty": 0.9}
    explicit = (
        case(decision, first, {"resolution": "CONDITIONAL_ACCEPT", "reasoning": "rework", "certainty": 0.5}),
        case(decision, first, {"resolution": "ACCEPT", "reasoning": "   ", "certainty": 0.5}),
        case(decision, first, accept),
        case(decision, first, accept),  # 409 with the first decision
    )
    run.explore(on(decision, others), "admin", ON_REAL_IDS, explicit)

    summary = "\n".join(f"  {op} as {who}: {status} x{n}" for (op, who, status), n in sorted(run.statuses.items()))
    print(f"\nstatus codes seen:\n{summary}\nno invalid inputs to generate: {run.nothing_to_negate}")
    # the real ids got past the 404: a detail, a reassignment, decisions and the 409 after one
    wanted = ((detail, 200), (reassign, 201), (decision, 201), (decision, 409))
    unreached = [f"{op.label} never answered {status}" for op, status in wanted
                 if run.statuses[(op.label, "admin", status)] == 0]
    if run.failures or unreached:
        pytest.fail("\n".join([run.report(), *unreached, "", "status codes seen:", summary]), pytrace=False)
