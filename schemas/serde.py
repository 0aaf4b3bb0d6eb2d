"""Avro in the Confluent wire format: magic byte 0, 4-byte big-endian schema id, Avro body.

Records written by Confluent's serializers are read as-is, and the reverse. Schema ids
come from a Schema Registry when ``LOTFLOW_SCHEMA_REGISTRY_URL`` is set, otherwise from
the bundled ``schemas/avro`` files: each schema's id is derived from the Rabin fingerprint
of its canonical form, so the mapping is the same on every machine and every version of a
schema gets its own id.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from functools import cache
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol, cast

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from lotflow.schemas.compiled_writer import Unsupported, Writer, compile_writer
from lotflow.schemas.strict_index import strict_indexes_work, strict_schema

__all__ = [
    "AvroCodec",
    "BundledSchemas",
    "DecodeError",
    "RegistrySchemas",
    "SchemaSource",
    "SharedFields",
    "bundled_schema_json",
    "schema_source",
]

SCHEMA_DIR = Path(__file__).parent / "avro"
_HEADER = struct.Struct(">bI")
MAGIC = 0

Record = dict[str, Any]


class DecodeError(ValueError):
    """Input bytes that are not a valid record of the expected schema."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class


class SchemaSource(Protocol):
    """Where schema ids come from."""

    def id_for(self, subject: str, schema: Mapping[str, Any]) -> int: ...

    def writer_schema(self, schema_id: int) -> Any: ...


@cache
def bundled_schema_json(full_name: str) -> dict[str, Any]:
    path = SCHEMA_DIR / f"{full_name}.avsc"
    if not path.exists():
        raise KeyError(f"no bundled schema {full_name!r} in {SCHEMA_DIR}")
    with path.open() as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def _bundled_id(schema: Mapping[str, Any]) -> int:
    canonical = to_parsing_canonical_form(parse_schema(dict(schema)))
    return int(fingerprint(canonical, "CRC-64-AVRO")[:8], 16) & 0x7FFFFFFF


class BundledSchemas:
    """Deterministic ids for a fixed set of schemas (by default every bundled .avsc)."""

    def __init__(self, schemas: Iterable[Mapping[str, Any]]) -> None:
        self._by_id: dict[int, Any] = {}
        for schema in schemas:
            schema_id = _bundled_id(schema)
            self._by_id[schema_id] = parse_schema(dict(schema))

    @classmethod
    def default(cls) -> BundledSchemas:
        return cls(json.loads(p.read_text()) for p in sorted(SCHEMA_DIR.glob("*.avsc")))

    def add(self, schema: Mapping[str, Any]) -> int:
        schema_id = _bundled_id(schema)
        self._by_id.setdefault(schema_id, parse_schema(dict(schema)))
        return schema_id

    def id_for(self, subject: str, schema: Mapping[str, Any]) -> int:
        return self.add(schema)

    def writer_schema(self, schema_id: int) -> Any:
        try:
            return self._by_id[schema_id]
        except KeyError:
            raise DecodeError("SCHEMA", f"unknown schema id {schema_id}") from None


