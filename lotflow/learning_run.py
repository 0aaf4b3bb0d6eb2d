"""``lotflow learning-demo``: does the worker learn from people? The learning run, end to end.

Starts what the demo starts (the local broker if none answers, a fresh topic set and ClickHouse
database, migrations, a worker process) plus the review service in this process (it owns the
embedded engine, so the sink runs here in a thread, as ``lotflow review`` does), with an admin
user and API token for a simulated reviewer. Then:

1. the simulator publishes its stream (``--faults learning`` by default: a new fault pattern,
   ``SILENT_COA_COMOVEMENT``, starts halfway) at ``--rate`` receipts/s in a background thread;
2. the simulated reviewer works the review queue through the real HTTP API: it lists the open
   exceptions of every queue and, ``--delay`` seconds after one appears, posts a decision answered
   from the simulator's ground truth (clean -> ACCEPT, fault -> REJECT), wrong on ``--error-rate`` of
   them (deterministic per exception id); a clean receipt whose benign code is ``TEST_METHOD_CHANGE``
   is accepted with ``"rebaseline": true``; spot checks (``SPOT_CHECK``) are decided the same way;
3. every output is read back (read_committed) and joined with the truth; per window of
   ``--window`` receipts in publish order it reports the review rate, false-alarm rate (the prior's
   too, from ``prior_decision``), precision of verified, recall of faults, ECE and the label count
   (``lotflow/learning_metrics.py`` defines each), prints them as they complete, then the final
   figures against the issue's targets, and writes ``var/learning.json`` and ``var/learning.png``.

Stops what it started on Ctrl-C, SIGTERM and errors. ``run_core`` is the part the integration test
runs against the test session's broker, engine and worker.
"""

from __future__ import annotations

import json
import math
import os
import random
import secrets
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from lotflow import admin, localkafka
from lotflow.kafka_clients import client_config
from lotflow.learning_metrics import (
    NEW_PATTERN,
    SPOT_CHECK,
    final_figures,
    join_outcomes,
    labels_to_catch,
    parse_labels,
    target_report,
    windows,
)
from lotflow.settings import Settings

__all__ = ["LearningOptions", "ReviewStack", "reviewer_decision", "run_core", "run_learning_demo"]

LEARN_PREFIX = "learn"
LEARN_WAIT_S = 5.0  # the document wait, as in the demo
# The sink inserts a batch per topic-partition at least this often. In this process its inserts share
# the embedded engine's one client (one call at a time) with the review API's queries: the default
# 0.5 s makes up to ~50 inserts/s (4 partitions x 6 tables); 2 s cuts that four-fold, and exceptions
# show up in the queue at most 2 s later.
LEARN_SINK_BATCH_S = 2.0
REVIEWER = "learner"
REBASELINE_BENIGN = "TEST_METHOD_CHANGE"
JOIN_EVERY_S = 2.0  # once publishing is done, the outputs are joined with the truth this often
LIST_EVERY_S = 1.5  # the reviewer re-reads the open exceptions this often,
LIST_BACKLOG = 100  # unless it already knows this many it has not decided yet:
LIST_AT_LEAST_S = 15.0  # then this often
LIST_LIMIT = 200  # per queue and listing (oldest first, HIGH priority before)
NO_TRUTH_GIVE_UP_S = 60.0  # an exception whose receipt's truth never arrives is left open
Say = Callable[[str], None]


@dataclass
class LearningOptions:
    count: int = 20000
    seed: int = 7
    rate: float = 30.0  # receipts/s; 0: as fast as possible (learning then has little time to act)
    faults: str = "learning"
    error_rate: float = 0.02  # share of the reviewer's answers flipped
    delay_s: float = 2.0  # from an exception appearing in the queue to the reviewer's decision
    certainty: float = 0.9
    reviewer_threads: int = 4  # decisions posted at once
    window: int = 1000
    labels_needed: int = 2000  # the issue's targets hold after this many labels
    drain_s: float = 60.0  # once every receipt is decided, how long the reviewer may still empty the queue
    timeout_s: float | None = None  # the whole run; None: from count and rate
    progress_s: float = 5.0

    def __post_init__(self) -> None:
        if self.count < 1 or self.window < 1 or self.reviewer_threads < 1:
            raise ValueError("--count, --window and --reviewer-threads must be >= 1")
        if self.rate < 0 or self.delay_s < 0:
            raise ValueError("--rate and --delay must be >= 0")
        if not 0.0 <= self.error_rate <= 1.0 or not 0.0 <= self.certainty <= 1.0:
            raise ValueError("--error-rate and --certainty must be between 0 and 1")

    def run_timeout(self) -> float:
        if self.timeout_s is not None:
            return self.timeout_s
        publishing = self.count / self.rate if self.rate > 0 else self.count / 200
        return 1.5 * publishing + 300 + self.drain_s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_or_free(port: int) -> int:
    """``port`` unless something already listens there (another demo, a test worker)."""
    return free_port() if localkafka.port_open(port) else port


