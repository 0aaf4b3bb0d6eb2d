"""Kafka side of the simulator: encode the generated events, produce them, record truth.

Each receipt-topic record's ground truth is produced to the ground-truth topic once its
delivery report says where it landed (partition/offset), so the truth joins the
pipeline's input references. Keys are partitioned with ``murmur2_random``, the Java and
Faust default, so a PO's receipts, CoAs and PO land on the same partition number.
"""

from __future__ import annotations

import json
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Protocol

from lotflow.kafka_clients import RedeliveringProducer
from lotflow.kafka_clients import producer_config as base_producer_config
from lotflow.schemas.serde import AvroCodec, schema_source
from lotflow.settings import Settings
from lotflow.simulator.faults import FaultMix
from lotflow.simulator.generate import SimEvent, generate
from lotflow.simulator.malformed import HEADER_SIZE
from lotflow.streams.topics import GROUND_TRUTH, RECEIPTS, TopicSpec

__all__ = ["ProducerLike", "PublishReport", "producer_config", "publish"]

Record = dict[str, Any]
DeliveryCallback = Callable[[Any, Any], None]
MAX_ERRORS_KEPT = 10
UNPACED_GAP_MS = 1.0  # event-time step per receipt when publishing as fast as possible
MIN_WAIT_S = 0.001


class ProducerLike(Protocol):
    """The part of ``confluent_kafka.Producer`` the publisher uses."""

    def produce(self, topic: str, *, value: bytes | None = None, key: bytes | None = None,
                on_delivery: DeliveryCallback | None = None) -> None: ...

    def poll(self, timeout: float = ...) -> int: ...

    def flush(self, timeout: float = ...) -> int: ...

    def __len__(self) -> int: ...


@dataclass
class PublishReport:
    per_topic: dict[str, int] = field(default_factory=dict)  # full topic name -> records delivered
    per_fault: dict[str, int] = field(default_factory=dict)  # truth fault code -> receipt-topic records
    per_benign: dict[str, int] = field(default_factory=dict)  # truth benign code -> receipt-topic records
    receipts: int = 0  # receipt-topic records produced
    ground_truth: int = 0  # ground-truth records delivered
    failed: int = 0  # records the broker did not accept (after redelivery attempts)
    redelivered: int = 0  # records produced again after a transient delivery failure
    errors: list[str] = field(default_factory=list)  # the first few delivery errors
    elapsed_s: float = 0.0

    @property
    def receipts_per_s(self) -> float:
        return self.receipts / self.elapsed_s if self.elapsed_s > 0 else 0.0


def producer_config(settings: Settings) -> dict[str, Any]:
    """The project's producer settings (``murmur2_random`` partitioner, idempotence, lz4)."""
    return base_producer_config(settings, **{"linger.ms": 5})


class _Publisher:
    def __init__(self, settings: Settings, producer: RedeliveringProducer, truth_file: IO[str] | None) -> None:
        self.settings = settings
        self.producer = producer
        self.truth_file = truth_file
        self.source = schema_source(settings.schema_registry_url)
        self.codecs: dict[str, AvroCodec] = {}
        self.report = PublishReport()
        self.delivered: Counter[str] = Counter()
        self.ready: list[Record] = []  # ground truths whose record's offset is known
        self.truth_topic = settings.topic(GROUND_TRUTH.name)
        receipt_id = self.codec(RECEIPTS).schema_id
        self.receipt_header = struct.pack(">bI", 0, receipt_id)

    def codec(self, spec: TopicSpec) -> AvroCodec:
        codec = self.codecs.get(spec.name)
        if codec is None:
            subject = f"{self.settings.topic(spec.name)}-value"
            codec = self.codecs[spec.name] = AvroCodec(self.source, subject, spec.schema)
        return codec

    def encode(self, event: SimEvent) -> bytes:
        if isinstance(event.value, bytes):
            truth = event.truth or {}
            if truth.get("fault") == "MALFORMED_MISSING_FIELDS" and len(event.value) > HEADER_SIZE:
                return self.receipt_header + event.value[HEADER_SIZE:]  # this deployment's id
            return event.value
        return self.codec(event.topic).encode(event.value)

    # --- delivery reports ---------------------------------------------------------------
    def _failed(self, err: Any) -> None:
        self.report.failed += 1
        if len(self.report.errors) < MAX_ERRORS_KEPT:
            self.report.errors.append(str(err))

    def on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._failed(err)
        else:
            self.delivered[msg.topic()] += 1

    def receipt_callback(self, truth: Record) -> DeliveryCallback:
        def on_delivery(err: Any, msg: Any) -> None:
            self.on_delivery(err, msg)
            if err is None:
                self.ready.append({
                    **truth,
                    "source_topic": msg.topic(),
                    "source_partition": msg.partition(),
                    "source_offset": msg.offset(),
                })
        return on_delivery

    # --- producing ----------------------------------------------------------------------
    def produce(self, topic: str, key: str, value: bytes, callback: DeliveryCallback) -> None:
        # back-pressure and redelivery of transient failures: kafka_clients.RedeliveringProducer
        self.producer.send(topic, key.encode() if key else None, value, on_delivery=callback)

    def send(self, event: SimEvent) -> None:
        callback = self.on_delivery if event.truth is None else self.receipt_callback(event.truth)
        self.produce(self.settings.topic(event.topic.name), event.key, self.encode(event), callback)

    def send_ready_truths(self) -> None:
        codec = self.codec(GROUND_TRUTH)
        while self.ready:
            batch, self.ready = self.ready, []
            for record in batch:
                self.produce(self.truth_topic, record["subject_id"], codec.encode(record), self.on_delivery)
                if self.truth_file is not None:
                    self.truth_file.write(json.dumps(record, sort_keys=True) + "\n")

    def finish(self, timeout: float = 600.0) -> None:
        from confluent_kafka import KafkaException

        while True:
            try:
                self.producer.flush(timeout, raise_on_failure=False)  # failures are in the report
            except KafkaException as exc:
                raise TimeoutError(f"publishing did not finish: {exc.args[0]}") from exc
            if not self.ready and self.producer.in_flight == 0:
                return
            self.send_ready_truths()