class RegistrySchemas:
    """Ids from a Confluent-compatible Schema Registry (``mock://`` works for tests)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._ids: dict[tuple[str, str], int] = {}
        self._writers: dict[int, Any] = {}

    @classmethod
    def from_url(cls, url: str) -> RegistrySchemas:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        return cls(SchemaRegistryClient.new_client({"url": url}))

    def id_for(self, subject: str, schema: Mapping[str, Any]) -> int:
        from confluent_kafka.schema_registry import Schema

        text = json.dumps(schema, sort_keys=True)
        key = (subject, text)
        if key not in self._ids:
            self._ids[key] = self._client.register_schema(subject, Schema(json.dumps(schema), "AVRO"))
        return self._ids[key]

    def writer_schema(self, schema_id: int) -> Any:
        if schema_id not in self._writers:
            try:
                registered = self._client.get_schema(schema_id)
            except Exception as exc:  # the registry raises its own error types
                raise DecodeError("SCHEMA", f"schema id {schema_id} not in registry: {exc}") from exc
            self._writers[schema_id] = parse_schema(json.loads(registered.schema_str))
        return self._writers[schema_id]


_DEFAULT_BUNDLED: BundledSchemas | None = None


def schema_source(registry_url: str | None) -> SchemaSource:
    """The schema source for a deployment: the registry if configured, else the bundled files."""
    global _DEFAULT_BUNDLED
    if registry_url:
        return RegistrySchemas.from_url(registry_url)
    if _DEFAULT_BUNDLED is None:
        _DEFAULT_BUNDLED = BundledSchemas.default()
    return _DEFAULT_BUNDLED


class SharedFields:
    """The leading fields several record schemas declare identically, encoded once for all.

    An Avro record is its fields' encodings one after another, so when schemas begin with the
    same field declarations, the bytes of those fields are the same in each: a decision's
    verified/exception record and its audit record share their first thirteen fields. ``encode``
    writes them once; ``AvroCodec.encode_after`` appends a record's remaining fields.
    """

    def __init__(self, schemas: Iterable[Mapping[str, Any]], *, epoch_millis: bool = False) -> None:
        field_lists = [[_without_docs(f) for f in schema["fields"]] for schema in schemas]
        count = 0
        while all(len(f) > count for f in field_lists) and all(
                f[count] == field_lists[0][count] for f in field_lists):
            count += 1
        self.count = count
        first = field_lists[0]
        shared = {"type": "record", "name": "SharedFields", "namespace": "lotflow.internal", "fields": first[:count]}
        self._schema = parse_schema(_plain_timestamps(shared) if epoch_millis else shared)
        self._write = _compiled(_plain_timestamps(shared) if epoch_millis else shared)
        self._declared = [f[:count] for f in field_lists]

    def covers(self, schema: Mapping[str, Any]) -> bool:
        return self.count > 0 and [_without_docs(f) for f in schema["fields"][:self.count]] in self._declared

    def encode(self, record: Mapping[str, Any]) -> bytes:
        if self._write is not None:
            buffer = bytearray()
            _write_or_explain(self._write, record, buffer, "the shared fields")
            return bytes(buffer)
        out = BytesIO()
        schemaless_writer(out, self._schema, record)
        return out.getvalue()


class AvroCodec:
    """Encode/decode one topic's values with its reader schema."""

    def __init__(
        self, source: SchemaSource, subject: str, schema: Mapping[str, Any] | str, *, epoch_millis: bool = False
    ) -> None:
        """``epoch_millis``: timestamps are read and written as int milliseconds, not datetimes
        (the same bytes; it spares a datetime conversion per field on the hot path)."""
        schema_json = bundled_schema_json(schema) if isinstance(schema, str) else dict(schema)
        self.full_name = f"{schema_json.get('namespace', '')}.{schema_json['name']}".lstrip(".")
        self._source = source
        self._epoch_millis = epoch_millis
        self._schema_json = schema_json
        self._reader = parse_schema(_plain_timestamps(schema_json) if epoch_millis else schema_json)
        self._write = _compiled(_plain_timestamps(schema_json) if epoch_millis else schema_json)
        self._tail: Any = None  # the fields after the shared ones (see ``share``)
        self._write_tail: Writer | None = None
        self._schema_id = source.id_for(subject, schema_json)
        self._header = _HEADER.pack(MAGIC, self._schema_id)
        self._resolved: dict[int, Any] = {}
        # fastavro reads a negative union branch or enum index as counting from the end (Python
        # indexing), so a corrupt index would decode as the last branch or symbol. Where the schema
        # has unions or enums, records are read with a schema that refuses such an index
        # (``strict_index``); where this fastavro build defeats that, a decoded record must encode
        # back to the same bytes (a second pass, as costly as the decode).
        self._indexed = _has_index(schema_json)
        self._strict = self._indexed and strict_indexes_work()
        self._check_canonical = self._indexed and not self._strict
        self._read_schema = strict_schema(self._reader) if self._strict else self._reader

    @property
    def schema_id(self) -> int:
        return self._schema_id

    def share(self, shared: SharedFields) -> bool:
        """Let ``encode_after`` write this schema's fields after ``shared``'s; False if it does not begin with them."""
        if not shared.covers(self._schema_json):
            return False
        tail = {"type": "record", "name": "RemainingFields", "namespace": "lotflow.internal",
                "fields": list(self._schema_json["fields"])[shared.count:]}
        try:  # a remaining field that names a type declared among the shared ones cannot stand alone
            self._tail = parse_schema(_plain_timestamps(tail) if self._epoch_millis else tail)
        except Exception:  # fastavro raises its own schema errors
            return False
        self._write_tail = _compiled(_plain_timestamps(tail) if self._epoch_millis else tail)
        return True

    def encode_after(self, shared_bytes: bytes, record: Mapping[str, Any]) -> bytes:
        """The record, given the encoding of its shared leading fields (see ``share``)."""
        if self._write_tail is not None:
            buffer = bytearray(self._header)
            buffer += shared_bytes
            _write_or_explain(self._write_tail, record, buffer, self.full_name)
            return bytes(buffer)
        out = BytesIO()
        out.write(self._header)
        out.write(shared_bytes)
        try:
            schemaless_writer(out, self._tail, record)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"record does not fit {self.full_name}: {exc}") from exc
        return out.getvalue()

    def encode(self, record: Mapping[str, Any]) -> bytes:
        if self._write is not None:
            buffer = bytearray(self._header)
            _write_or_explain(self._write, record, buffer, self.full_name)
            return bytes(buffer)
        out = BytesIO()
        out.write(self._header)
        try:
            schemaless_writer(out, self._reader, record)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"record does not fit {self.full_name}: {exc}") from exc
        return out.getvalue()

    def decode(self, data: bytes | None) -> Record:
        if not data or len(data) < _HEADER.size:
            raise DecodeError("DECODE", "empty or truncated message (no Confluent header)")
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise DecodeError("DECODE", f"unknown magic byte {magic}")
        body = BytesIO(data)
        body.seek(_HEADER.size)
        try:
            if schema_id == self._schema_id:
                record = cast(Record, schemaless_reader(body, self._read_schema, None))
            else:
                writer = self._resolved.get(schema_id)
                if writer is None:
                    writer = self._source.writer_schema(schema_id)
                    if self._epoch_millis:
                        writer = parse_schema(_plain_timestamps(_schema_json(writer)))
                    if strict_indexes_work():
                        writer = strict_schema(writer)
                    self._resolved[schema_id] = writer
                record = cast(Record, schemaless_reader(body, writer, self._reader))
        except DecodeError:
            raise
        except IndexError as exc:
            raise DecodeError("DECODE", f"Avro body of {self.full_name} has a union branch or enum index "
                                        "out of range (negative, or past the last), or is cut short") from exc
        except Exception as exc:  # fastavro raises many types on corrupt bodies
            raise DecodeError("DECODE", f"Avro body does not decode as {self.full_name}: {exc!r}") from exc
        if body.tell() != len(data):
            raise DecodeError("DECODE", f"{len(data) - body.tell()} trailing bytes after the record")
        if self._check_canonical and schema_id == self._schema_id:
            again = BytesIO()
            again.write(self._header)
            schemaless_writer(again, self._reader, record)
            if again.getbuffer() != data:
                raise DecodeError("DECODE", f"Avro body of {self.full_name} is not canonical: "
                                            "a negative union branch or enum index, or an over-long number")
        return record


