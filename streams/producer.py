"""The worker's output path: Avro-encode, then produce each batch in one Kafka transaction.

Faust's own send path (aiokafka, a future per message) costs far more than the work; the
agent produces through librdkafka instead. A batch's outputs and its table changelog records
are produced in one transaction, which commits while the agent handles the next batch; the
batch's events are acked, so Faust commits their input offsets, only after it committed. A
consumer reading ``read_committed`` sees all of a batch or nothing of it. A commit that fails is
retried, with back-off, from the same messages; while it fails the worker reports itself
unhealthy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException, Producer

from lotflow.kafka_clients import produce, producer_config
from lotflow.schemas.serde import AvroCodec, SchemaSource, SharedFields, bundled_schema_json
from lotflow.settings import Settings
from lotflow.streams.topics import TopicSpec, topic_by_name
from lotflow.verification.outputs import SHARED, Output, OutputKind

__all__ = ["Encoder", "Message", "MessageTooLarge", "TransactionalOutput"]

log = logging.getLogger(__name__)
RECORD_OVERHEAD_BYTES = 512  # record headers and batch framing on top of key + value
_SHARING = (OutputKind.VERIFIED, OutputKind.EXCEPTIONS, OutputKind.AUDIT)


class MessageTooLarge(ValueError):
    """An output would pass the broker's record size limit."""


@dataclass(slots=True)  # not frozen: built per event, and a frozen one costs 3x to build
class Message:
    topic: str
    key: bytes
    value: bytes | None
    partition: int | None = None


class Encoder:
    """Output records -> Confluent-wire Avro messages, checked against the record size limit.

    A decision's verified/exception record and its audit record begin with the same fields:
    ``encode_all`` writes those once per decision (records carrying ``SHARED``), the same bytes
    a separate encoding of each record gives.
    """

    def __init__(self, settings: Settings, source: SchemaSource) -> None:
        self.max_bytes = settings.max_message_bytes - RECORD_OVERHEAD_BYTES
        self._codecs: dict[str, tuple[str, AvroCodec, bool]] = {}
        self._by_kind: dict[OutputKind | TopicSpec, tuple[str, AvroCodec, bool]] = {}
        self._settings = settings
        self._source = source
        self._shared = SharedFields([bundled_schema_json(topic_by_name(kind.value).schema) for kind in _SHARING],
                                    epoch_millis=True)

    def _entry(self, kind: OutputKind | TopicSpec) -> tuple[str, AvroCodec, bool]:
        entry = self._by_kind.get(kind)
        if entry is None:
            spec = kind if isinstance(kind, TopicSpec) else topic_by_name(kind.value)
            entry = self._codecs.get(spec.name)
            if entry is None:
                topic = spec.full_name(self._settings)
                codec = AvroCodec(self._source, f"{topic}-value", spec.schema, epoch_millis=True)
                entry = self._codecs[spec.name] = (topic, codec, codec.share(self._shared))
            self._by_kind[kind] = entry
        return entry

    def encode(self, kind: OutputKind | TopicSpec, key: str, record: Mapping[str, Any]) -> Message:
        topic, codec, _ = self._entry(kind)
        return self._message(topic, key, codec.encode(record))

    def encode_all(self, outputs: Iterable[Output]) -> list[Message]:
        shared_bytes: dict[int, bytes] = {}  # id of a SHARED dict -> its encoding (alive for this call)
        out = []
        for kind, key, record in outputs:
            topic, codec, shares = self._entry(kind)
            shared = record.get(SHARED)
            if shared is None or not shares:
                out.append(self._message(topic, key, codec.encode(record)))
                continue
            head = shared_bytes.get(id(shared))
            if head is None:
                head = shared_bytes[id(shared)] = self._shared.encode(shared)
            out.append(self._message(topic, key, codec.encode_after(head, record)))
        return out

    def _message(self, topic: str, key: str, value: bytes) -> Message:
        key_bytes = key.encode()
        if len(value) + len(key_bytes) > self.max_bytes:
            raise MessageTooLarge(f"{topic} record of {len(value) + len(key_bytes)} bytes is above the "
                                  f"{self.max_bytes}-byte limit")
        return Message(topic, key_bytes, value)


