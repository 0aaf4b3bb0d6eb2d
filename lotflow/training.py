"""``lotflow train``: a node's learner trained and calibrated from labelled history, stored as a checkpoint.

Two sources of history:

* ``--from-clickhouse`` (default): the ``labels`` table (people's decisions, landed by the sink),
  in labels-topic order. Each label is learnt at its own ``kafka_offset``, so the learner's
  ``labels_offset`` ends at the last label used and workers replay only the labels after it.
* ``--from-file PATH`` (CSV or Parquet, by extension): one row per historical receipt from outside
  this cluster: its features (columns named like the feature keys; a missing or empty value is an
  absent feature), ``vendor_id``, ``material_id``, ``soft_codes`` (``;``-separated), ``good``
  (0/1 or true/false), ``confidence`` (optional: what the prior said; computed from the prior when
  absent), ``spot_check`` and ``by_rule`` (optional: a rule held the receipt whatever its
  confidence, as on a label; such a row without a hard reason calibrates its own map).
  ``subject_id``, ``decision``, ``fault`` and ``benign`` are carried along and ignored. Rows are
  learnt in file order at offsets ... -2, -1, so the learner's ``labels_offset`` stays -1: workers
  replay the whole labels topic on top of it.

The last ``--holdout`` share of the history (default 20 % of a file, none of the labels table: its
held-out labels are replayed by workers anyway) is not learnt: the calibrated confidence of the
trained learner is measured on it (ECE over 10 bins, reliability bins, Brier score).

``--make-sample PATH`` writes such a file from the simulator: its receipts go through a receiving
processor in memory (no Kafka; state in dicts; a clock that follows the event times) and every
receipt's machine decision contributes the features it was scored with, joined with the
simulator's ground truth (good = not a fault). Dead-lettered receipts have no features and are
left out; spot checks are off (every row is labelled, none stands for others).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lotflow.scorers.calibration import Bin, expected_calibration_error, reliability
from lotflow.scorers.learner import Label, Learner, LearnerConfig, hard_reasons
from lotflow.settings import Settings

__all__ = [
    "HistoryRow",
    "SampleSummary",
    "TrainResult",
    "labels_from_clickhouse",
    "make_sample",
    "read_history",
    "run_train",
    "train_on_labels",
    "train_on_rows",
    "write_history",
]

Say = Callable[[str], None]
REQUIRED = ("vendor_id", "material_id", "good")
OPTIONAL = ("soft_codes", "confidence", "spot_check", "by_rule")
IGNORED = ("subject_id", "decision", "fault", "benign", "label_id")  # carried along, never features
NOT_FEATURES = frozenset((*REQUIRED, *OPTIONAL, *IGNORED))
SAMPLE_START_MS = 1_735_689_600_000  # 2025-01-01: fixed, so a sample is the same for the same seed
LOGIT_LIMIT = 30.0  # as lotflow.verification.node: the prior's logit as a feature, bounded
_TRUE = frozenset(("1", "true", "t", "yes", "y"))
_FALSE = frozenset(("0", "false", "f", "no", "n"))


# --- history files -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One historical receipt: what it was scored on and how it turned out."""

    vendor_id: str
    material_id: str
    soft_codes: tuple[str, ...]
    features: dict[str, float]
    good: bool
    confidence: float | None = None  # the prior's (None: computed from the prior when learnt)
    spot_check: bool = False
    subject_id: str = ""
    by_rule: bool = False  # a rule held it whatever the confidence (as ``Label.by_rule``)


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def _bool(value: Any, column: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{where}: {column} is {value!r}; expected 0/1 or true/false")


def _float(value: Any, column: str, where: str) -> float:
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {column} is {value!r}, not a number") from None


def row_from_record(record: Mapping[str, Any], where: str) -> HistoryRow:
    """A history row from one CSV/Parquet record (column -> value; empty or None: absent)."""
    for column in REQUIRED:
        if _is_empty(record.get(column)):
            raise ValueError(f"{where}: no {column}")
    codes = record.get("soft_codes")
    if codes is None or _is_empty(codes):
        soft: tuple[str, ...] = ()
    elif isinstance(codes, str):
        soft = tuple(c.strip() for c in codes.split(";") if c.strip())
    else:  # a list column (Parquet)
        soft = tuple(str(c) for c in codes)
    features = {name: _float(value, name, where) for name, value in record.items()
                if name not in NOT_FEATURES and not _is_empty(value)}
    confidence = record.get("confidence")
    spot = record.get("spot_check")
    by_rule = record.get("by_rule")
    return HistoryRow(
        vendor_id=str(record["vendor_id"]), material_id=str(record["material_id"]), soft_codes=soft,
        features=features, good=_bool(record["good"], "good", where),
        confidence=None if _is_empty(confidence) else _float(confidence, "confidence", where),
        spot_check=False if _is_empty(spot) else _bool(spot, "spot_check", where),
        subject_id="" if _is_empty(record.get("subject_id")) else str(record["subject_id"]),
        by_rule=False if _is_empty(by_rule) else _bool(by_rule, "by_rule", where),
    )


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise ValueError(f"{path}: unknown file type {suffix or '(none)'!r}; use .csv or .parquet")


def read_history(path: Path) -> list[HistoryRow]:
    """The rows of a CSV or Parquet history file, in file order."""
    kind = _format(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if kind == "csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or ())]
            if missing:
                raise ValueError(f"{path}: no column {', '.join(missing)} (columns: {reader.fieldnames})")
            return [row_from_record(record, f"{path} line {i + 2}") for i, record in enumerate(reader)]
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)} (columns: {table.column_names})")
    return [row_from_record(record, f"{path} row {i + 1}") for i, record in enumerate(table.to_pylist())]