def _compiled(schema: Mapping[str, Any]) -> Writer | None:
    """The schema's compiled writer, or None where fastavro writes it (see ``compiled_writer``)."""
    try:
        return compile_writer(schema)
    except Unsupported:
        return None


def _write_or_explain(write: Writer, record: Mapping[str, Any], buffer: bytearray, what: str) -> None:
    try:
        write(record, buffer)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, struct.error) as exc:
        raise ValueError(f"record does not fit {what}: {exc!r}") from exc


def _without_docs(schema: Any) -> Any:
    """A declaration without its ``doc`` strings (they do not change the encoding)."""
    if isinstance(schema, list):
        return [_without_docs(s) for s in schema]
    if isinstance(schema, dict):
        return {k: _without_docs(v) for k, v in schema.items() if k != "doc"}
    return schema


def _plain_timestamps(schema: Any) -> Any:
    """The schema with timestamp logical types dropped: their values read as plain longs."""
    if isinstance(schema, list):
        return [_plain_timestamps(s) for s in schema]
    if isinstance(schema, dict):
        if schema.get("logicalType") in ("timestamp-millis", "timestamp-micros"):
            return schema["type"]
        return {k: _plain_timestamps(v) if k in ("type", "items", "values", "fields") else v
                for k, v in schema.items() if not k.startswith("__")}
    return schema


def _schema_json(parsed: Any) -> Any:
    return {k: v for k, v in parsed.items() if not k.startswith("__")} if isinstance(parsed, dict) else parsed


def _has_index(schema: Any, named: dict[str, Any] | None = None) -> bool:
    """Does the schema contain a union or an enum (an index that can be corrupt)? Named types
    referred to by name count as what they name."""
    named = {} if named is None else named
    if isinstance(schema, list):
        return True
    if isinstance(schema, str):
        return named.get(schema, False)
    if not isinstance(schema, dict):
        return False
    kind = schema.get("type")
    if kind == "enum":
        found = True
    elif kind == "record":
        found = False
        _name(schema, named, False)  # a recursive reference adds nothing
        for f in schema["fields"]:
            found = _has_index(f["type"], named) or found
    elif kind == "array":
        found = _has_index(schema["items"], named)
    elif kind == "map":
        found = _has_index(schema["values"], named)
    else:
        found = isinstance(kind, list | dict) and _has_index(kind, named)
    if "name" in schema:
        _name(schema, named, found)
    return found


def _name(schema: Mapping[str, Any], named: dict[str, Any], found: bool) -> None:
    """Record what a named type holds under its full and its short name."""
    full_name = f"{schema.get('namespace', '')}.{schema['name']}".lstrip(".")
    named[full_name] = named[schema["name"]] = found
