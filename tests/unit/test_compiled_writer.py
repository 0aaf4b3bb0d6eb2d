"""The compiled Avro writers write exactly fastavro's bytes, and refuse what fastavro refuses."""

from __future__ import annotations

import math
import struct
import zlib
from io import BytesIO
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.utils import generate_many
from prometheus_client import CollectorRegistry

from lotflow.metrics import WorkerMetrics
from lotflow.schemas.compiled_writer import Unsupported, compile_writer
from lotflow.schemas.serde import SCHEMA_DIR, AvroCodec, _plain_timestamps, bundled_schema_json, schema_source
from lotflow.settings import Settings
from lotflow.simulator.faults import parse_fault_spec
from lotflow.simulator.generate import generate
from lotflow.streams import topics
from lotflow.streams.receiving import InputEvent, ReceivingProcessor
from lotflow.streams.reference import normalize_spec
from lotflow.streams.state import DictState
from lotflow.verification.outputs import OutputKind

SCHEMAS = sorted(p.name.removesuffix(".avsc") for p in SCHEMA_DIR.glob("*.avsc"))


def fastavro_bytes(schema: dict[str, Any], record: Any) -> bytes:
    out = BytesIO()
    schemaless_writer(out, parse_schema(schema), record)
    return out.getvalue()


def compiled_bytes(schema: dict[str, Any], record: Any) -> bytes:
    out = bytearray()
    compile_writer(schema)(record, out)
    return bytes(out)


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_bundled_schema_compiles_and_writes_fastavros_bytes_for_random_records(name: str) -> None:
    schema = _plain_timestamps(bundled_schema_json(name))
    write = compile_writer(schema)
    parsed = parse_schema(schema)
    for record in generate_many(schema, 300):
        out = bytearray()
        write(record, out)
        expected = BytesIO()
        schemaless_writer(expected, parsed, record)
        assert bytes(out) == expected.getvalue()


def test_every_output_of_simulated_traffic_is_written_as_fastavro_writes_it() -> None:
    """The worker's own records (shared head + tail, lot events, dead letters from the
    simulator's corrupt records): each decodes and re-encodes with fastavro to the same bytes."""
    settings = Settings(document_wait_s=2)
    source = schema_source(None)
    codecs: dict[str, AvroCodec] = {}
    specs: dict[str, Any] = {}
    processor = ReceivingProcessor(settings, source, DictState(encoded=True), DictState(), specs,
                                   WorkerMetrics.create(CollectorRegistry()), clock=lambda: 1_700_000_000)
    processor.rebuild_indexes()
    offsets: dict[tuple[str, int], int] = {}
    for ev in generate(5, 600, parse_fault_spec("default"), start_ms=1_700_000_000_000):
        if ev.topic is topics.MATERIAL_SPECS:
            specs[ev.value["material_id"]] = normalize_spec(ev.value)
            continue
        if ev.topic not in (topics.PURCHASE_ORDERS, topics.RECEIPTS, topics.CERTIFICATES):
            continue
        name = ev.topic.full_name(settings)
        codec = codecs.setdefault(name, AvroCodec(source, f"{name}-value", ev.topic.schema))
        value = ev.value if isinstance(ev.value, bytes) else codec.encode(ev.value)
        partition = zlib.crc32(ev.key.encode()) % settings.partitions
        offset = offsets[(name, partition)] = offsets.get((name, partition), -1) + 1
        processor.handle(InputEvent(name, partition, offset, ev.key.encode(), value, 1_700_000_000_000))
    messages = processor.end_batch()
    by_topic = {spec.full_name(settings): spec for spec in (topics.topic_by_name(kind.value) for kind in OutputKind)}
    checked: dict[str, int] = {}
    for message in messages:
        spec = by_topic.get(message.topic)
        if spec is None or message.value is None:
            continue  # changelog records are JSON
        schema = parse_schema(_plain_timestamps(bundled_schema_json(spec.schema)))
        record = schemaless_reader(BytesIO(message.value[5:]), schema, None)
        again = BytesIO()
        schemaless_writer(again, schema, record)
        assert again.getvalue() == message.value[5:], message.topic
        checked[spec.name] = checked.get(spec.name, 0) + 1
    assert {"lotflow.verified", "lotflow.exceptions", "lotflow.audit", "lotflow.lot-events",
            "lotflow.dead-letters"} <= set(checked), checked


