"""The review service: queues, exception detail, decisions — HTML pages and a JSON API.

Pages authenticate with a session cookie (``lotflow/review/security.py``) and every form
carries a CSRF token; the JSON API (``/api/...``, described by ``/openapi.json``) takes bearer
tokens issued with ``lotflow users token``. A user sees and decides only the queues of her
roles (403 otherwise); admin sees all. Templates autoescape everything they print.

No ``from __future__ import annotations`` here: FastAPI must evaluate the endpoints' annotations,
which name dependencies local to ``create_app`` (as strings they resolve to nothing and turn into
required query parameters).
"""


import dataclasses
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field, model_validator

from lotflow.review.decisions import AlreadyDecided, Decision, DecisionWriter, Resolution
from lotflow.review.evidence import side_by_side
from lotflow.review.inputs import InputReader
from lotflow.review.security import LoginLimiter, Sessions, same_token
from lotflow.review.store import DecisionRow, ExceptionRow, QueueFilter, ReviewStore
from lotflow.review.users import User, UserStore
from lotflow.verification.queues import Queue

__all__ = ["ReviewServices", "create_app"]

SESSION_COOKIE = "lotflow_session"
PASSWORD_CHECKS_AT_ONCE = 4
LOGIN_CSRF_COOKIE = "lotflow_login_csrf"
TEMPLATES = Path(__file__).parent / "templates"


@dataclass
class ReviewServices:
    """What the app reads and writes through; ``specs`` returns the material specs in force."""

    store: ReviewStore
    users: UserStore
    decisions: DecisionWriter
    inputs: InputReader | None = None
    specs: Callable[[], dict[str, Any]] = dict


class _NeedsLogin(Exception):
    pass


# --- API models ---------------------------------------------------------------------------
NOT_BLANK = r"\S"  # at least one character that is not white space


class DecisionIn(BaseModel):
    resolution: Literal["ACCEPT", "CONDITIONAL_ACCEPT", "REJECT"]
    reasoning: str = Field(min_length=1, max_length=4000, pattern=NOT_BLANK)
    certainty: float = Field(ge=0.0, le=1.0, description="how sure the person is, 0..1")
    condition: str = Field(default="", max_length=4000,
                           description="required (not blank) for CONDITIONAL_ACCEPT: rework, or use-as-is with "
                                       "deviation number")
    rebaseline: bool = Field(default=False, description="an accept that re-baselines the control charts of the "
                             "exception's CoA properties (a new test method, a new source)")

    @model_validator(mode="after")
    def _condition_when_conditional(self) -> "DecisionIn":
        if self.resolution == "CONDITIONAL_ACCEPT" and not self.condition.strip():
            raise ValueError("a conditional accept needs its condition")
        if self.rebaseline and self.resolution == "REJECT":
            raise ValueError("only an accept can re-baseline the control charts")
        return self


class ReassignIn(BaseModel):
    queue: Literal["receiving", "supplier_quality", "qc_technician", "operations_analyst",
                   "manufacturing_engineering"]
    note: str = Field(min_length=1, max_length=4000, pattern=NOT_BLANK, description="why it moves")


class ErrorOut(BaseModel):
    detail: str


Responses = dict[int | str, dict[str, Any]]
_AUTH: Responses = {401: {"model": ErrorOut, "description": "no valid API token"},
         403: {"model": ErrorOut, "description": "the caller has no role for the exception's queue"}}
_FOUND: Responses = {404: {"model": ErrorOut, "description": "no such exception"}}
_WRITE: Responses = {**_AUTH, **_FOUND, 400: {"model": ErrorOut, "description": "the body could not be parsed"}}


class ExceptionOut(BaseModel):
    id: str
    subject_key: str
    subject_id: str
    queue: str
    priority: str
    confidence: float
    reason_codes: list[str]
    vendor_id: str
    material_id: str
    lot_ids: list[str]
    event_time: str
    decision_time: str
    age_s: float


