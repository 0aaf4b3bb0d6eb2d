"""Confluent wire format: interop with confluent-kafka's own serializers, and schema evolution."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from lotflow.schemas import serde
from lotflow.schemas.compiled_writer import avro_long
from lotflow.schemas.serde import (
    AvroCodec,
    BundledSchemas,
    DecodeError,
    RegistrySchemas,
    bundled_schema_json,
    schema_source,
)
from lotflow.schemas.strict_index import strict_indexes_work

TOPIC = "plant.receipts"
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def receipt() -> dict[str, Any]:
    return {
        "receipt_id": "R-1", "po_number": "PO-1", "vendor_id": "V-1", "dock": "D1", "received_at": NOW,
        "lines": [{"po_line": 1, "material_id": "MAT-1", "quantity": 12.5, "unit": "KG", "vendor_lot": "L-1",
                   "unit_price": 3.25, "partial": False}],
        "event_time": NOW,
    }


def evolved(schema: dict[str, Any]) -> dict[str, Any]:
    v2 = copy.deepcopy(schema)
    v2["fields"].append({"name": "carrier", "type": "string", "default": "", "doc": "Carrier (added in v2)."})
    return v2


def ctx() -> SerializationContext:
    return SerializationContext(TOPIC, MessageField.VALUE)


def test_round_trip_with_bundled_ids() -> None:
    codec = AvroCodec(BundledSchemas.default(), f"{TOPIC}-value", "lotflow.plant.Receipt")
    data = codec.encode(receipt())
    assert data[0] == 0 and int.from_bytes(data[1:5], "big") == codec.schema_id
    assert codec.decode(data) == receipt()


def test_bundled_ids_are_deterministic() -> None:
    a = AvroCodec(BundledSchemas.default(), "x", "lotflow.plant.Receipt").schema_id
    b = AvroCodec(BundledSchemas.default(), "y", "lotflow.plant.Receipt").schema_id
    other = AvroCodec(BundledSchemas.default(), "x", "lotflow.erp.PurchaseOrder").schema_id
    assert a == b != other


def test_confluent_serializer_output_is_read_by_lotflow_and_the_reverse() -> None:
    client = SchemaRegistryClient.new_client({"url": "mock://interop"})
    schema = bundled_schema_json("lotflow.plant.Receipt")
    serializer = AvroSerializer(client, json.dumps(schema))
    codec = AvroCodec(RegistrySchemas(client), f"{TOPIC}-value", "lotflow.plant.Receipt")

    assert codec.decode(serializer(receipt(), ctx())) == receipt()
    assert AvroDeserializer(client)(codec.encode(receipt()), ctx()) == receipt()


@pytest.mark.parametrize("use_registry", [False, True])
def test_schema_evolution_keeps_old_and_new_readers_working(use_registry: bool) -> None:
    v1 = bundled_schema_json("lotflow.plant.Receipt")
    v2 = evolved(v1)
    if use_registry:
        client = SchemaRegistryClient.new_client({"url": "mock://evolution"})
        old, new = RegistrySchemas(client), RegistrySchemas(client)
    else:
        old = new = BundledSchemas([v1, v2])
    old_codec = AvroCodec(old, f"{TOPIC}-value", v1)
    new_codec = AvroCodec(new, f"{TOPIC}-value", v2)

    from_old = new_codec.decode(old_codec.encode(receipt()))
    assert from_old["carrier"] == "" and from_old["receipt_id"] == "R-1"
    from_new = old_codec.decode(new_codec.encode({**receipt(), "carrier": "DHL"}))
    assert from_new == receipt()


@pytest.mark.parametrize(
    ("data", "error_class"),
    [(b"", "DECODE"), (b"{\"json\": true}", "DECODE"), (b"\x00\x00\x00\x00\x07abc", "SCHEMA")],
)
def test_bad_bytes_raise_decode_error(data: bytes, error_class: str) -> None:
    codec = AvroCodec(BundledSchemas.default(), "x", "lotflow.plant.Receipt")
    with pytest.raises(DecodeError) as info:
        codec.decode(data)
    assert info.value.error_class == error_class


def test_truncated_body_is_a_decode_error() -> None:
    codec = AvroCodec(BundledSchemas.default(), "x", "lotflow.plant.Receipt")
    data = codec.encode(receipt())
    with pytest.raises(DecodeError):
        codec.decode(data[: len(data) // 2])


def test_record_that_does_not_fit_the_schema_is_rejected_on_encode() -> None:
    codec = AvroCodec(BundledSchemas.default(), "x", "lotflow.plant.Receipt")
    with pytest.raises(ValueError, match="does not fit"):
        codec.encode({"receipt_id": "R"})


def test_index_checks_apply_only_where_an_index_can_be_corrupt() -> None:
    """Schemas without unions or enums need neither the strict schema nor the re-encode."""
    def checked(schema: dict[str, Any] | str) -> bool:
        return AvroCodec(schema_source(None), "x", schema)._indexed

    assert checked("lotflow.plant.Receipt") and checked("lotflow.erp.PurchaseOrder")  # unit enums, price union
    assert not checked("lotflow.plant.CertificateOfAnalysis")
    enum_by_name = {"type": "record", "name": "A", "fields": [
        {"name": "first", "type": {"type": "enum", "name": "Unit", "symbols": ["kg", "lb"]}},
        {"name": "again", "type": {"type": "array", "items": "Unit"}}]}
    record_by_name = {"type": "record", "name": "B", "fields": [
        {"name": "r", "type": {"type": "record", "name": "R", "fields": [{"name": "x", "type": "long"}]}},
        {"name": "rs", "type": {"type": "array", "items": "R"}},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}}]}
    assert checked(enum_by_name) and not checked(record_by_name)


def test_this_fastavro_build_refuses_negative_indexes_without_a_second_pass() -> None:
    """The fast path (``strict_index``) holds on the pinned fastavro; if an upgrade breaks it the
    codec stays correct (re-encode fallback, tested below) but decodes at half the speed."""
    assert strict_indexes_work()
    codec = AvroCodec(schema_source(None), "x", "lotflow.plant.Receipt")
    assert codec._strict and not codec._check_canonical


def _with_index(codec: AvroCodec, unit_price: float | None, offset_from_lot: int, byte: int) -> bytes:
    """A one-line receipt with the byte ``offset_from_lot`` from its vendor lot "L-1" replaced:
    the unit enum sits just before the lot's length byte (-2), the price union right after it (+3)."""
    value = bytearray(codec.encode({**receipt(), "lines": [{**receipt()["lines"][0], "unit": "KG",
                                                             "unit_price": unit_price}]}))
    value[bytes(value).index(b"L-1") + offset_from_lot] = byte
    return bytes(value)


