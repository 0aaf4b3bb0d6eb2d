"""Reject negative union branch and enum indexes while fastavro decodes, at no cost per record.

An Avro union branch or enum symbol is written as a zigzag ``long``; fastavro's compiled
reader looks it up with ``schema[index]``, and Python indexing counts a negative index from
the end, so a corrupt ``-1`` decodes as the last branch or symbol instead of failing. The
compiled lookup wraps a negative index by adding the sequence's ``len()`` before it reads
the item, and asks for the length only then. ``strict_schema`` gives a parsed schema whose
union and symbol lists raise ``IndexError`` when asked their length: a non-negative index
reads as before, any negative one fails.

What the former re-encode check also refused and this does not: a number written with more
bytes than it needs (it reads as its value), a boolean byte other than 0 or 1 (reads as
true), and a varint longer than ten bytes (fastavro reads it modulo 2**64).

This leans on how fastavro's extension indexes a list, so ``strict_indexes_work`` probes
it once per process; where the probe fails (another fastavro build), ``AvroCodec`` falls
back to re-encoding each decoded record and comparing the bytes.
"""

from __future__ import annotations

import copy
from functools import cache
from io import BytesIO
from typing import Any

from fastavro import parse_schema, schemaless_reader

from lotflow.schemas.compiled_writer import avro_long

__all__ = ["strict_indexes_work", "strict_schema"]

class _NoWrapList(list[Any]):
    """A list that refuses to say its length: the compiled lookup asks for it only to wrap a
    negative index, which then fails instead of naming a branch or symbol."""

    __slots__ = ()

    def __len__(self) -> int:
        raise IndexError("negative union branch or enum index")


def strict_schema(parsed: Any) -> Any:
    """A copy of fastavro's parsed schema that refuses negative indexes (see the module doc).
    Use the copy for reading only: writers ask a union its length."""
    strict = copy.deepcopy(parsed)  # the memo keeps named types shared with their references
    _patch(strict, set())
    return strict


def _patch(node: Any, seen: set[int]) -> None:
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, dict):
        for key, value in list(node.items()):
            if key == "symbols" and isinstance(value, list):
                node[key] = _NoWrapList(value)
            elif key in ("type", "items", "values") and isinstance(value, list):  # a union
                for branch in value:
                    _patch(branch, seen)
                node[key] = _NoWrapList(value)
            elif key == "fields" and isinstance(value, list):
                for field in value:
                    _patch(field, seen)
            elif isinstance(value, dict):  # a nested type, or fastavro's named-types table
                _patch(value, seen)
                if key == "__named_schemas":
                    for named in value.values():
                        _patch(named, seen)


@cache
def strict_indexes_work() -> bool:
    """Does this fastavro build refuse a negative index through ``strict_schema``? Also checks
    that valid indexes still read (the probe covers an enum, a union and a named enum)."""
    probe = strict_schema(parse_schema({
        "type": "record", "name": "Probe", "namespace": "lotflow.internal", "fields": [
            {"name": "unit", "type": {"type": "enum", "name": "ProbeUnit", "symbols": ["a", "b", "c"]}},
            {"name": "price", "type": ["null", "double"]},
            {"name": "again", "type": "ProbeUnit"},
        ]}))

    def read(*indexes: int) -> Any:
        return schemaless_reader(BytesIO(b"".join(avro_long(i) for i in indexes)), probe, None)

    try:
        if read(2, 0, 1) != {"unit": "c", "price": None, "again": "b"}:
            return False
    except Exception:
        return False
    for corrupt in ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, -2, 0), (-(1 << 60) + 1, 0, 0), (0, -(1 << 63), 0)):
        try:
            read(*corrupt)
        except IndexError:
            continue
        except Exception:
            return False
        return False
    return True
