"""Every bundled Avro schema is self-contained, documented and named after its file."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro
import pytest

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas" / "avro"
SCHEMA_FILES = sorted(SCHEMA_DIR.glob("*.avsc"))

# Field names that hold a point in time: event_time, received_at, invoice_date, at, since...
TIME_FIELD = re.compile(r"^(at|since|valid_from|valid_to)$|_(at|time|date)$")
TIMESTAMP_TYPES = {"timestamp-millis", "timestamp-micros"}
EXPECTED_INPUTS = {
    "lotflow.erp.SupplierInvoice",
    "lotflow.erp.BillOfMaterials",
    "lotflow.plant.QcResult",
    "lotflow.plant.ProductionRecord",
    "lotflow.plant.LaborClockEvent",
    "lotflow.plant.Shipment",
    "lotflow.plant.AssetStatus",
}


def _load(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        schema: dict[str, Any] = json.load(fh)
    return schema


def _branches(typ: Any) -> Iterator[Any]:
    """The concrete types a field type can take (union members, or the type itself)."""
    if isinstance(typ, list):
        yield from typ
    else:
        yield typ


def _named_types(typ: Any) -> Iterator[dict[str, Any]]:
    """Every inline named type (record, enum, fixed) reachable from ``typ``."""
    for branch in _branches(typ):
        if not isinstance(branch, dict):
            continue
        kind = branch.get("type")
        if kind in ("record", "enum", "fixed"):
            yield branch
        if kind == "record":
            for field in branch["fields"]:
                yield from _named_types(field["type"])
        elif kind == "array":
            yield from _named_types(branch["items"])
        elif kind == "map":
            yield from _named_types(branch["values"])


def _records(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for t in _named_types(schema) if t["type"] == "record"]


def _is_timestamp(typ: Any) -> bool:
    """``typ`` is a timestamp logical type, optionally inside a nullable union."""
    non_null = [b for b in _branches(typ) if b != "null"]
    if len(non_null) != 1 or not isinstance(non_null[0], dict):
        return False
    return non_null[0].get("type") == "long" and non_null[0].get("logicalType") in TIMESTAMP_TYPES


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_schema_directory_is_not_empty() -> None:
    assert len(SCHEMA_FILES) >= len(EXPECTED_INPUTS)


def test_all_mission_input_schemas_exist() -> None:
    present = {p.name.removesuffix(".avsc") for p in SCHEMA_FILES}
    missing = sorted(EXPECTED_INPUTS - present)
    assert not missing, missing


def test_every_declared_topic_has_a_schema_file() -> None:
    from lotflow.streams.topics import TOPICS

    present = {p.name.removesuffix(".avsc") for p in SCHEMA_FILES}
    missing = sorted({spec.schema for spec in TOPICS} - present)
    assert not missing, missing


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=_ids(SCHEMA_FILES))
def test_parses_alone_with_fastavro(path: Path) -> None:
    # A fresh named_schemas per file: each file must register alone in a Schema Registry.
    parsed = fastavro.schema.parse_schema(_load(path), named_schemas={})
    assert isinstance(parsed, dict)
    assert parsed["type"] == "record"


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=_ids(SCHEMA_FILES))
def test_file_name_is_namespace_dot_name(path: Path) -> None:
    schema = _load(path)
    assert schema.get("namespace"), "top-level record needs an explicit namespace"
    assert path.name == f"{schema['namespace']}.{schema['name']}.avsc"


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=_ids(SCHEMA_FILES))
def test_every_named_type_and_field_has_a_doc(path: Path) -> None:
    schema = _load(path)
    undocumented: list[str] = []
    for named in _named_types(schema):
        if not str(named.get("doc", "")).strip():
            undocumented.append(f"{named['type']} {named['name']}")
    for record in _records(schema):
        for field in record["fields"]:
            if not str(field.get("doc", "")).strip():
                undocumented.append(f"{record['name']}.{field['name']}")
    assert not undocumented, undocumented


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=_ids(SCHEMA_FILES))
def test_every_timestamp_field_uses_a_logical_type(path: Path) -> None:
    schema = _load(path)
    time_fields = [
        (record["name"], field)
        for record in _records(schema)
        for field in record["fields"]
        if TIME_FIELD.search(field["name"])
    ]
    assert time_fields, "every record file carries at least one timestamp"
    wrong = [f"{rec}.{f['name']}" for rec, f in time_fields if not _is_timestamp(f["type"])]
    assert not wrong, f"timestamp fields without a timestamp logical type: {wrong}"


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=_ids(SCHEMA_FILES))
def test_timestamp_logical_types_sit_on_time_named_fields(path: Path) -> None:
    """The converse: a timestamp-typed field is named like one, so the rule above sees it."""
    schema = _load(path)
    misnamed = [
        f"{record['name']}.{field['name']}"
        for record in _records(schema)
        for field in record["fields"]
        if _is_timestamp(field["type"]) and not TIME_FIELD.search(field["name"])
    ]
    assert not misnamed, misnamed
