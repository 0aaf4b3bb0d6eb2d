"""Where the receiving pipeline's time goes: µs per input event of each stage of the pure
processor, run outside Faust on the bench's own traffic, and what producing costs.

    .venv/bin/python load-tests/stages.py [--receipts 20000]     # processor stages only
    (make bench runs it, with producing to the broker, and writes ``stage_us`` to var/bench.json)

The traffic is the simulator's run the bench publishes (same seed and fault mix), decoded from
its Avro bytes by a ``ReceivingProcessor`` over in-memory tables (``DictState``), in batches of
``batch_size`` events with the expiry and ``end_batch`` of the worker between them, and the
document-wait sweep every batch (an expired wait is decided as in the worker).

Two runs over the same events, each in its own processor:

* an instrumented one (first: it also warms the caches up): the seams below are wrapped with
  a clock that keeps *exclusive* time (a stage's time excludes the stages called inside it),
  so the stages add up to the
  instrumented total (a little above the clean one: ~0.3 µs per wrapped call);
* a clean one: ``processor`` is its µs per input event, nothing measured inside it.

With the compiled core in use (``lotflow.compiled``), compiled classes and calls cannot be wrapped:
the two runs above are made on the sources in a child process (``LOTFLOW_PURE_PYTHON=1``, the
same traffic), and a third, clean run on the compiled core in this process (after a warm-up on a
tenth of the traffic) gives ``processor``. The stages then break down ``instrumented`` (the
sources), ``processor_pure_python`` is the sources' clean time beside the compiled ``processor``.

Stages: ``decode`` (Avro of the input records), ``control_charts`` (pooling a vendor's chart
slices, running the charts), ``checks`` (deriving the facts and the rules), ``scoring`` (features,
the learnt model, calibration, explanation), ``output_encode`` (Avro of the outputs),
``join_state`` (everything else: the join, state reads, copies and writes, the hash chain, the
document wait). With a broker (``produce_to``): ``produce`` (handing the outputs and changelog
records to the transactional producer) and ``commit`` (flush + commit per batch), both per
input event, and ``transaction_ms_per_batch``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry

from lotflow import compiled
from lotflow.metrics import WorkerMetrics
from lotflow.schemas.serde import AvroCodec, schema_source
from lotflow.scorers import history, spc
from lotflow.settings import Settings, get_settings
from lotflow.simulator.faults import parse_fault_spec
from lotflow.simulator.generate import generate
from lotflow.streams import topics
from lotflow.streams.producer import Message
from lotflow.streams.receiving import InputEvent, ReceivingProcessor
from lotflow.streams.reference import normalize_spec
from lotflow.streams.state import DictState
from lotflow.streams.worker import tune_garbage_collector
from lotflow.verification import receiving as rules

STAGES = ("decode", "join_state", "checks", "control_charts", "scoring", "output_encode")
INPUTS = (topics.PURCHASE_ORDERS, topics.RECEIPTS, topics.CERTIFICATES)


class StageClock:
    """Exclusive time per stage: a wrapped call's time, less that of wrapped calls inside it."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()
        self._children: list[float] = []

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        children = self._children
        seconds = self.seconds
        clock = time.perf_counter

        def timed(*args: Any, **kwargs: Any) -> Any:
            children.append(0.0)
            started = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = clock() - started
                inner = children.pop()
                seconds[stage] += elapsed - inner
                if children:
                    children[-1] += elapsed

        return timed


def _partition(key: str, partitions: int) -> int:
    return zlib.crc32(key.encode()) % partitions  # any stable spread: the processor keys state by PO


def traffic(settings: Settings, receipts: int, seed: int = 11,
            start_ms: int | None = None) -> tuple[list[InputEvent], dict[str, Any]]:
    """The simulator's run ``seed`` as encoded input records (and the material specs it publishes),
    its clock starting at ``start_ms`` (default: now)."""
    source = schema_source(None)
    names = {spec: spec.full_name(settings) for spec in topics.TOPICS}
    codecs = {spec: AvroCodec(source, f"{names[spec]}-value", spec.schema, epoch_millis=True)
              for spec in (*INPUTS, topics.MATERIAL_SPECS)}
    specs: dict[str, Any] = {}
    events: list[InputEvent] = []
    offsets: Counter[tuple[str, int]] = Counter()
    for event in generate(seed, receipts, parse_fault_spec("default"),
                          int(time.time() * 1000) if start_ms is None else start_ms):
        if event.topic is topics.MATERIAL_SPECS:
            codec = codecs[topics.MATERIAL_SPECS]
            spec = normalize_spec(codec.decode(codec.encode(event.value)))
            specs[spec["material_id"]] = spec
            continue
        if event.topic not in codecs:
            continue  # ground truth, other topics: not the receiving worker's input
        topic = names[event.topic]
        value = event.value if isinstance(event.value, bytes) else codecs[event.topic].encode(event.value)
        partition = _partition(event.key, settings.partitions)
        offset = offsets[(topic, partition)]
        offsets[(topic, partition)] += 1
        stamp = event.value.get("event_time", 0) if isinstance(event.value, dict) else 0
        events.append(InputEvent(topic, partition, offset, event.key.encode(), value, stamp))
    return events, specs


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _processor(settings: Settings, specs: dict[str, Any], changelog: str, clock: _Clock,
               emit: Callable[[Message], None]) -> ReceivingProcessor:
    processor = ReceivingProcessor(settings, schema_source(None), DictState(changelog, encoded=True),
                                   DictState(changelog), specs, WorkerMetrics.create(CollectorRegistry()),
                                   clock=clock, emit=emit)
    processor.rebuild_indexes()
    return processor