def _columns(records: Sequence[Mapping[str, Any]]) -> list[str]:
    first = ["subject_id", "vendor_id", "material_id", "soft_codes", "good", "confidence", "spot_check", "by_rule",
             "decision", "fault", "benign"]
    present = {name for record in records for name in record}
    return [c for c in first if c in present] + sorted(present - set(first))


def write_history(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Write history records (column -> value; None or absent: empty) as CSV or Parquet, by extension.
    ``soft_codes`` may be a sequence: it is joined with ``;``."""
    kind = _format(path)
    columns = _columns(records)
    rows = [{c: (";".join(r[c]) if c == "soft_codes" and not isinstance(r.get(c), str) and r.get(c) is not None
                 else r.get(c)) for c in columns} for r in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({c: "" if v is None else (int(v) if isinstance(v, bool) else v)
                                 for c, v in row.items()})
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    strings = {"subject_id", "vendor_id", "material_id", "soft_codes", "decision", "fault", "benign"}
    schema = pa.schema([(c, pa.string() if c in strings else pa.bool_() if c in ("good", "spot_check", "by_rule")
                         else pa.float64()) for c in columns])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


# --- training ------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    learner: Learner
    source: str
    trained: int
    held_out: int
    ece: float | None = None  # the trained learner's calibrated confidence on the held-out rows
    brier: float | None = None
    bins: list[Bin] = field(default_factory=list)
    given_ece: float | None = None  # the confidence the held-out rows came with (the prior's, or the model's then)
    good_share_trained: float = 0.0
    good_share_held_out: float = 0.0

    def to_json(self) -> dict[str, Any]:
        learner = self.learner
        return {"source": self.source, "trained": self.trained, "held_out": self.held_out,
                "held_out_ece": self.ece, "held_out_brier": self.brier, "held_out_given_ece": self.given_ece,
                "good_share_trained": self.good_share_trained, "good_share_held_out": self.good_share_held_out,
                "bins": [{"low": b.low, "high": b.high, "count": b.count, "mean_confidence": b.mean_confidence,
                          "observed_rate": b.observed_rate} for b in self.bins],
                "labels": learner.n_labels, "labels_offset": learner.labels_offset, "version": learner.version,
                "fingerprint": learner.fingerprint()}


def confidence_of(learner: Learner, features: Mapping[str, float], by_rule: bool = False) -> float:
    """What the learner says about these features: the calibrated blended score (as a node scores;
    ``by_rule``: a rule held the receipt, and with no hard reason that is a soft one not cleared)."""
    x = {k: float(v) for k, v in features.items() if math.isfinite(v)}
    return learner.confidence(x, held_open=by_rule and hard_reasons(x) == 0)


def _with_prior_logit(learner: Learner, features: Mapping[str, float]) -> dict[str, float]:
    """The features a node scores with: ``prior_logit`` added when the history does not carry it."""
    x = dict(features)
    if "prior_logit" not in x:
        x["prior_logit"] = max(-LOGIT_LIMIT, min(LOGIT_LIMIT, learner.scorer.prior.logit(x)))
    return x


def label_of(learner: Learner, row: HistoryRow, index: int) -> Label:
    x = _with_prior_logit(learner, row.features)
    confidence = row.confidence if row.confidence is not None else learner.prior_score(x)
    return Label(row.subject_id or f"history:{index}", row.vendor_id, row.material_id, row.soft_codes, x, row.good,
                 confidence, row.spot_check, row.by_rule)


def _split(n: int, holdout: float) -> int:
    """How many of ``n`` are trained on (the rest, the newest, are held out)."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"--holdout must be in [0, 1), got {holdout}")
    return n - round(n * holdout)


def _evaluate(result: TrainResult, held: Sequence[Label]) -> TrainResult:
    if not held:
        return result
    learner = result.learner
    confidences = [confidence_of(learner, label.features, label.by_rule) for label in held]
    outcomes = [label.good for label in held]
    result.ece = expected_calibration_error(confidences, outcomes)
    result.brier = sum((c - float(g)) ** 2 for c, g in zip(confidences, outcomes, strict=True)) / len(held)
    result.bins = reliability(confidences, outcomes)
    result.given_ece = expected_calibration_error([label.confidence for label in held], outcomes)
    result.good_share_held_out = sum(outcomes) / len(held)
    return result


def _new_learner(config: LearnerConfig) -> Learner:
    """A learner to train. ``Learner.learn`` weights a spot-check label by 1 / spot_check_share, capped
    at ``spot_weight_cap`` (1 by default: one label). That divides by zero where spot checks are off
    (LOTFLOW_SPOT_CHECK_SHARE=0) but old spot-check labels exist: it then learns with the cap (the
    limit), and the caller gives it the configured settings back after learning (a worker applies
    its own settings to a restored checkpoint anyway)."""
    if config.spot_check_share > 0:
        return Learner(config)
    return Learner(replace(config, spot_check_share=1.0 / config.spot_weight_cap))


def train_on_rows(rows: Sequence[HistoryRow], config: LearnerConfig, holdout: float = 0.2,
                  progress: Say | None = None) -> TrainResult:
    """A new learner trained on the first rows (offsets ... -2, -1) and measured on the held-out rest."""
    learner = _new_learner(config)
    labels = [label_of(learner, row, i) for i, row in enumerate(rows)]
    n_train = _split(len(labels), holdout)
    train, held = labels[:n_train], labels[n_train:]
    # Learner.learn skips offsets <= labels_offset: start below the first, so the last ends at -1 and
    # a worker replays the whole labels topic on top.
    learner.labels_offset = -n_train - 1
    _learn_all(learner, ((i - n_train, label) for i, label in enumerate(train)), len(train), progress)
    learner.config = config
    learner.checkpoint_labels = 0
    result = TrainResult(learner, "file", len(train), len(held),
                         good_share_trained=sum(label.good for label in train) / len(train) if train else 0.0)
    return _evaluate(result, held)


def train_on_labels(labels: Sequence[tuple[int, Label]], config: LearnerConfig, holdout: float = 0.0,
                    progress: Say | None = None) -> TrainResult:
    """A new learner trained on labels at their labels-topic offsets (ascending); the newest ``holdout``
    share is held out (a worker replays those after the checkpoint's offset anyway)."""
    n_train = _split(len(labels), holdout)
    learner = _new_learner(config)
    _learn_all(learner, labels[:n_train], n_train, progress)
    learner.config = config
    held = [label for _, label in labels[n_train:]]
    trained = [label for _, label in labels[:n_train]]
    result = TrainResult(learner, "clickhouse", n_train, len(held),
                         good_share_trained=sum(label.good for label in trained) / n_train if n_train else 0.0)
    return _evaluate(result, held)


def _learn_all(learner: Learner, items: Iterable[tuple[int, Label]], total: int, progress: Say | None) -> None:
    """Learn (offset, label) pairs in order."""
    last = time.monotonic()
    for i, (offset, label) in enumerate(items):
        learner.learn(label, offset)
        if progress is not None and time.monotonic() - last >= 1.0:
            last = time.monotonic()
            progress(f"learnt {i + 1}/{total}")
    if learner.n_labels >= learner.config.min_calibration_labels:
        learner.fit_calibration()


def labels_from_clickhouse(client: Any, database: str, node: str) -> list[tuple[int, Label]]:
    """The node's labels from the ``labels`` table, in labels-topic order: (kafka_offset, Label)."""
    from clickhouse_connect.driver.binding import quote_identifier

    result = client.query(
        "SELECT kafka_offset, label_id, vendor_id, material_id, soft_codes, features, good, confidence, spot_check, "
        f"by_rule FROM {quote_identifier(database)}.labels FINAL WHERE node = {{node:String}} ORDER BY kafka_offset",
        parameters={"node": node})
    return [(int(offset), Label(str(label_id), str(vendor), str(material), tuple(soft),
                                {str(k): float(v) for k, v in dict(features).items()}, bool(good), float(confidence),
                                bool(spot), bool(by_rule)))
            for offset, label_id, vendor, material, soft, features, good, confidence, spot, by_rule
            in result.result_rows]


# --- the sample file -------------------------------------------------------------------------------
@dataclass
class SampleSummary:
    receipts: int = 0  # receipt-topic records run through the processor
    rows: int = 0  # written (decided, joined with their truth)
    good: int = 0
    dead_letters: int = 0  # receipts without a machine decision (malformed, invalid)
    undecided: int = 0
    elapsed_s: float = 0.0

    def __str__(self) -> str:
        bad = self.rows - self.good
        return (f"{self.rows} receipts written ({self.good} good, {bad} faults) of {self.receipts} published; "
                f"{self.dead_letters} dead-lettered and {self.undecided} undecided left out; "
                f"{self.elapsed_s:.1f}s")


class _Clock:
    def __init__(self, start_s: float) -> None:
        self.now = start_s

    def __call__(self) -> float:
        return self.now


def _recording_node(node: Any) -> Any:
    """The processor's node, keeping its last evaluation: (receipt id, evaluation, material of the pattern)."""
    from lotflow.verification import receiving as rules
    from lotflow.verification.node import Evaluation, VerificationNode

    class RecordingNode(VerificationNode[rules.ReceivingContext]):
        last: tuple[str, Evaluation, str] | None = None

        def evaluate(self, context: rules.ReceivingContext) -> Evaluation:
            evaluation = super().evaluate(context)
            material = rules.pattern_of(context, evaluation.verdict.reason).material_id
            self.last = (str(context.receipt["receipt_id"]), evaluation, material)
            return evaluation

    return RecordingNode(**{f.name: getattr(node, f.name) for f in fields(node)})


def sample_records(settings: Settings, count: int, seed: int = 7, faults: str = "default",
                   progress: Say | None = None, summary: SampleSummary | None = None,
                   start_ms: int = SAMPLE_START_MS) -> Iterator[dict[str, Any]]:
    """History records from simulated receipts decided in memory (see the module's docstring)."""
    from prometheus_client import CollectorRegistry

    from lotflow.metrics import WorkerMetrics
    from lotflow.schemas.serde import AvroCodec, schema_source
    from lotflow.simulator.faults import parse_fault_spec
    from lotflow.simulator.generate import generate
    from lotflow.streams import topics
    from lotflow.streams.producer import Message
    from lotflow.streams.receiving import InputEvent, ReceivingProcessor
    from lotflow.streams.reference import normalize_spec
    from lotflow.streams.state import DictState

    summary = summary if summary is not None else SampleSummary()
    settings = settings.model_copy(update={"spot_check_share": 0.0})
    source = schema_source(None)  # the bundled schemas: nothing leaves this process
    specs: dict[str, dict[str, Any]] = {}
    names = {spec: spec.full_name(settings) for spec in topics.TOPICS}
    codecs = {names[spec]: AvroCodec(source, f"{names[spec]}-value", spec.schema, epoch_millis=True)
              for spec in (topics.PURCHASE_ORDERS, topics.RECEIPTS, topics.CERTIFICATES, topics.MATERIAL_SPECS,
                           topics.VERIFIED, topics.EXCEPTIONS)}
    receipts_topic = names[topics.RECEIPTS]
    decision_topics = {names[topics.VERIFIED], names[topics.EXCEPTIONS]}
    truths: dict[int, dict[str, Any]] = {}  # receipt offset (partition 0) -> its ground truth
    out: list[dict[str, Any]] = []
    clock = _Clock(start_ms / 1000)
    node_box: list[Any] = []

    def emit(message: Message) -> None:
        if message.topic not in decision_topics or message.value is None:
            return
        record = codecs[message.topic].decode(message.value)
        refs = record["input_refs"]
        if not refs or refs[0]["topic"] != receipts_topic or str(record["model_version"]).startswith("person:"):
            return  # a PO revision reopening a receipt, or a person's release: not the receipt's decision
        truth = truths.pop(int(refs[0]["offset"]), None)
        node = node_box[0]
        last, node.last = node.last, None
        if truth is None or last is None or last[0] != record["subject_id"]:
            return
        _, evaluation, material = last
        good = not truth["is_fault"]
        summary.good += good
        summary.rows += 1
        out.append({"subject_id": record["subject_id"], "vendor_id": record["vendor_id"], "material_id": material,
                    "soft_codes": ";".join(evaluation.soft_codes), "good": good,
                    "confidence": float(record["confidence"]), "spot_check": False, "by_rule": evaluation.by_rule,
                    "decision": record["decision"],
                    "fault": truth["fault"], "benign": truth["benign"], **evaluation.features})

    processor = ReceivingProcessor(settings, source, DictState(encoded=True), DictState(), specs,
                                   WorkerMetrics.create(CollectorRegistry()), clock=clock, emit=emit)
    processor.node = _recording_node(processor.node)
    node_box.append(processor.node)
    processor.rebuild_indexes()
    offsets: dict[str, int] = {}
    started = last_progress = time.monotonic()
    for n, event in enumerate(generate(seed, count, parse_fault_spec(faults), start_ms)):
        topic = names[event.topic]
        if isinstance(event.value, dict):
            clock.now = max(clock.now, event.value.get("event_time", 0) / 1000)
        if event.topic is topics.MATERIAL_SPECS:
            assert isinstance(event.value, dict)
            spec = normalize_spec(codecs[topic].decode(codecs[topic].encode(event.value)))
            current = specs.get(spec["material_id"])
            if current is None or current["revision"] <= spec["revision"]:
                specs[spec["material_id"]] = spec
            processor.recheck_waiting()
            continue
        value = event.value if isinstance(event.value, bytes) else codecs[topic].encode(event.value)
        offset = offsets[topic] = offsets.get(topic, -1) + 1
        if event.truth is not None:
            truths[offset] = event.truth
            summary.receipts += 1
        processor.handle(InputEvent(topic, 0, offset, event.key.encode(), value, int(clock.now * 1000)))
        if n % 200 == 0:
            processor.sweep()
            processor.end_batch()
        if progress is not None and time.monotonic() - last_progress >= 1.0:
            last_progress = time.monotonic()
            progress(f"receipts {summary.receipts}/{count}, {summary.rows} decided "
                     f"({summary.receipts / (last_progress - started):.0f}/s)")
        while out:
            yield out.pop(0)
    clock.now += settings.document_wait_s + 1  # every wait expires: each receipt is decided
    while processor.sweep() or processor.more_due:
        processor.end_batch()
    processor.end_batch()
    yield from out
    summary.undecided = sum(1 for key, _ in processor.po_state.items() if key.startswith("W|"))
    summary.dead_letters = len(truths) - summary.undecided  # receipts without a machine decision joined
    summary.elapsed_s = time.monotonic() - started


def make_sample(settings: Settings, path: Path, count: int, seed: int = 7, faults: str = "default",
                progress: Say | None = None) -> SampleSummary:
    """Write ``count`` simulated receipts' features and ground truth to ``path`` (CSV or Parquet)."""
    _format(path)
    if count <= 0:
        raise ValueError(f"--count must be > 0, got {count}")
    summary = SampleSummary()
    records = list(sample_records(settings, count, seed, faults, progress, summary))
    write_history(path, records)
    return summary


# --- the command ----------------------------------------------------------------------------------
def _print_result(result: TrainResult, say: Say) -> None:
    learner = result.learner
    what = "previous receipts" if result.source == "file" else "labels"
    if result.held_out:
        assert result.ece is not None and result.brier is not None
        say(f"trained on {result.trained} {what}; held-out ECE {result.ece:.4f} on {result.held_out} "
            f"(Brier {result.brier:.4f}; the confidence they came with: ECE {result.given_ece:.4f})")
        say("  held-out reliability (confidence bin: count, mean confidence, observed good share):")
        for b in result.bins:
            if b.count:
                say(f"    {b.low:.1f}-{b.high:.1f}: {b.count:6d}  {b.mean_confidence:.3f}  {b.observed_rate:.3f}")
    else:
        say(f"trained on {result.trained} {what}; nothing held out (--holdout 0): no held-out ECE")
    say(f"model {learner.version}, fingerprint {learner.fingerprint()}, labels offset {learner.labels_offset}")


def run_train(settings: Settings, *, node: str, from_file: Path | None, holdout: float | None, dry_run: bool,
              output: Path | None, force: bool = False, as_json: bool = False, say: Say = print) -> int:
    """``lotflow train``: returns the exit code."""
    import json

    from lotflow.streams.receiving import learner_config

    if output is not None and output.exists() and not force:
        raise ValueError(f"{output} exists; use --force to overwrite it")
    config = learner_config(settings)
    progress = None if as_json else say
    if from_file is not None:
        rows = read_history(from_file)
        if not rows:
            raise ValueError(f"{from_file}: no rows")
        result = train_on_rows(rows, config, 0.2 if holdout is None else holdout, progress)
    else:
        from lotflow.sinks.client import connect

        labels = labels_from_clickhouse(connect(settings), settings.clickhouse_database, node)
        if not labels:
            raise ValueError(f"no labels of node {node!r} in {settings.clickhouse_database}.labels yet: "
                             "nothing to train on")
        result = train_on_labels(labels, config, 0.0 if holdout is None else holdout, progress)
    if result.trained == 0:
        raise ValueError("nothing left to train on after the hold-out")
    state = result.learner.to_bytes()
    Learner.from_bytes(state)  # what a worker will load
    if output is not None:
        output.write_bytes(state)
    stored = False
    if not dry_run:
        from lotflow.schemas.serde import schema_source
        from lotflow.streams.learning import write_checkpoint

        write_checkpoint(settings, schema_source(settings.schema_registry_url), node, result.learner, "train")
        stored = True
    if as_json:
        print(json.dumps({**result.to_json(), "node": node, "checkpoint_written": stored,
                          "output": str(output) if output else None, "bytes": len(state)}, indent=2))
        return 0
    _print_result(result, say)
    if output is not None:
        say(f"learner written to {output} ({len(state)} bytes)")
    if stored:
        offset = result.learner.labels_offset
        after = "the whole labels topic" if offset < 0 else f"the labels after offset {offset}"
        say(f"checkpoint of node {node} written (source train): workers load it when they (re)start, "
            f"then replay {after}")
    else:
        say("--dry-run: no checkpoint written")
    return 0