def resolve_faults(spec: str, say: Say) -> tuple[Any, str]:
    """The fault mix; ``learning`` falls back to ``default`` (loudly) while the preset does not exist."""
    from lotflow.simulator.faults import parse_fault_spec

    try:
        return parse_fault_spec(spec), spec
    except ValueError as exc:
        if spec.strip().lower() != "learning":
            raise
        say(f"WARNING: the fault preset 'learning' is not available ({exc}); using 'default' "
            f"(no {NEW_PATTERN}: the new-pattern figure will be n/a)")
        return parse_fault_spec("default"), "default"


# --- the simulated reviewer ---------------------------------------------------------------------

def reviewer_decision(row: Mapping[str, Any], truth: Mapping[str, Any], *, seed: int, error_rate: float,
                      certainty: float) -> tuple[dict[str, Any], bool]:
    """The decision body the reviewer posts on exception ``row`` (the API's list item) given its
    receipt's ground truth, and whether the answer was deliberately flipped. The flip is drawn from
    a RNG seeded with (seed, exception id): the same run makes the same mistakes."""
    good = not truth["is_fault"]
    flipped = random.Random(f"{seed}:{row['id']}").random() < error_rate
    accept = good != flipped
    if good:
        why = f"clean receipt ({truth.get('benign') or 'nothing unusual'})"
    else:
        why = f"faulty receipt ({truth.get('fault')})"
    body: dict[str, Any] = {
        "resolution": "ACCEPT" if accept else "REJECT",
        "reasoning": f"simulated reviewer, learning run: {why}" + ("; answered wrongly on purpose" if flipped else ""),
        "certainty": certainty,
        "confidence_shown": row.get("confidence"),
    }
    if accept and truth.get("benign") == REBASELINE_BENIGN:
        body["rebaseline"] = True  # a new test method: the control charts start from the new level
    return body, flipped


