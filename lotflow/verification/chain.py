"""The audit trail's hash chain: each audit record carries the hash of the one before it.

One chain per audit-topic partition (the worker writes a partition's audit records with an
explicit partition: the one whose input it handled, so one worker writes each chain, in order).
``hash = SHA-256(prev_hash + "\\n" + canonical content)``, where the canonical content is the
record's fields below as sorted-key JSON (timestamps as epoch milliseconds), so it can be
recomputed from the stored rows: ``lotflow audit verify`` walks every partition in offset order
and reports the first row whose content no longer gives its hash (edited) or whose ``prev_hash``
is not the hash of the row before it (a row deleted or inserted).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson

__all__ = ["CHAINED_FIELDS", "canonical", "link"]

CHAINED_FIELDS = ("id", "node", "subject_key", "subject_id", "decision", "confidence", "reasons", "model_version",
                  "input_refs", "event_time", "decision_time", "vendor_id", "lot_ids", "actor", "output_topic",
                  "output_id", "role", "resolution", "reasoning", "certainty")


def _millis(value: Any) -> Any:
    return int(value.timestamp() * 1000) if isinstance(value, datetime) else value


# a machine's audit record leaves the person fields out: their schema defaults stand in
_DEFAULTS: dict[str, Any] = {"role": "", "resolution": "", "reasoning": "", "certainty": -1.0}


def canonical(record: Mapping[str, Any]) -> bytes:
    content = {name: _millis(record.get(name, _DEFAULTS.get(name))) for name in CHAINED_FIELDS}
    return orjson.dumps(content, option=orjson.OPT_SORT_KEYS)


def link(prev_hash: str, record: Mapping[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical(record)).hexdigest()
