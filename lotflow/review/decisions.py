"""A person's decision, checked and written to the decisions topic (Avro, Confluent wire).

The decisions topic is keyed by the exception's subject key (the PO), so a decision lands on
the partition of the worker that raised the exception; the worker's decisions agent applies it
(releases, rejects or moves the work) and writes its audit record.

One decision per exception: the first resolving decision wins. Within one service process a
lock makes the check and the write one step (two reviewers racing: one gets 201, the other
409 with the first decision); across processes the stored decisions are checked first and the
worker applies only the first decision it reads for an exception (a later one is a dead letter).
A reassignment does not resolve: the exception stays open in the queue it moves to.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from confluent_kafka import Producer

from lotflow.kafka_clients import producer_config
from lotflow.schemas.serde import AvroCodec, schema_source
from lotflow.settings import Settings
from lotflow.streams import topics
from lotflow.verification.queues import Queue

__all__ = ["AlreadyDecided", "Decision", "DecisionWriter", "Resolution"]

MAX_TEXT = 4000
RECENT_S = 600.0  # the sink stores a decision within seconds; until then this process remembers it
MAX_REMEMBERED = 100_000


class Resolution(StrEnum):
    ACCEPT = "ACCEPT"
    CONDITIONAL_ACCEPT = "CONDITIONAL_ACCEPT"
    REJECT = "REJECT"
    REASSIGN = "REASSIGN"


@dataclass(frozen=True, slots=True)
class Decision:
    """What the person submitted, validated."""

    resolution: Resolution
    reasoning: str
    certainty: float  # 0..1
    condition: str = ""
    reassign_to: str = ""
    rebaseline: bool = False  # an accept that re-baselines the exception's control charts

    def __post_init__(self) -> None:
        if not self.reasoning.strip():
            raise ValueError("reasoning is required")
        if len(self.reasoning) > MAX_TEXT or len(self.condition) > MAX_TEXT:
            raise ValueError(f"reasoning and condition are at most {MAX_TEXT} characters")
        if not 0.0 <= self.certainty <= 1.0:  # also refuses NaN
            raise ValueError("certainty must be between 0 and 1")
        if self.resolution is Resolution.CONDITIONAL_ACCEPT and not self.condition.strip():
            raise ValueError("a conditional accept needs its condition (e.g. rework, or use-as-is with deviation "
                             "number)")
        if self.rebaseline and self.resolution not in (Resolution.ACCEPT, Resolution.CONDITIONAL_ACCEPT):
            raise ValueError("only an accept can re-baseline the control charts")
        if self.resolution is Resolution.REASSIGN and self.reassign_to not in {q.value for q in Queue}:
            raise ValueError(f"reassign_to must be one of {', '.join(q.value for q in Queue)}")


class AlreadyDecided(Exception):
    def __init__(self, first: dict[str, Any]) -> None:
        super().__init__(f"exception {first['exception_id']} was already decided")
        self.first = first


class DecisionWriter:
    """Validates, de-duplicates and produces decisions; ``stored_first`` looks up a resolving
    decision already stored (ClickHouse), so a restarted service still answers 409."""

    def __init__(self, settings: Settings, stored_first: Callable[[str], dict[str, Any] | None],
                 producer: Producer | None = None) -> None:
        self.topic = topics.DECISIONS.full_name(settings)
        self.codec = AvroCodec(schema_source(settings.schema_registry_url), f"{self.topic}-value",
                               topics.DECISIONS.schema, epoch_millis=True)
        self._producer = producer or Producer(producer_config(settings, **{"linger.ms": 0}))
        self._stored_first = stored_first
        self._lock = threading.Lock()
        self._first: dict[str, dict[str, Any]] = {}  # exception id -> its resolving decision (this process)
        self._recent: dict[str, float] = {}  # exception id -> when this process resolved it
        self._moved: dict[str, tuple[str, float]] = {}  # exception id -> (queue it was reassigned to, when)
        self.timeout_s = settings.transaction_timeout_s

    def decided_ids(self) -> list[str]:
        """Exceptions this process resolved lately: out of every queue at once, before the sink stores
        them (after ``RECENT_S`` the stored decisions keep them out; the list stays short)."""
        cutoff = time.monotonic() - RECENT_S
        with self._lock:
            for xid in [x for x, when in self._recent.items() if when < cutoff]:
                del self._recent[xid]
            return list(self._recent)

    def moved_to(self, exception_id: str) -> str | None:
        """The queue a reassignment from this process moved the exception to, until the sink stored it."""
        moved = self._moved.get(exception_id)
        if moved is None or moved[1] < time.monotonic() - RECENT_S:
            return None
        return moved[0]

    def first_decision(self, exception_id: str) -> dict[str, Any] | None:
        return self._first.get(exception_id) or self._stored_first(exception_id)

    def decide(self, *, exception_id: str, node: str, subject_key: str, decision: Decision, user: str, role: str,
               confidence_shown: float) -> dict[str, Any]:
        """Write one decision; ``AlreadyDecided`` (with the first) when the exception was resolved."""
        with self._lock:
            first = self.first_decision(exception_id)
            if first is not None:
                raise AlreadyDecided(first)
            record = {
                "decision_id": f"decision:{uuid.uuid4()}",
                "exception_id": exception_id,
                "node": node,
                "subject_key": subject_key,
                "resolution": decision.resolution.value,
                "decided_by": user,
                "decided_at": int(time.time() * 1000),
                "reasoning": decision.reasoning.strip(),
                "certainty": decision.certainty,
                "role": role,
                "condition": decision.condition.strip(),
                "reassign_to": decision.reassign_to,
                "confidence_shown": confidence_shown,
                "rebaseline": decision.rebaseline,
            }
            value = self.codec.encode(record)
            failure: list[str] = []
            self._producer.produce(self.topic, value, subject_key.encode(),
                                   on_delivery=lambda err, msg: failure.append(str(err)) if err else None)
            if self._producer.flush(self.timeout_s) or failure:
                raise RuntimeError(f"the decision could not be written to {self.topic}: "
                                   f"{failure[0] if failure else 'not acknowledged in time'}")
            if decision.resolution is Resolution.REASSIGN:
                self._moved[exception_id] = (decision.reassign_to, time.monotonic())
            else:
                self._first[exception_id] = record
                self._recent[exception_id] = time.monotonic()
            if len(self._first) > MAX_REMEMBERED:  # the stored decisions answer for older ones
                for xid in list(self._first)[: len(self._first) // 2]:
                    del self._first[xid]
                for xid in [x for x, (_, when) in self._moved.items() if when < time.monotonic() - RECENT_S]:
                    del self._moved[xid]
            return record