class Reviewer:
    """Works every queue through the JSON API with an admin token: a thread lists the open exceptions
    every ``LIST_EVERY_S`` and hands those due (``delay_s`` after it first saw them, oldest first) to
    ``threads`` concurrent deciders (one person at several desks: the API's latency, not her speed,
    would otherwise bound how many labels the run gets)."""

    def __init__(self, url: str, token: str, truth_of: Callable[[str], Mapping[str, Any] | None],
                 opts: LearningOptions, say: Say) -> None:
        import httpx

        self.api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30,
                                limits=httpx.Limits(max_connections=opts.reviewer_threads + 2))
        self.truth_of = truth_of
        self.opts = opts
        self.say = say
        self.lock = threading.Lock()
        self.first_seen: dict[str, float] = {}
        self.pending: dict[str, dict[str, Any]] = {}
        self.in_flight: set[str] = set()
        self.done: set[str] = set()
        self.posted_ms: list[int] = []
        self.stats: Counter[str] = Counter()
        self.errors: list[str] = []
        self.listed_open = 0  # open exceptions at the last listing
        self.decided_since_listing = 0
        self.extras = {"rebaseline": True, "confidence_shown": True}  # False once the API refused one
        self.timings: dict[str, list[float]] = {"queues": [], "list": [], "decision": []}  # seconds per call
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=opts.reviewer_threads, thread_name_prefix="learning-decide")
        self.thread = threading.Thread(target=self._run, name="learning-reviewer", daemon=True)

    def start(self) -> Reviewer:
        self.thread.start()
        return self

    @property
    def queue_size(self) -> int:
        """Open exceptions: at the last listing, less what was decided since."""
        with self.lock:
            return max(0, self.listed_open - self.decided_since_listing)

    @property
    def left_open(self) -> int:
        """Open exceptions the reviewer will still decide (not those it gave up on)."""
        with self.lock:
            busy = len(self.pending) + len(self.in_flight)
        return max(busy, self.queue_size - self.stats["no_truth"])

    def _count(self, **counts: int) -> None:
        with self.lock:
            self.stats.update(counts)

    def _error(self, message: str) -> None:
        self._count(errors=1)
        if len(self.errors) < 10:
            self.errors.append(message)
            self.say(f"reviewer: {message}")

    def _run(self) -> None:
        import httpx

        last_list = 0.0
        while not self.stop.is_set():
            try:
                since = time.monotonic() - last_list
                with self.lock:
                    known = len(self.pending)
                # a listing costs the API as much as a decision: while a backlog is known, list seldom
                if (since >= LIST_EVERY_S and known < LIST_BACKLOG) or since >= LIST_AT_LEAST_S:
                    last_list = time.monotonic()
                    self._list()
                self._hand_out()
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                self._error(f"{type(exc).__name__}: {exc}")
                self.stop.wait(1.0)
            self.stop.wait(0.1)

    def _timed(self, what: str, call: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return call()
        finally:
            self.timings[what].append(time.perf_counter() - t0)

    def timing_summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for what, samples in self.timings.items():
            ordered = sorted(samples)
            if ordered:
                out[what] = {"n": len(ordered), "mean_ms": round(1000 * sum(ordered) / len(ordered), 1),
                             "p95_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1)}
        return out

    def _list(self) -> None:
        answer = self._timed("queues", partial(self.api.get, "/api/queues"))
        answer.raise_for_status()
        queues = {str(k): int(v) for k, v in answer.json().items()}
        with self.lock:
            self.listed_open, self.decided_since_listing = sum(queues.values()), 0
        now = time.monotonic()
        for queue, n in queues.items():
            if n <= 0:
                continue
            listed = self._timed("list", partial(self.api.get, "/api/exceptions",
                                                 params={"queue": queue, "limit": LIST_LIMIT}))
            listed.raise_for_status()
            with self.lock:
                for row in listed.json():
                    if row["id"] not in self.done and row["id"] not in self.in_flight:
                        self.first_seen.setdefault(row["id"], now)
                        self.pending[row["id"]] = row

    def _hand_out(self) -> None:
        now = time.monotonic()
        with self.lock:
            room = 2 * self.opts.reviewer_threads - len(self.in_flight)
            due = sorted((x for x in self.pending if now - self.first_seen[x] >= self.opts.delay_s),
                         key=lambda x: self.first_seen[x])
        for xid in due:
            if room <= 0 or self.stop.is_set():
                return
            with self.lock:
                row = self.pending[xid]
            truth = self.truth_of(row["subject_id"])
            if truth is None:
                if now - self.first_seen[xid] > NO_TRUTH_GIVE_UP_S:
                    self._count(no_truth=1)
                    self._forget(xid)
                continue
            with self.lock:
                del self.pending[xid]
                self.in_flight.add(xid)
            self.pool.submit(self._decide_safely, row, truth)
            room -= 1

    def _forget(self, xid: str) -> None:
        with self.lock:
            self.done.add(xid)
            self.pending.pop(xid, None)
            self.in_flight.discard(xid)

    def _decide_safely(self, row: dict[str, Any], truth: Mapping[str, Any]) -> None:
        import httpx

        try:
            self._decide(row, truth)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            self._error(f"decision on {row['id']}: {type(exc).__name__}: {exc}")
            self._retry_later(row)

    def _retry_later(self, row: dict[str, Any]) -> None:
        with self.lock:
            self.in_flight.discard(row["id"])
            self.pending[row["id"]] = row
            self.first_seen[row["id"]] = time.monotonic()  # again after the delay

    def _decide(self, row: dict[str, Any], truth: Mapping[str, Any]) -> None:
        body, flipped = reviewer_decision(row, truth, seed=self.opts.seed, error_rate=self.opts.error_rate,
                                          certainty=self.opts.certainty)
        body = {k: v for k, v in body.items() if k not in self.extras or self.extras[k]}
        path = f"/api/exceptions/{row['id']}/decision"
        answer = self._timed("decision", partial(self.api.post, path, json=body))
        if answer.status_code == 422 and any(k in body for k in self.extras):
            # an API that forbids fields it does not know: send what it knows, and say so once
            plain = {k: v for k, v in body.items() if k not in self.extras}
            retry = self.api.post(path, json=plain)
            if retry.status_code in (201, 409):
                refused = [k for k in self.extras if k in body and k in answer.text] or \
                          [k for k in self.extras if k in body]
                for k in refused:
                    self.extras[k] = False
                self.say(f"reviewer: the API refused {', '.join(refused)}; sending decisions without it")
            answer = retry
        if answer.status_code == 201:
            decided_at = answer.json().get("decided_at")
            with self.lock:
                self.posted_ms.append(decided_at if isinstance(decided_at, int) else int(time.time() * 1000))
                self.decided_since_listing += 1
            self._count(posted=1, flipped=int(flipped), rebaseline=int(bool(body.get("rebaseline"))),
                        spot_checks=int(SPOT_CHECK in (row.get("reason_codes") or ())),
                        **{"accepted" if body["resolution"] == "ACCEPT" else "rejected": 1})
            self._forget(row["id"])
        elif answer.status_code == 409:
            self._count(conflicts=1)
            self._forget(row["id"])
        else:
            self._error(f"decision on {row['id']}: {answer.status_code} {answer.text[:200]}")
            self._retry_later(row)

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(30)
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.api.close()


# --- reading the outputs back -------------------------------------------------------------------

class LiveReader:
    """Reads verified, exceptions, dead letters and ground truth from the start, read_committed, in a
    thread, while the run goes on: the reviewer's truth, the progress and, at the end, the figures."""

    def __init__(self, settings: Settings) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        from lotflow.schemas.serde import AvroCodec, schema_source
        from lotflow.streams import topics

        source = schema_source(settings.schema_registry_url)
        self.kinds: dict[str, tuple[str, Any]] = {}
        for kind, spec in (("VERIFIED", topics.VERIFIED), ("EXCEPTION", topics.EXCEPTIONS),
                           ("DEAD_LETTER", topics.DEAD_LETTERS), ("TRUTH", topics.GROUND_TRUTH)):
            name = spec.full_name(settings)
            self.kinds[name] = (kind, AvroCodec(source, f"{name}-value", spec.schema, epoch_millis=True))
        self.receipts_topic = topics.RECEIPTS.full_name(settings)
        self.lock = threading.Lock()
        self.records: dict[str, list[dict[str, Any]]] = {"VERIFIED": [], "EXCEPTION": [], "DEAD_LETTER": [],
                                                         "TRUTH": []}
        self.truth_by_subject: dict[str, dict[str, Any]] = {}
        self.decided_refs: set[tuple[str, int, int]] = set()
        self.max_labels: int | None = None
        self.decode_errors = 0
        self.consumer = Consumer(client_config(settings, **{
            "group.id": f"{settings.app_id}-learning-reader-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False, "isolation.level": "read_committed"}))
        self.consumer.assign([TopicPartition(name, p, OFFSET_BEGINNING) for name in self.kinds
                              for p in admin.end_offsets(settings, name)])
        self.positions: dict[tuple[str, int], int] = {}
        self.want_positions = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="learning-reader", daemon=True)
        self.thread.start()

    def catch_up(self, settings: Settings, timeout: float) -> bool:
        """Wait until every topic read is read to its end offset as of now (read_committed: a
        transaction still open holds the reader back; the worker commits every batch)."""
        ends = {(name, p): end for name in self.kinds for p, end in admin.end_offsets(settings, name).items()}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.want_positions.set()
            while self.want_positions.is_set() and time.monotonic() < deadline and self.thread.is_alive():
                time.sleep(0.05)
            if all(self.positions.get(tp, 0) >= end for tp, end in ends.items() if end > 0):
                return True
            time.sleep(0.2)
        return False

    def _run(self) -> None:
        while not self.stop.is_set():
            if self.want_positions.is_set():
                self.positions = {(tp.topic, tp.partition): tp.offset
                                  for tp in self.consumer.position(self.consumer.assignment())}
                self.want_positions.clear()
            for msg in self.consumer.consume(2000, timeout=0.2):
                if msg.error() or msg.value() is None:
                    continue
                kind, codec = self.kinds[str(msg.topic())]
                try:
                    record = codec.decode(msg.value())
                except Exception:  # a record this reader cannot read is counted, not fatal
                    self.decode_errors += 1
                    continue
                self._add(kind, record)

    def _add(self, kind: str, record: dict[str, Any]) -> None:
        with self.lock:
            self.records[kind].append(record)
            if kind == "TRUTH":
                self.truth_by_subject[str(record["subject_id"])] = record
            elif kind == "DEAD_LETTER":
                if record["source_topic"] == self.receipts_topic:
                    self.decided_refs.add((record["source_topic"], record["source_partition"],
                                           record["source_offset"]))
            elif not str(record.get("model_version", "")).startswith("person:"):
                first = record["input_refs"][0]
                self.decided_refs.add((first["topic"], first["partition"], first["offset"]))
                labels = parse_labels(record.get("model_version"))
                if labels is not None and (self.max_labels is None or labels > self.max_labels):
                    self.max_labels = labels

    def truth(self, subject_id: str) -> dict[str, Any] | None:
        with self.lock:
            return self.truth_by_subject.get(subject_id)

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        with self.lock:
            return {kind: list(records) for kind, records in self.records.items()}

    def counts(self) -> tuple[int, int]:
        """(truths read, receipts with a machine decision)."""
        with self.lock:
            return len(self.records["TRUTH"]), len(self.decided_refs)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.consumer.close()


# --- the review service in this process ---------------------------------------------------------

class ReviewStack:
    """The sink (a thread) and the review service (uvicorn in a thread) on ``settings``' engine,
    with an admin user for the reviewer. This process must be the one that opens the engine."""

    def __init__(self, settings: Settings, *, port: int | None = None, hasher: Any = None) -> None:
        self.settings = settings
        self.port = port or free_port()
        self.hasher = hasher
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = ""
        self.stop_sink = threading.Event()
        self.sink: threading.Thread | None = None
        self.server: Any = None
        self.server_thread: threading.Thread | None = None
        self.services: Any = None
        self.specs: Any = None

    def start(self, say: Say) -> ReviewStack:
        import uvicorn

        from lotflow.review.app import create_app
        from lotflow.review.server import build_services
        from lotflow.review.users import UserStore
        from lotflow.sinks.clickhouse import connect, run_sink
        from lotflow.sinks.migrations import migrate

        applied = migrate(connect(self.settings), self.settings.clickhouse_database)  # once, before both
        say(f"ClickHouse database {self.settings.clickhouse_database}: migrations {applied or 'up to date'}")
        self.sink = threading.Thread(target=run_sink, args=(self.settings, self.stop_sink), name="learning-sink",
                                     daemon=True)
        self.sink.start()
        users = UserStore(self.settings.users_file, hasher=self.hasher)
        if users.get(REVIEWER) is None:
            users.add(REVIEWER, ["admin"], secrets.token_urlsafe(18))
        self.token = users.issue_token(REVIEWER, "learning run")
        self.services, self.specs = build_services(self.settings)
        self.services.users = users
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.services), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.server_thread = threading.Thread(target=self.server.run, name="learning-review", daemon=True)
        self.server_thread.start()
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server_thread is not None and not self.server_thread.is_alive():
                raise RuntimeError(f"the review service on port {self.port} did not start")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the review service did not answer within {timeout}s")

    def close(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.server_thread is not None:
            self.server_thread.join(15)
        self.stop_sink.set()
        if self.sink is not None:
            self.sink.join(60)
        if self.specs is not None:
            self.specs.close()
        if self.services is not None and self.services.inputs is not None:
            self.services.inputs.close()


# --- the publisher ------------------------------------------------------------------------------

class _Stopped(Exception):
    pass


@dataclass
class Publisher:
    settings: Settings
    opts: LearningOptions
    mix: Any
    stop: threading.Event = field(default_factory=threading.Event)
    report: Any = None
    error: BaseException | None = None
    line: str = ""

    def start(self) -> Publisher:
        self.thread = threading.Thread(target=self._run, name="learning-publisher", daemon=True)
        self.thread.start()
        return self

    def _progress(self, line: str) -> None:
        self.line = line
        if self.stop.is_set():
            raise _Stopped  # publish() reports at most once a second: it stops within one

    def _run(self) -> None:
        from lotflow.simulator.publish import publish

        try:
            self.report = publish(self.settings, self.opts.seed, self.opts.count, self.mix, self.opts.rate,
                                  self._progress)
        except _Stopped:
            pass
        except BaseException as exc:
            self.error = exc

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


# --- the run -------------------------------------------------------------------------------------

def _pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}"


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


TABLE_HEADER = (f"{'window':>6} {'receipts':>8} {'labels':>7} {'review%':>8} {'FAR%':>6} {'priorFAR%':>9} "
                f"{'prec%':>7} {'recall%':>7} {'ECE':>6} {'spot':>5} {'new-pat':>8}")


def format_window(w: Mapping[str, Any]) -> str:
    pattern = f"{w['new_pattern_caught']}/{w['new_pattern_receipts']}" if w["new_pattern_receipts"] else "—"
    labels = "—" if w["labels"] is None else str(w["labels"])
    return (f"{w['window']:>6} {w['decided']:>8} {labels:>7} {_pct(w['review_rate']):>8} "
            f"{_pct(w['false_alarm_rate'], 2):>6} {_pct(w['prior_false_alarm_rate'], 2):>9} "
            f"{_pct(w['precision_verified'], 2):>7} {_pct(w['recall_faults']):>7} {_num(w['ece']):>6} "
            f"{w['spot_checks']:>5} {pattern:>8}")


def _complete_windows(outcomes: Sequence[Any], size: int, publishing_done: bool, total: int) -> int:
    """How many leading windows are final: all their receipts decided, and (while publishing) a
    margin of later truths read, since truths arrive a little out of publish order."""
    done = 0
    for start in range(0, len(outcomes), size):
        end = min(start + size, len(outcomes))
        full = end - start == size or (publishing_done and len(outcomes) >= total)
        settled = publishing_done or len(outcomes) >= end + 200
        if not (full and settled and all(o.decided for o in outcomes[start:end])):
            break
        done += 1
    return done


def _sink_lag(settings: Settings) -> str:
    """Exceptions not yet stored by the sink (what the review queue cannot show yet)."""
    topic = settings.topic("lotflow.exceptions")
    try:
        ends = admin.end_offsets(settings, topic)
        committed = admin.committed_offsets(settings, settings.sink_group, topic)
    except Exception:  # progress only
        return "?"
    return str(sum(max(0, end - committed.get(p, 0)) for p, end in ends.items()))


def run_core(settings: Settings, opts: LearningOptions, *, worker_error: Callable[[], str | None],
             say: Say = print, hasher: Any = None) -> dict[str, Any]:
    """Publish, review and measure on ``settings`` (topics created, a worker running on them): starts
    the sink and review service in this process, returns the figures (see ``learning_metrics``)."""
    mix, faults_used = resolve_faults(opts.faults, say)
    started = time.monotonic()
    stack = reader = reviewer = publisher = None
    try:
        stack = ReviewStack(settings, hasher=hasher).start(say)
        say(f"review service at {stack.url} (reviewer '{REVIEWER}', admin token)")
        reader = LiveReader(settings)
        reviewer = Reviewer(stack.url, stack.token, reader.truth, opts, say).start()
        say(f"publishing {opts.count} receipts (seed {opts.seed}, faults {faults_used!r}, "
            f"rate {opts.rate or 'max'}/s); reviewer: delay {opts.delay_s:g}s, error rate {opts.error_rate:.1%}; "
            f"the calibration corrects for {settings.label_error_rate:.1%} wrong labels")
        publisher = Publisher(settings, opts, mix).start()
        deadline = started + opts.run_timeout()
        complete, all_decided_at, printed, last_progress, last_join = False, None, 0, 0.0, 0.0
        header_done = False
        while True:
            problem = worker_error()
            if problem:
                raise RuntimeError(problem)
            if publisher.error is not None:
                raise RuntimeError(f"publishing failed: {publisher.error!r}")
            now = time.monotonic()
            truths, _ = reader.counts()
            published_done = not publisher.running
            expected = publisher.report.ground_truth if publisher.report is not None else opts.count
            # the join holds the interpreter a while on a long run: not every second while publishing
            if now - last_join >= (JOIN_EVERY_S if published_done else opts.progress_s):
                last_join = now
                snap = reader.snapshot()
                outcomes = join_outcomes(snap["TRUTH"], snap["VERIFIED"], snap["EXCEPTION"], snap["DEAD_LETTER"],
                                         list(reviewer.posted_ms))
                ready = _complete_windows(outcomes, opts.window, published_done, expected)
                if now - last_progress >= opts.progress_s:
                    last_progress = now
                    worker_labels = "—" if reader.max_labels is None else str(reader.max_labels)
                    post = reviewer.timing_summary().get("decision", {}).get("mean_ms")
                    lag = _sink_lag(settings)
                    say(f"published {truths}/{opts.count}, decided {sum(o.decided for o in outcomes)}, labels: "
                        f"worker {worker_labels}, reviewer posted {reviewer.stats['posted']} "
                        f"(flipped {reviewer.stats['flipped']}{f', {post:.0f} ms each' if post else ''}), "
                        f"queue {reviewer.queue_size}, sink lag {lag}, {now - started:.0f}s")
                for w in windows(outcomes[:ready * opts.window], opts.window)[printed:]:
                    if not header_done:
                        say(TABLE_HEADER)
                        header_done = True
                    say(format_window(w))
                printed = max(printed, ready)
                all_decided = published_done and truths >= expected and all(o.decided for o in outcomes)
                if all_decided and all_decided_at is None:
                    all_decided_at = now
                    say(f"every receipt decided; the reviewer empties the queue ({reviewer.left_open} open, "
                        f"up to {opts.drain_s:g}s)")
                # a few seconds first: the sink stores the last exceptions before the queue shows them
                drained = all_decided_at is not None and now - all_decided_at >= 3.0 and reviewer.left_open == 0
                if all_decided_at is not None and (drained or now - all_decided_at > opts.drain_s):
                    complete = True
                    break
            if now > deadline:
                say(f"TIMEOUT after {now - started:.0f}s: reporting what was decided")
                break
            time.sleep(1.0)
        reviewer.stop.set()
        if not reader.catch_up(settings, 30.0):
            say("the reader did not reach the end of every output topic within 30s")
        snap = reader.snapshot()
        result = measure(snap, list(reviewer.posted_ms), opts)
        result.update({
            "complete": complete,
            "elapsed_s": round(time.monotonic() - started, 1),
            "faults_requested": opts.faults,
            "faults_used": faults_used,
            "published": _report(publisher.report),
            "reviewer": {**dict(reviewer.stats), "queue_left": reviewer.queue_size,
                         "rebaseline_field_sent": reviewer.extras["rebaseline"],
                         "api_timings": reviewer.timing_summary(),
                         "errors_first": reviewer.errors},
            "worker_labels_seen": reader.max_labels,
            "decision_dead_letters": sum(1 for r in snap["DEAD_LETTER"]
                                         if r["source_topic"] == settings.topic("lotflow.decisions")),
            "decode_errors": reader.decode_errors,
        })
        return result
    finally:
        for part in (publisher, reviewer, reader, stack):
            if part is not None:
                try:
                    part.close()
                except Exception as exc:  # shutting down: report, go on with the rest
                    say(f"while stopping {type(part).__name__}: {exc!r}")


def _report(report: Any) -> dict[str, Any] | None:
    if report is None:
        return None
    return {"receipts": report.receipts, "ground_truth": report.ground_truth, "failed": report.failed,
            "per_fault": report.per_fault, "per_benign": report.per_benign,
            "receipts_per_s": round(report.receipts_per_s, 1)}


def measure(snap: Mapping[str, list[dict[str, Any]]], posted_ms: list[int], opts: LearningOptions) -> dict[str, Any]:
    """The figures from everything read: windows, final figures, the new pattern, the targets."""
    outcomes = join_outcomes(snap["TRUTH"], snap["VERIFIED"], snap["EXCEPTION"], snap["DEAD_LETTER"], posted_ms)
    per_window = windows(outcomes, opts.window)
    final = final_figures(outcomes, opts.labels_needed)
    pattern_seen = any(o.fault == NEW_PATTERN for o in outcomes)
    to_catch = labels_to_catch(outcomes)
    from_model = any(o.labels_from_model for o in outcomes)
    labels = max((o.labels for o in outcomes if o.labels is not None), default=0)
    return {
        "windows": per_window,
        "labels": labels if from_model else len(posted_ms),
        "labels_source": "model_version (/L<n>)" if from_model else
                         "the reviewer's decisions posted (no /L<n> in model_version)",
        "receipts": len(outcomes),
        "undecided": sum(not o.decided for o in outcomes),
        "new_pattern": NEW_PATTERN,
        "new_pattern_receipts": sum(o.fault == NEW_PATTERN for o in outcomes),
        "new_pattern_labels_to_catch": to_catch,
        "final_basis": final["basis"],
        "final_reached_labels": final["reached_labels"],
        "final_receipts": final["decided"],
        "final_precision_verified": final["precision_verified"],
        "final_recall_faults": final["recall_faults"],
        "final_false_alarm_rate": final["false_alarm_rate"],
        "prior_false_alarm_rate": final["prior_false_alarm_rate"],
        "final_review_rate": final["review_rate"],
        "final_ece": final["ece"],
        "final_spot_checks": final["spot_checks"],
        "final_spot_check_faults": final["spot_check_faults"],
        "final_false_alarm_reasons": final["false_alarm_reasons"],
        "final_missed_fault_kinds": final["missed_fault_kinds"],
        "targets": target_report(final, to_catch, pattern_seen),
    }


def print_report(result: Mapping[str, Any], opts: LearningOptions, say: Say = print) -> None:
    say("")
    say("================ lotflow learning run ================")
    say(TABLE_HEADER)
    for w in result["windows"]:
        say(format_window(w))
    say(f"labels: {result['labels']} ({result['labels_source']}); receipts {result['receipts']}, "
        f"undecided {result['undecided']}; complete: {'yes' if result['complete'] else 'NO'}")
    rv = result["reviewer"]
    say(f"reviewer: {rv.get('posted', 0)} decisions ({rv.get('accepted', 0)} accept, {rv.get('rejected', 0)} reject, "
        f"{rv.get('flipped', 0)} wrong on purpose, {rv.get('rebaseline', 0)} with rebaseline, "
        f"{rv.get('spot_checks', 0)} spot checks), {rv.get('conflicts', 0)} conflicts, {rv.get('errors', 0)} errors, "
        f"{rv.get('no_truth', 0)} without truth, {rv['queue_left']} left open")
    if result["decision_dead_letters"]:
        say(f"decisions the worker dead-lettered: {result['decision_dead_letters']}")
    say(f"final figures over {result['final_receipts']} receipts: {result['final_basis']}")
    if not result["final_reached_labels"]:
        say(f"  (the targets are stated after {opts.labels_needed} labels: this run never got there, so the "
            "marks below judge the last quarter's figures against them)")
    far, prior = result["final_false_alarm_rate"], result["prior_false_alarm_rate"]
    shown = {
        "precision_verified": f"{_pct(result['final_precision_verified'], 2)} %",
        "recall_faults": f"{_pct(result['final_recall_faults'], 2)} %",
        "false_alarm_rate": f"{_pct(far, 2)} %",
        "false_alarm_vs_prior": f"{_pct(far, 2)} % vs prior {_pct(prior, 2)} %"
                                + ("" if prior is not None else " (no prior_decision in the outputs)"),
        "ece": _num(result["final_ece"], 4),
        "new_pattern_labels_to_catch": (f"{result['new_pattern_labels_to_catch']} labels"
                                        if result["new_pattern_labels_to_catch"] is not None else
                                        ("never caught" if result["new_pattern_receipts"] else
                                         f"no {NEW_PATTERN} receipts in this run")),
    }
    for t in result["targets"]:
        say(f"  {t['what']:<34} {shown[t['name']]:<40} target {t['target']:<20} {t['status'].upper()}")
    for what, counts in (("false alarms by reason", result.get("final_false_alarm_reasons")),
                         ("missed faults by kind", result.get("final_missed_fault_kinds"))):
        if counts:
            say(f"  {what}: " + ", ".join(f"{name} {n}" for name, n in list(counts.items())[:8]))
    say("======================================================")


def plot_curves(per_window: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Learning curves per window against the label count; False if there is nothing to plot."""
    if not per_window:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have_labels = any(w["labels"] is not None for w in per_window)
    x = [w["labels"] if have_labels and w["labels"] is not None else w["window"] for w in per_window]
    xlabel = "labels (at the window's end)" if have_labels else "window"

    def series(name: str, scale: float = 100.0) -> list[float]:
        return [math.nan if w[name] is None else scale * w[name] for w in per_window]

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    panels = [
        ("false-alarm rate (%)", [("learnt", series("false_alarm_rate")),
                                  ("prior alone", series("prior_false_alarm_rate"))], 2.0),
        ("recall of faults (%)", [("recall", series("recall_faults"))], 99.0),
        ("precision of verified (%)", [("precision", series("precision_verified"))], 99.5),
        ("review rate (%)", [("sent to a person", series("review_rate"))], None),
        ("ECE (10 bins)", [("ECE", series("ece", 1.0))], 0.02),
        (f"{NEW_PATTERN} held (%)", [("held", [math.nan if not w["new_pattern_receipts"] else
                                               100.0 * w["new_pattern_caught"] / w["new_pattern_receipts"]
                                               for w in per_window])], 90.0),
    ]
    for ax, (title, lines, target) in zip(axes.flat, panels, strict=True):
        for label, ys in lines:
            ax.plot(x, ys, marker="o", label=label)
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("lotflow learning run: per window of receipts")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_learning_demo(base: Settings, opts: LearningOptions, out: Path | None = None,
                      plot: Path | None = None) -> int:
    """The whole learning run on a local broker and the embedded engine (``make learning-demo``)."""
    from lotflow.demo import _raise_interrupt, _spawn, _stop, _wait_http, prepare_topics

    def say(line: str) -> None:
        print(f"[learning] {line}" if line else "", flush=True)

    resolve_faults(opts.faults, lambda _: None)  # a bad spec fails before anything starts
    run_id = time.strftime("%Y%m%d%H%M%S")
    wait = base.document_wait_s if "LOTFLOW_DOCUMENT_WAIT_S" in os.environ else LEARN_WAIT_S
    sink_batch = base.sink_batch_s if "LOTFLOW_SINK_BATCH_S" in os.environ else LEARN_SINK_BATCH_S
    # the plant knows how often its reviewers err (an attribute agreement study): here, the simulated
    # reviewer's configured rate, unless the environment says otherwise
    # (at 50 % or more wrong the answers say nothing, or the opposite: no correction)
    label_errors = base.label_error_rate if "LOTFLOW_LABEL_ERROR_RATE" in os.environ else \
        opts.error_rate if opts.error_rate < 0.5 else 0.0
    var = base.var_dir
    settings = base.model_copy(update={
        "topic_prefix": f"{LEARN_PREFIX}{run_id}.", "app_id": f"lotflow-learn-{run_id}",
        "sink_group": f"lotflow-learn-sink-{run_id}", "clickhouse_database": f"lotflow_learn_{run_id}",
        "document_wait_s": wait, "sink_batch_s": sink_batch, "label_error_rate": label_errors,
        "worker_web_port": _port_or_free(base.worker_web_port),
        "sink_metrics_port": _port_or_free(base.sink_metrics_port),
        "review_users_file": var / f"learning-users-{run_id}.json",
    })
    out = out or var / "learning.json"
    plot = plot or var / "learning.png"
    log_dir = var / "learning-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started_broker = False
    worker = None
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        started_broker = prepare_topics(settings, LEARN_PREFIX, say)
        say(f"topics ready under prefix {settings.topic_prefix!r}; document wait {wait:g}s")
        worker = _spawn("worker", settings, log_dir)
        _wait_http(f"http://{settings.worker_web_host}:{settings.worker_web_port}/metrics", worker,
                   log_dir / "worker.log")
        say(f"worker running (log {log_dir / 'worker.log'})")

        def worker_error() -> str | None:
            assert worker is not None
            code = worker.poll()
            return None if code is None else f"the worker exited with {code}; see {log_dir / 'worker.log'}"

        result = run_core(settings, opts, worker_error=worker_error, say=say)
        result["parameters"] = {**asdict(opts), "topic_prefix": settings.topic_prefix,
                                "clickhouse_database": settings.clickhouse_database, "document_wait_s": wait,
                                "sink_batch_s": sink_batch, "label_error_rate": settings.label_error_rate,
                                "run_id": run_id}
        print_report(result, opts, say)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        say(f"figures written to {out}")
        if plot_curves(result["windows"], plot):
            say(f"learning curves plotted to {plot}")
        return 0 if result["complete"] else 1
    except KeyboardInterrupt:
        say("interrupted: stopping what the learning run started")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(worker)
        for path in (settings.users_file, settings.users_file.with_name(settings.users_file.name + ".lock")):
            path.unlink(missing_ok=True)
        if started_broker:
            localkafka.stop(settings)