def _batches(processor: ReceivingProcessor, events: list[InputEvent], batch_size: int,
             clock: _Clock) -> Iterator[int]:
    """Handle ``events`` as the worker does, batch by batch; yields after each batch (its size)."""
    handle = processor.handle
    for start in range(0, len(events), batch_size):
        batch = events[start:start + batch_size]
        for event in batch:
            if event.timestamp_ms > clock.now * 1000:
                clock.now = event.timestamp_ms / 1000
            handle(event)
        processor.sweep(limit=batch_size)
        processor.expire(2 * len(batch))
        yield len(batch)
    clock.now += processor.settings.document_wait_s + 1  # every wait expires: each receipt is decided
    while processor.sweep(limit=batch_size) or processor.more_due:
        yield 0


def _instrument(processor: ReceivingProcessor, clock: StageClock) -> None:
    """Wrap the processor's seams (instance attributes and the module functions it calls)."""
    for name in ("handle", "sweep", "expire", "end_batch"):
        setattr(processor, name, clock.wrap("join_state", getattr(processor, name)))
    for codec in processor._codecs.values():
        codec.decode = clock.wrap("decode", codec.decode)  # type: ignore[method-assign]
    encoder = processor.encoder
    encoder.encode = clock.wrap("output_encode", encoder.encode)  # type: ignore[method-assign]
    encoder.encode_all = clock.wrap("output_encode", encoder.encode_all)  # type: ignore[method-assign]
    node = processor.node
    processor.node = replace(node, checks=[clock.wrap("checks", check) for check in node.checks],
                             features=clock.wrap("scoring", node.features))
    processor.node.evaluate = clock.wrap("scoring", processor.node.evaluate)  # type: ignore[method-assign]