def _paced(events: Iterator[SimEvent], rate: float, wait: Callable[[float], object]) -> Iterator[SimEvent]:
    """``events`` with receipt-topic records released at ``rate`` per second (0: no limit)."""
    start = time.monotonic()
    n = 0
    for event in events:
        if event.truth is not None and rate > 0:
            n += 1
            while (remaining := start + n / rate - time.monotonic()) > 0:
                # at least 1 ms: the producer's poll takes whole milliseconds, so a shorter wait
                # returns at once and the loop would spin a core (the receipt goes < 1 ms late)
                wait(max(remaining, MIN_WAIT_S))
        yield event


def publish(settings: Settings, seed: int, count: int, mix: FaultMix, rate: float,
            progress: Callable[[str], None] | None = None, *,
            truth_path: str | Path | None = None, start_ms: int | None = None,
            producer: ProducerLike | None = None, prepare: bool = False) -> PublishReport:
    """Generate run ``seed`` and produce it to Kafka; ground truth follows each receipt.

    ``rate``: receipt-topic records per second (0: as fast as possible); event times then
    advance 1/rate s per receipt (1 ms unpaced), tracking the wall clock. ``progress`` is called with a
    status line at most once a second. ``truth_path``: also write every ground-truth
    record (with its source partition/offset) as a JSON line. ``producer``: for tests;
    default a ``confluent_kafka.Producer`` on ``producer_config(settings)``. ``prepare``: simulate
    and encode every event before the first is produced, so a paced run offers its rate without
    taking the CPU the pipeline under test needs (a load test; event times then start at the
    preparation, seconds before publishing).
    """
    if rate < 0:
        raise ValueError(f"rate must be >= 0, got {rate}")
    # Transient delivery failures (a broker restarting, a leader moving) are produced again.
    prod = RedeliveringProducer(producer_config(settings), producer=producer)
    started = time.monotonic()
    # Event times follow the wall clock: the pipeline rejects receipts received more than a
    # day after *its* now, so even a long unpaced run must not run ahead of real time.
    gap_ms = 1000.0 / rate if rate > 0 else UNPACED_GAP_MS
    with ExitStack() as stack:
        truth_file = stack.enter_context(Path(truth_path).open("w")) if truth_path else None
        pub = _Publisher(settings, prod, truth_file)
        report = pub.report
        fault_counts: Counter[str] = Counter()
        benign_counts: Counter[str] = Counter()
        last_progress = started
        events: Iterable[SimEvent] = generate(seed, count, mix, start_ms, gap_ms=gap_ms)
        if prepare:
            events = [replace(event, value=pub.encode(event)) for event in events]
            started = last_progress = time.monotonic()
        for event in _paced(iter(events), rate, prod.poll):
            pub.send(event)
            if event.truth is not None:
                report.receipts += 1
                fault_counts[event.truth["fault"]] += 1
                if event.truth["benign"]:
                    benign_counts[event.truth["benign"]] += 1
            prod.poll(0)
            pub.send_ready_truths()
            now = time.monotonic()
            if progress is not None and now - last_progress >= 1.0:
                last_progress = now
                faults = report.receipts - fault_counts["NONE"]
                progress(
                    f"receipts {report.receipts}/{count} ({report.receipts / (now - started):.0f}/s), "
                    f"faults {faults}, delivered {sum(pub.delivered.values())}, failed {report.failed}, "
                    f"redelivered {prod.redelivered}"
                )
        pub.finish()
    report.per_topic = dict(pub.delivered)
    report.per_fault = dict(fault_counts)
    report.per_benign = dict(benign_counts)
    report.ground_truth = pub.delivered[pub.truth_topic]
    report.redelivered = prod.redelivered
    report.elapsed_s = time.monotonic() - started
    return report