EDGE = {"type": "record", "name": "Edge", "namespace": "t", "fields": [
    {"name": "l", "type": "long"},
    {"name": "i", "type": "int"},
    {"name": "d", "type": "double"},
    {"name": "f", "type": "float"},
    {"name": "s", "type": "string"},
    {"name": "b", "type": "bytes"},
    {"name": "flag", "type": "boolean"},
    {"name": "e", "type": {"type": "enum", "name": "Colour", "symbols": ["RED", "GREEN"]}},
    {"name": "e2", "type": "Colour"},
    {"name": "a", "type": {"type": "array", "items": {"type": "map", "values": "long"}}},
    {"name": "opt", "type": ["null", "string", "long"]},
    {"name": "nested", "type": {"type": "record", "name": "Inner", "fields": [{"name": "x", "type": "long"}]}},
    {"name": "more", "type": {"type": "array", "items": "t.Inner"}},
    {"name": "with_default", "type": "string", "default": "dflt"},
    {"name": "nullable", "type": ["null", "double"]},
]}


def edge(**overrides: Any) -> dict[str, Any]:
    record = {"l": 0, "i": 0, "d": 0.0, "f": 0.0, "s": "", "b": b"", "flag": False, "e": "RED", "e2": "GREEN",
              "a": [], "opt": None, "nested": {"x": 1}, "more": [], "with_default": "x", "nullable": None}
    record.update(overrides)
    return record


@pytest.mark.parametrize("overrides", [
    {},
    {"l": -(1 << 63), "i": -(1 << 31)}, {"l": (1 << 63) - 1, "i": (1 << 31) - 1},
    {"l": 8191, "i": -8192}, {"l": 8192, "i": -8193}, {"l": 1_700_000_000_000},
    {"d": math.nan, "f": math.inf}, {"d": -0.0, "f": 1e-40}, {"d": 3, "f": 2},
    {"s": "Grüße ✓ 𝄞", "b": bytes(range(256)) * 100}, {"s": "x" * 1_000_000},
    {"flag": True, "e": "GREEN"},
    {"a": [{}, {"k": -1, "ü": 1 << 40}], "more": [{"x": -5}, {"x": 6}]},
    {"opt": "text", "nullable": 1.5}, {"opt": -3},
    {"flag": 1},
])
def test_edge_values_match_fastavro(overrides: dict[str, Any]) -> None:
    record = edge(**overrides)
    assert compiled_bytes(EDGE, record) == fastavro_bytes(EDGE, record)


def test_a_missing_field_takes_its_default_or_null_like_fastavro() -> None:
    record = edge()
    del record["with_default"], record["nullable"], record["opt"]
    assert compiled_bytes(EDGE, record) == fastavro_bytes(EDGE, record)


@pytest.mark.parametrize("overrides", [
    {"l": 1 << 63}, {"i": 1 << 31}, {"l": 1.5}, {"l": "7"}, {"s": 7}, {"s": None}, {"b": "text"},
    {"e": "BLUE"}, {"d": "x"}, {"opt": 1.5}, {"nested": None}, {"a": [{"k": "v"}]},
    {"a": None}, {"a": 0}, {"a": False}, {"a": [None]}, {"more": None}, {"a": [[]]},
])
def test_values_that_do_not_fit_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError, KeyError, AttributeError, OverflowError, struct.error)):
        compiled_bytes(EDGE, edge(**overrides))


def test_a_record_without_a_required_field_is_refused_by_the_codec() -> None:
    codec = AvroCodec(schema_source(None), "x", "lotflow.verification.LotEvent", epoch_millis=True)
    assert codec._write is not None
    with pytest.raises(ValueError, match="does not fit"):
        codec.encode({"id": "x"})


@pytest.mark.parametrize("schema", [
    {"type": "record", "name": "F", "fields": [{"name": "f", "type": {"type": "fixed", "name": "H", "size": 4}}]},
    {"type": "record", "name": "U", "fields": [{"name": "u", "type": ["null", "float", "double"]}]},
    {"type": "record", "name": "V", "fields": [{"name": "u", "type": ["int", "long"]}]},
    {"type": "record", "name": "W", "fields": [{"name": "u", "type": [
        {"type": "record", "name": "P", "fields": [{"name": "x", "type": "long"}]},
        {"type": "map", "values": "string"}]}]},
    {"type": "record", "name": "T", "fields": [{"name": "t", "type": {"type": "long",
                                                                      "logicalType": "timestamp-millis"}}]},
])
def test_what_is_not_compiled_is_said_so(schema: dict[str, Any]) -> None:
    with pytest.raises(Unsupported):
        compile_writer(schema)