class ExceptionDetailOut(ExceptionOut):
    recommended_action: str
    historical_pattern: str
    reasons: list[dict[str, Any]]
    contributions: list[dict[str, Any]]
    pattern: dict[str, Any]
    pattern_stored: dict[str, int]
    features: dict[str, float]
    input_refs: list[dict[str, Any]]
    model_version: str
    decisions: list[dict[str, Any]]


class DecisionOut(BaseModel):
    decision_id: str
    exception_id: str
    resolution: str
    decided_by: str
    role: str
    decided_at: int | str
    reasoning: str
    certainty: float
    condition: str
    reassign_to: str
    confidence_shown: float


class ConflictOut(BaseModel):
    detail: str
    first_decision: DecisionOut


_write_responses: Responses = {**_WRITE, 409: {"model": ConflictOut,
                                                                    "description": "already decided: the first "
                                                                                   "decision"}}


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -1.0


def _summary(row: ExceptionRow, now: float) -> dict[str, Any]:
    return {"id": row.id, "subject_key": row.subject_key, "subject_id": row.subject_id, "queue": row.queue,
            "priority": row.priority, "confidence": _finite(row.confidence), "reason_codes": row.reason_codes,
            "vendor_id": row.vendor_id, "material_id": row.material_id, "lot_ids": row.lot_ids,
            "event_time": row.event_time.isoformat(), "decision_time": row.decision_time.isoformat(),
            "age_s": round(max(0.0, now - row.decision_time.timestamp()), 1)}


def _decision_out(record: dict[str, Any] | DecisionRow) -> dict[str, Any]:
    data = asdict(record) if isinstance(record, DecisionRow) else dict(record)
    decided_at = data["decided_at"]
    data["decided_at"] = decided_at if isinstance(decided_at, int) else decided_at.isoformat()
    return {name: data.get(name, "") for name in DecisionOut.model_fields}


