"""Bad input on the receipts topic: what the pipeline must dead-letter, never drop.

* ``garbage_bytes``: random bytes, an empty value, or JSON text;
* ``truncated_receipt``: a valid Confluent header with the receipt schema's (bundled) id and
  a truncated Avro body (``publish`` swaps in the registry's id when one is configured);
* ``make_impossible``: a schema-valid receipt with a value no real receipt can have.
"""

from __future__ import annotations

import json
import random
from functools import cache
from typing import Any

from lotflow.schemas.serde import AvroCodec, schema_source
from lotflow.streams.topics import RECEIPTS

__all__ = ["HEADER_SIZE", "IMPOSSIBLE_KINDS", "garbage_bytes", "make_impossible", "truncated_receipt"]

Record = dict[str, Any]

HEADER_SIZE = 5  # magic byte + 4-byte schema id
Y2000_MS = 946_684_800_000
DAY_MS = 86_400_000
IMPOSSIBLE_KINDS = ("negative_quantity", "nan_quantity", "zero_quantity", "no_lines",
                    "received_before_2000", "received_in_future")


@cache
def _bundled_receipt_codec() -> AvroCodec:
    return AvroCodec(schema_source(None), f"{RECEIPTS.name}-value", RECEIPTS.schema)


def garbage_bytes(rng: random.Random, receipt: Record) -> bytes:
    """Undecodable bytes: empty, JSON text of the receipt, or random (never a magic 0 byte)."""
    roll = rng.random()
    if roll < 0.2:
        return b""
    if roll < 0.5:
        return json.dumps(receipt, sort_keys=True).encode()
    data = bytearray(rng.randbytes(rng.randint(1, 300)))
    data[0] = rng.randint(1, 255)
    return bytes(data)


def truncated_receipt(rng: random.Random, receipt: Record) -> bytes:
    """The receipt's Confluent-framed Avro with the body cut short (never decodes)."""
    full = _bundled_receipt_codec().encode(receipt)
    body_len = len(full) - HEADER_SIZE
    # one draw whatever the length, so the rest of the run does not depend on timestamps
    keep = int(body_len * (0.2 + 0.7 * rng.random()))
    return full[: HEADER_SIZE + min(max(keep, 1), body_len - 1)]


def make_impossible(rng: random.Random, receipt: Record) -> tuple[str, int | None]:
    """Give ``receipt`` an impossible value in place.

    Returns the kind and, for the time kinds, how many ms ``received_at`` lies before the
    record's event time (negative: after it); ``None`` means ``received_at`` was set here.
    """
    kind = rng.choice(IMPOSSIBLE_KINDS)
    lines: list[Record] = receipt["lines"]
    line = lines[rng.randrange(len(lines))]
    lag: int | None = rng.randint(5 * 60_000, 4 * 3_600_000)
    if kind == "negative_quantity":
        line["quantity"] = -abs(line["quantity"])
    elif kind == "nan_quantity":
        line["quantity"] = float("nan")
    elif kind == "zero_quantity":
        line["quantity"] = 0.0
    elif kind == "no_lines":
        receipt["lines"] = []
    elif kind == "received_before_2000":
        receipt["received_at"] = rng.randint(0, Y2000_MS - DAY_MS)
        lag = None
    else:
        lag = -rng.randint(2 * DAY_MS, 60 * DAY_MS)
    return kind, lag