def measure_stages(settings: Settings, receipts: int, produce_to: Settings | None = None,
                   say: Callable[[str], None] = print, tune_gc: bool = True,
                   start_ms: int | None = None) -> dict[str, Any]:
    """µs per input event of each stage (see the module docstring); with ``produce_to``, the
    outputs of the clean run are produced in the worker's transactions to that topic set.

    With the compiled core in use (``lotflow.compiled``) its classes and calls cannot be wrapped:
    the instrumented run, and a clean run for comparison (``processor_pure_python``), go to a
    child process on the sources (``LOTFLOW_PURE_PYTHON=1``), and ``processor`` is the compiled one."""
    start_ms = int(time.time() * 1000) if start_ms is None else start_ms
    events, specs = traffic(settings, receipts, start_ms=start_ms)
    if tune_gc:
        tune_garbage_collector()  # as the worker does: a full collection walks everything kept alive
    say(f"stages: {len(events)} input events of {receipts} receipts, batches of {settings.batch_size}"
        f"{' (compiled core)' if compiled.active() else ''}")
    changelog = settings.topic("bench.stages-changelog")
    per_event = 1e6 / len(events)
    if compiled.active():
        result = _instrumented_from_sources(settings, receipts, tune_gc, start_ms)
        # a warm-up on a tenth of the traffic, as the instrumented run is in one process
        warm = _processor(settings, specs, changelog, _Clock(), lambda message: None)
        for _ in _batches(warm, events[:len(events) // 10], settings.batch_size, _Clock()):
            warm.end_batch()
            _changes_into(warm, [])
    else:
        result = _instrumented(settings, events, specs, changelog)
    result["compiled"] = compiled.active()
    # clean run: the processor's own time; the outputs are kept, per batch, to produce later
    clock = _Clock()
    outputs: list[Message] = []
    processor = _processor(settings, specs, changelog, clock, outputs.append)
    batches: list[list[Message]] = []
    started = time.perf_counter()
    for _ in _batches(processor, events, settings.batch_size, clock):
        processor.end_batch()
        batches.append(list(outputs))
        outputs.clear()
        _changes_into(processor, batches[-1])
    clean_s = time.perf_counter() - started
    result.update({"events": len(events), "processor": clean_s * per_event,
                   "outputs_per_event": sum(len(b) for b in batches) / len(events)})
    if produce_to is not None:
        result.update(_produce(produce_to, batches, len(events)))
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}


def _instrumented(settings: Settings, events: list[InputEvent], specs: dict[str, Any],
                  changelog: str) -> dict[str, Any]:
    """The instrumented run (first: it also warms the caches up), in its own processor: the
    stages' µs per event and their sum as run (``instrumented``)."""
    per_event = 1e6 / len(events)
    stage_clock = StageClock()
    clock = _Clock()
    processor = _processor(settings, specs, changelog, clock, lambda message: None)
    _instrument(processor, stage_clock)
    originals = (spc.scan, history.chart_view, rules.derive)
    # module functions the processor calls through their module: wrapped for this run only
    spc.scan = stage_clock.wrap("control_charts", spc.scan)  # type: ignore[assignment]
    history.chart_view = stage_clock.wrap("control_charts", history.chart_view)  # type: ignore[assignment]
    rules.derive = stage_clock.wrap("checks", rules.derive)  # type: ignore[assignment]
    try:
        started = time.perf_counter()
        for _ in _batches(processor, events, settings.batch_size, clock):
            processor.end_batch()
            _changes_into(processor, [])  # the changelog records, as in the clean run
        instrumented_s = time.perf_counter() - started
    finally:
        spc.scan, history.chart_view, rules.derive = originals  # type: ignore[assignment]
    result: dict[str, Any] = {"instrumented": instrumented_s * per_event}
    for stage in STAGES:
        result[stage] = stage_clock.seconds[stage] * per_event
    return result


def _instrumented_from_sources(settings: Settings, receipts: int, tune_gc: bool, start_ms: int) -> dict[str, Any]:
    """The stages measured on the sources in a child process (the same traffic), and its clean
    processor time."""
    command = [sys.executable, __file__, "--receipts", str(receipts), "--start-ms", str(start_ms),
               "--settings", settings.model_dump_json()]
    if not tune_gc:
        command.append("--default-gc")
    done = subprocess.run(command, env={**os.environ, compiled.PURE_ENV: "1"}, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the stages on the sources failed: {done.stderr.strip()[-2000:]}")
    figures = json.loads(done.stdout)
    if figures.get("compiled"):
        raise RuntimeError("the child meant to run the sources ran the compiled core")
    out = {stage: figures[stage] for stage in (*STAGES, "instrumented")}
    out["processor_pure_python"] = figures["processor"]
    return out


def _changes_into(processor: ReceivingProcessor, out: list[Message]) -> None:
    """The batch's changelog records, as the worker produces them with its outputs."""

    class Collect:
        @staticmethod
        def send_raw(topic: str, key: bytes, value: bytes | None, partition: int | None = None) -> None:
            out.append(Message(topic, key, value, partition))

    processor.po_state.flush_to(Collect)
    processor.vendor_state.flush_to(Collect)


def _produce(settings: Settings, batches: list[list[Message]], events: int) -> dict[str, float]:
    """Produce each batch's messages in one transaction, as the worker does: µs per input event
    of handing them to the producer and of flush + commit, and the mean commit per batch."""
    import asyncio

    from confluent_kafka.admin import AdminClient, NewTopic

    from lotflow import admin
    from lotflow.kafka_clients import client_config
    from lotflow.streams.producer import TransactionalOutput

    changelog = settings.topic("bench.stages-changelog")
    admin.create_topics(settings)
    client = AdminClient(client_config(settings))  # alive until the futures resolve
    for future in client.create_topics([NewTopic(changelog, settings.partitions, 1)]).values():
        future.result()
    output = TransactionalOutput(settings, f"{settings.app_id}-stages")
    sent_s = commit_s = 0.0
    committed = 0

    async def run() -> None:
        nonlocal sent_s, commit_s, committed
        for batch in batches:
            if not batch:
                continue
            started = time.perf_counter()
            for message in batch:
                output.send(message)
            between = time.perf_counter()
            await output.commit()
            sent_s += between - started
            commit_s += time.perf_counter() - between
            committed += 1

    asyncio.run(run())
    return {"produce": sent_s * 1e6 / events, "commit": commit_s * 1e6 / events,
            "transaction_ms_per_batch": commit_s * 1000 / max(committed, 1), "transactions": float(committed)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receipts", type=int, default=20_000)
    parser.add_argument("--settings", help="the settings as JSON (default: from the environment)")
    parser.add_argument("--default-gc", action="store_true", help="leave the garbage collector as Python sets it")
    parser.add_argument("--start-ms", type=int, help="the simulated traffic's start (default: now)")
    args = parser.parse_args()
    settings = Settings.model_validate_json(args.settings) if args.settings else get_settings()
    result = measure_stages(settings, args.receipts, say=lambda message: print(message, file=sys.stderr),
                            tune_gc=not args.default_gc, start_ms=args.start_ms)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