class TransactionalOutput:
    """One producer, one transaction per batch; ``send``/``send_raw`` between ``begin`` and ``commit``."""

    def __init__(self, settings: Settings, transactional_id: str, producer: Producer | None = None,
                 crash_at: Callable[[str], None] | None = None) -> None:
        config = producer_config(
            settings,
            **{"transactional.id": transactional_id,
               "transaction.timeout.ms": int(settings.transaction_timeout_s * 1000),
               "message.max.bytes": settings.max_message_bytes})
        self._producer = producer or Producer(config)
        self._timeout = settings.transaction_timeout_s
        self._max_backoff = settings.commit_max_backoff_s
        self._batch: list[Message] = []
        self._open = False
        self._crash_at = crash_at or (lambda point: None)
        self.failing_since: float | None = None  # monotonic time of the first failed commit in a row
        self.last_commit_s = 0.0  # the last successful flush + commit, as the broker took it
        self._producer.init_transactions(self._timeout)

    @property
    def in_transaction(self) -> bool:
        return self._open

    def begin(self) -> None:
        if not self._open:
            self._producer.begin_transaction()
            self._open = True

    def send(self, message: Message) -> None:
        if not self._open:
            self.begin()
        self._batch.append(message)
        try:  # the common case without the keyword plumbing of produce(): this runs per output
            self._producer.produce(message.topic, message.value, message.key,
                                   -1 if message.partition is None else message.partition)
        except BufferError:
            produce(self._producer, message.topic, message.key, message.value, partition=message.partition)

    def send_raw(self, topic: str, key: bytes, value: bytes | None, partition: int | None = None) -> None:
        self.send(Message(topic, key, value, partition))

    async def commit(self) -> None:
        """Commit the batch's transaction; on failure retry (aborting and re-producing if it must)."""
        if not self._open:
            return
        self._crash_at("after_produce")
        backoff = 0.1
        loop = asyncio.get_running_loop()
        while True:
            try:
                # flush + commit block in librdkafka (GIL released): off the event loop, so the
                # health endpoint keeps answering while the broker is away; one hop, not two:
                # each result waits for the busy event loop to pick it up.
                remaining = await loop.run_in_executor(None, self._flush_and_commit)
                if not remaining:
                    break
                problem = f"{remaining} messages not acknowledged within {self._timeout}s"
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if error is None or error.fatal():
                    # fenced by a newer instance, or a producer that cannot go on: stop and restart
                    # from the changelog (the input marks make that exactly-once)
                    raise
                problem = str(exc)
                if error.txn_requires_abort():
                    await self._abort_quietly(loop)
                    self._reproduce()
                # else retriable: commit again as is
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            log.warning("transaction commit failed (%s); retrying in %.1fs", problem, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)
        self._open = False
        self._batch.clear()
        self.failing_since = None
        self._crash_at("after_commit")

    def _flush_and_commit(self) -> int:
        """Messages still unacknowledged after the flush (then nothing is committed), else 0."""
        started = time.perf_counter()
        remaining = int(self._producer.flush(self._timeout))
        if remaining:
            return remaining
        self._crash_at("before_commit")
        self._producer.commit_transaction(self._timeout)
        self.last_commit_s = time.perf_counter() - started
        return 0

    def _reproduce(self) -> None:
        self._producer.begin_transaction()
        for m in self._batch:
            produce(self._producer, m.topic, m.key, m.value, partition=m.partition)

    async def _abort_quietly(self, loop: asyncio.AbstractEventLoop) -> None:
        """Abort a transaction that cannot commit, retrying while the broker is away. A fatal
        error (fenced, or a producer a broker before 2.5 cannot repair after a restart) is
        raised: the worker then restarts from committed state, which the input marks make
        exactly-once, rather than carry on with a producer whose transaction state is unknown."""
        while True:
            try:
                await loop.run_in_executor(None, self._producer.abort_transaction, self._timeout)
                return
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if error is None or error.fatal():
                    raise
                log.warning("transaction abort failed (%s); retrying", exc)
                await asyncio.sleep(1.0)