@pytest.mark.parametrize("strict", [True, False], ids=["strict-schema", "re-encode-fallback"])
def test_negative_enum_and_union_indexes_are_decode_errors(strict: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not strict:
        monkeypatch.setattr(serde, "strict_indexes_work", lambda: False)
    codec = AvroCodec(schema_source(None), "x", "lotflow.plant.Receipt")
    assert codec._strict is strict
    assert codec.decode(_with_index(codec, None, -2, 0x02))["lines"][0]["unit"] != "KG"  # the probe hits the enum
    assert codec.decode(_with_index(codec, None, 3, 0x00))["lines"][0]["unit_price"] is None  # and the union
    for offset in (-2, 3):  # zigzag 0x01 is -1, 0x03 is -2: a symbol or branch counted from the end
        for byte in (0x01, 0x03):
            with pytest.raises(DecodeError):
                codec.decode(_with_index(codec, None, offset, byte))
        with pytest.raises(DecodeError, match="index"):  # -2 reads as a valid branch if not refused
            codec.decode(_with_index(codec, None, offset, 0x03))
    assert codec.decode(codec.encode(receipt())) == receipt()


@pytest.mark.parametrize("index", [-1, -2, -11, -(1 << 60) + 1, -(1 << 63)])
def test_any_negative_enum_index_is_refused_by_the_strict_schema(index: int) -> None:
    """Not only the small ones: a length-based trick would let ``-2**60 + 1`` wrap onto a symbol."""
    codec = AvroCodec(schema_source(None), "x", "lotflow.plant.Receipt")
    value = bytearray(_with_index(codec, None, -2, 0x00))
    at = bytes(value).index(b"L-1") - 2
    value[at:at + 1] = avro_long(index)
    with pytest.raises(DecodeError, match="index"):
        codec.decode(bytes(value))