def create_app(services: ReviewServices, *, secure_cookies: bool = False,
               clock: Callable[[], float] | None = None) -> FastAPI:
    """The ASGI app; ``secure_cookies`` when served over TLS (direct or behind a TLS proxy)."""
    import time

    now = clock or time.time
    app = FastAPI(title="lotflow review", version="1",
                  description="Resolve lotflow's exceptions: queues per role, detail with evidence, decisions.")
    templates = Jinja2Templates(directory=str(TEMPLATES))  # autoescape on for .html
    sessions = Sessions()
    limiter = LoginLimiter()
    hashing = threading.BoundedSemaphore(PASSWORD_CHECKS_AT_ONCE)
    bearer = HTTPBearer(auto_error=False, description="an API token from `lotflow users token NAME`")
    store, users, writer = services.store, services.users, services.decisions

    def exclude() -> Iterable[str]:
        return writer.decided_ids()

    # --- who is asking --------------------------------------------------------------------
    def page_user(request: Request) -> User:
        session = sessions.get(request.cookies.get(SESSION_COOKIE))
        user = users.get(session.username) if session is not None else None
        if session is None or user is None or user.disabled:
            raise _NeedsLogin()
        request.state.csrf = session.csrf
        return user

    def api_user(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> User:
        user = users.authenticate_token(credentials.credentials) if credentials is not None else None
        if user is None:
            raise HTTPException(401, "a valid API token is required", headers={"WWW-Authenticate": "Bearer"})
        return user

    def check_csrf(request: Request, token: str) -> None:
        if not same_token(token, getattr(request.state, "csrf", None)):
            raise HTTPException(403, "missing or wrong CSRF token")

    def visible(user: User, queue: str) -> None:
        if not user.may_decide(queue):
            raise HTTPException(403, f"{user.username} has no role for the {queue} queue")

    def load(exception_id: str, user: User) -> ExceptionRow:
        row = store.exception(exception_id)
        if row is None:
            raise HTTPException(404, "no such exception")
        moved = writer.moved_to(row.id)  # reassigned here, not stored yet: it is in its new queue already
        if moved is not None and moved != row.queue:
            row = dataclasses.replace(row, queue=moved)
        visible(user, row.queue)
        return row

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI's own handler echoes the input back: it cannot render NaN, 1e400 or a lone
        # surrogate (a 500), and it would echo a password. Where and what, never the value.
        errors = [{"loc": [str(part) for part in error.get("loc", ())], "msg": str(error.get("msg", "")),
                   "type": str(error.get("type", ""))} for error in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if not request.url.path.startswith(("/docs", "/redoc")):  # FastAPI's docs page loads its assets
            response.headers.setdefault("Content-Security-Policy",
                                        "default-src 'self'; style-src 'self' 'unsafe-inline'; form-action 'self'; "
                                        "frame-ancestors 'none'")
        if request.url.path != "/login" and request.method == "GET":
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(_NeedsLogin)
    async def to_login(request: Request, exc: _NeedsLogin) -> Response:
        if request.method != "GET":
            return JSONResponse({"detail": "log in first"}, status_code=401)
        return RedirectResponse(f"/login?next={request.url.path}", status_code=303)

    def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"queues": list(Queue), **context}, status_code=status)

    # --- login -----------------------------------------------------------------------------
    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request, next: str = "/") -> Response:
        import secrets

        token = secrets.token_urlsafe(32)
        response = render(request, "login.html", csrf=token, next=_safe_next(next), error="")
        response.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=600, httponly=True, samesite="strict",
                            secure=secure_cookies)
        return response

    @app.post("/login", include_in_schema=False)
    def login(request: Request, username: Annotated[str, Form(max_length=64)],
              password: Annotated[str, Form(max_length=1024)], csrf_token: Annotated[str, Form()] = "",
              next: Annotated[str, Form()] = "/") -> Response:
        if not same_token(csrf_token, request.cookies.get(LOGIN_CSRF_COOKIE)):
            raise HTTPException(403, "missing or wrong CSRF token")
        client = request.client.host if request.client else "?"
        wait = limiter.attempt(username, client)  # counted as a failure until it succeeds
        if wait > 0:
            return render(request, "login.html", 429, csrf=csrf_token, next=_safe_next(next),
                          error=f"Too many failed attempts: try again in {math.ceil(wait)} s.")
        with hashing:  # argon2 takes 64 MiB a check: a burst of logins must not take the memory
            user = users.authenticate_password(username, password)
        if user is None:
            return render(request, "login.html", 401, csrf=csrf_token, next=_safe_next(next),
                          error="Wrong user name or password.")
        limiter.succeeded(username, client)
        token, _ = sessions.create(user.username)
        response = RedirectResponse(_safe_next(next), status_code=303)
        response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", secure=secure_cookies)
        response.delete_cookie(LOGIN_CSRF_COOKIE)
        return response

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, user: Annotated[User, Depends(page_user)],
               csrf_token: Annotated[str, Form()] = "") -> Response:
        check_csrf(request, csrf_token)
        sessions.drop(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    # --- pages ----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def home(user: Annotated[User, Depends(page_user)]) -> Response:
        first = sorted(user.queues, key=list(Queue).index)
        return RedirectResponse(f"/queue/{first[0].value}" if first else "/login", status_code=303)

    @app.get("/queue/{queue}", response_class=HTMLResponse, include_in_schema=False)
    def queue_page(request: Request, queue: Queue, user: Annotated[User, Depends(page_user)],
                   vendor: str = "", material: str = "", reason: str = "", priority: str = "",
                   decided: str = "") -> Response:
        visible(user, queue.value)
        f = QueueFilter(vendor=vendor[:64], material=material[:64], reason=reason[:64],
                        priority=priority if priority in ("HIGH", "NORMAL") else "")
        rows = store.open_exceptions([queue.value], f, exclude())
        mine = sorted(user.queues, key=list(Queue).index)
        counts = store.queue_counts([q.value for q in mine], exclude())
        recorded = decided if decided in set(writer.decided_ids()) else ""
        return render(request, "queue.html", user=user, queue=queue, rows=rows, counts=counts, my_queues=mine,
                      filters=f, decided=recorded, now=now(), csrf=request.state.csrf)

    @app.get("/exceptions/{exception_id}", response_class=HTMLResponse, include_in_schema=False)
    def detail_page(request: Request, exception_id: str, user: Annotated[User, Depends(page_user)]) -> Response:
        row = load(exception_id, user)
        return render(request, "detail.html", user=user, row=row, csrf=request.state.csrf, now=now(),
                      **_detail_context(services, row))

    @app.post("/exceptions/{exception_id}/decide", include_in_schema=False)
    def decide_form(request: Request, exception_id: str, user: Annotated[User, Depends(page_user)],
                    resolution: Annotated[str, Form()], reasoning: Annotated[str, Form(max_length=4000)] = "",
                    certainty: Annotated[str, Form()] = "", condition: Annotated[str, Form(max_length=4000)] = "",
                    reassign_to: Annotated[str, Form()] = "", rebaseline: Annotated[str, Form()] = "",
                    csrf_token: Annotated[str, Form()] = "") -> Response:
        check_csrf(request, csrf_token)
        row = load(exception_id, user)
        try:
            decision = Decision(Resolution(resolution), reasoning, _percent(certainty), condition, reassign_to,
                                rebaseline=rebaseline == "on")
        except ValueError as exc:
            return render(request, "detail.html", 422, user=user, row=row, csrf=request.state.csrf, now=now(),
                          error=str(exc), **_detail_context(services, row))
        try:
            _write(writer, row, decision, user)
        except AlreadyDecided as exc:
            return render(request, "detail.html", 409, user=user, row=row, csrf=request.state.csrf, now=now(),
                          first=exc.first, **_detail_context(services, row))
        return RedirectResponse(f"/queue/{row.queue}?decided={row.id}", status_code=303)

    # --- JSON API ---------------------------------------------------------------------------
    @app.get("/api/queues", tags=["queues"], responses={401: _AUTH[401]})
    def api_queues(user: Annotated[User, Depends(api_user)]) -> dict[str, int]:
        """Open exceptions per queue of the caller's roles."""
        return store.queue_counts([q.value for q in sorted(user.queues, key=list(Queue).index)], exclude())

    @app.get("/api/exceptions", tags=["exceptions"], response_model=list[ExceptionOut], responses=_AUTH)
    def api_list(user: Annotated[User, Depends(api_user)], queue: Queue,
                 vendor: Annotated[str, Query(max_length=64)] = "",
                 material: Annotated[str, Query(max_length=64)] = "",
                 reason: Annotated[str, Query(max_length=64)] = "",
                 priority: Literal["", "HIGH", "NORMAL"] = "",
                 max_confidence: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
                 limit: Annotated[int, Query(ge=1, le=500)] = 100,
                 offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0) -> list[dict[str, Any]]:
        """Open exceptions of one queue: HIGH priority first, then oldest first."""
        visible(user, queue.value)
        f = QueueFilter(vendor, material, reason, priority, max_confidence, limit, offset)
        t = now()
        return [_summary(r, t) for r in store.open_exceptions([queue.value], f, exclude())]

    @app.get("/api/exceptions/{exception_id}", tags=["exceptions"], response_model=ExceptionDetailOut,
             responses={**_AUTH, **_FOUND})
    def api_detail(exception_id: str, user: Annotated[User, Depends(api_user)]) -> dict[str, Any]:
        """One exception with its reasons, contributions, historical pattern and decisions."""
        row = load(exception_id, user)
        ctx = _detail_context(services, row, with_inputs=False)
        return {**_summary(row, now()), "recommended_action": row.recommended_action,
                "historical_pattern": row.historical_pattern, "reasons": row.reasons or [],
                "contributions": row.contributions or [], "pattern": row.pattern or {},
                "pattern_stored": ctx["pattern_stored"], "features": {k: _finite(v) for k, v in
                                                                       (row.features or {}).items()},
                "input_refs": row.input_refs or [], "model_version": row.model_version,
                "decisions": [_decision_out(d) for d in ctx["decisions"]]}

    @app.post("/api/exceptions/{exception_id}/decision", tags=["decisions"], status_code=201,
              response_model=DecisionOut, responses=_write_responses)
    def api_decide(exception_id: str, body: DecisionIn, user: Annotated[User, Depends(api_user)]) -> Any:
        """Accept, conditionally accept or reject; 409 with the first decision if it was decided."""
        row = load(exception_id, user)
        try:
            decision = Decision(Resolution(body.resolution), body.reasoning, body.certainty, body.condition,
                                rebaseline=body.rebaseline)
        except ValueError as exc:  # the model already checked these: in the validation errors' shape anyway
            return _invalid("body", str(exc))
        return _api_write(writer, row, decision, user)

    @app.post("/api/exceptions/{exception_id}/reassign", tags=["decisions"], status_code=201,
              response_model=DecisionOut, responses=_write_responses)
    def api_reassign(exception_id: str, body: ReassignIn, user: Annotated[User, Depends(api_user)]) -> Any:
        """Move an open exception to another queue, with a note (it stays open there)."""
        row = load(exception_id, user)
        try:
            decision = Decision(Resolution.REASSIGN, body.note, 1.0, reassign_to=body.queue)
        except ValueError as exc:
            return _invalid("body", str(exc))
        return _api_write(writer, row, decision, user)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    return app


def _invalid(where: str, message: str) -> JSONResponse:
    """A 422 in the shape of FastAPI's validation errors (what the OpenAPI document promises)."""
    return JSONResponse({"detail": [{"loc": [where], "msg": message, "type": "value_error"}]}, status_code=422)


def _api_write(writer: DecisionWriter, row: ExceptionRow, decision: Decision, user: User) -> Any:
    try:
        return _decision_out(_write(writer, row, decision, user))
    except AlreadyDecided as exc:
        first = _decision_out(exc.first)
        return JSONResponse({"detail": str(exc), "first_decision": first}, status_code=409)


def _write(writer: DecisionWriter, row: ExceptionRow, decision: Decision, user: User) -> dict[str, Any]:
    role = "admin" if user.is_admin and row.queue not in {r.value for r in user.roles} else row.queue
    return writer.decide(exception_id=row.id, node="receiving", subject_key=row.subject_key, decision=decision,
                         user=user.username, role=role, confidence_shown=_finite(row.confidence))


def _percent(text: str) -> float:
    """Certainty as typed in the form (0-100 %) -> 0..1; ValueError for anything else."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("certainty must be a number from 0 to 100 (%)") from None
    if not 0.0 <= value <= 100.0:  # also refuses NaN
        raise ValueError("certainty must be a number from 0 to 100 (%)")
    return value / 100.0


def _safe_next(target: str) -> str:
    """Only a path on this site (no scheme, no //host): an open redirect would help phishing."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target[:500]


def _detail_context(services: ReviewServices, row: ExceptionRow, with_inputs: bool = True) -> dict[str, Any]:
    store = services.store
    code = (row.pattern or {}).get("reason_code") or (row.reason_codes[0] if row.reason_codes else "")
    context: dict[str, Any] = {
        "pattern_stored": store.pattern(row.vendor_id, row.material_id, code),
        "pattern_code": code,
        "decisions": store.decisions_on(row.id),
        "earlier": store.earlier_decisions(row.vendor_id, row.material_id),
        "lot_events": store.lot_events(row.lot_ids),
        "lines": [], "inputs_missing": False,
    }
    if with_inputs and services.inputs is not None and row.input_refs:
        records = services.inputs.read(row.input_refs)
        receipts = [r for name, r in records if name == "plant.receipts"]
        pos = [r for name, r in records if name == "erp.purchase-orders"]
        coas = [r for name, r in records if name == "plant.certificates-of-analysis"]
        if receipts:
            context["lines"] = side_by_side(receipts[0], pos[0] if pos else None, coas, services.specs(),
                                            row.reasons or [])
        else:
            context["inputs_missing"] = True
    return context
