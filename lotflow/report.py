"""``lotflow report``: what the learning did, per node and per vendor, from the stored records.

Definitions (ClickHouse tables, read with ``FINAL``; ``--since`` filters by decision time, labels by
when the person decided):

* **decided receipts**: distinct ``subject_id`` over ``verified`` and ``exceptions``, machine
  decisions only (a verified row with ``decision_source = 'HUMAN'`` is a person's release);
* **review rate** = exceptions / decided receipts; **spot checks** are the exceptions whose
  ``reason_codes`` has ``SPOT_CHECK`` (counted in the review rate);
* **false-alarm rate** = exceptions people accepted (labels with ``good`` and not ``spot_check``)
  / decided receipts;
* **spot-check precision**: the good share of the spot-check labels, with its Wilson interval
  (unbiased: spot checks are drawn at random from what would have been verified);
* **ECE** (10 bins) of the confidence the labelled exceptions were raised with against their
  outcome: over all labels, and over the spot-check labels alone;
* **drift events**: from the newest model checkpoint of the node (Kafka), 0 without one.

Plots (matplotlib, Agg) under ``LOTFLOW_VAR_DIR``: ``report-reliability.png`` (mean confidence
against observed good share per bin, with the diagonal and the counts) and
``report-learning-curve.png`` (over the label count: rolling false-alarm share and ECE of the
labels; over time: the review rate and the model's label count, from the outputs' model version).

With the embedded engine (the default) the report opens the engine itself: run it while no other
process (the sink, the review service) holds it; against a ClickHouse server it runs any time.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from lotflow.scorers.calibration import Bin, expected_calibration_error, reliability, wilson

__all__ = ["LabelRow", "NodeReport", "VendorFigures", "aggregate", "label_curve", "parse_since", "review_curve",
           "run_report"]

Say = Callable[[str], None]
SPOT_CHECK = "SPOT_CHECK"
DEFAULT_NODE = "receiving"
ROLLING_WINDOW = 200  # labels per point of the rolling curves


# --- pure aggregation ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class LabelRow:
    node: str
    vendor_id: str
    good: bool
    spot_check: bool
    confidence: float


@dataclass
class VendorFigures:
    """One vendor's figures (``vendor_id`` ``*``: the node's total)."""

    vendor_id: str
    decided: int = 0
    exceptions: int = 0
    spot_checks: int = 0
    labels: int = 0
    accepted: int = 0  # non-spot labels people accepted: false alarms
    spot_labels: int = 0
    spot_good: int = 0
    review_rate: float | None = None
    false_alarm_rate: float | None = None
    spot_precision: float | None = None
    spot_interval: tuple[float, float] = (0.0, 1.0)
    ece_all: float | None = None
    ece_spot: float | None = None

    def finish(self, labels: Sequence[LabelRow]) -> VendorFigures:
        self.labels = len(labels)
        self.accepted = sum(1 for r in labels if r.good and not r.spot_check)
        spot = [r for r in labels if r.spot_check]
        self.spot_labels = len(spot)
        self.spot_good = sum(1 for r in spot if r.good)
        self.review_rate = self.exceptions / self.decided if self.decided else None
        self.false_alarm_rate = self.accepted / self.decided if self.decided else None
        self.spot_precision = self.spot_good / self.spot_labels if self.spot_labels else None
        self.spot_interval = wilson(self.spot_good, self.spot_labels)
        self.ece_all = expected_calibration_error([r.confidence for r in labels], [r.good for r in labels]) \
            if labels else None
        self.ece_spot = expected_calibration_error([r.confidence for r in spot], [r.good for r in spot]) \
            if spot else None
        return self


@dataclass
class NodeReport:
    node: str
    total: VendorFigures
    vendors: list[VendorFigures]
    bins: list[Bin]  # reliability of the confidence over every label
    spot_bins: list[Bin]
    drift_events: int | None = 0  # None: unknown (the checkpoint could not be read)
    drift_detail: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: str = ""  # what the drift count comes from

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "total": asdict(self.total), "vendors": [asdict(v) for v in self.vendors],
                "reliability": [asdict(b) for b in self.bins], "spot_reliability": [asdict(b) for b in self.spot_bins],
                "drift_events": self.drift_events, "drift_detail": self.drift_detail, "checkpoint": self.checkpoint}


def aggregate(decided: Iterable[tuple[str, str, int]], exceptions: Iterable[tuple[str, str, int, int]],
              labels: Iterable[LabelRow], nodes: Iterable[str] = ()) -> dict[str, NodeReport]:
    """Per node (and per vendor within it) figures from (node, vendor, decided receipts),
    (node, vendor, exceptions, spot checks) and the label rows. ``nodes``: reported even when empty."""
    per: dict[str, dict[str, VendorFigures]] = defaultdict(dict)
    by_vendor: dict[tuple[str, str], list[LabelRow]] = defaultdict(list)

    def figures(node: str, vendor: str) -> VendorFigures:
        f = per[node].get(vendor)
        if f is None:
            f = per[node][vendor] = VendorFigures(vendor)
        return f

    for node in nodes:
        per.setdefault(node, {})  # reported even without a record
    for node, vendor, n in decided:
        figures(node, vendor).decided += int(n)
    for node, vendor, n, spot in exceptions:
        f = figures(node, vendor)
        f.exceptions += int(n)
        f.spot_checks += int(spot)
    all_labels: dict[str, list[LabelRow]] = defaultdict(list)
    for row in labels:
        figures(row.node, row.vendor_id)
        by_vendor[(row.node, row.vendor_id)].append(row)
        all_labels[row.node].append(row)
    out: dict[str, NodeReport] = {}
    for node in sorted(per):
        vendors = [f.finish(by_vendor[(node, f.vendor_id)]) for _, f in sorted(per[node].items())]
        total = VendorFigures("*", decided=sum(v.decided for v in vendors),
                              exceptions=sum(v.exceptions for v in vendors),
                              spot_checks=sum(v.spot_checks for v in vendors)).finish(all_labels[node])
        node_labels = all_labels[node]
        spot_labels = [r for r in node_labels if r.spot_check]
        out[node] = NodeReport(node, total, vendors,
                               reliability([r.confidence for r in node_labels], [r.good for r in node_labels]),
                               reliability([r.confidence for r in spot_labels], [r.good for r in spot_labels]))
    return out


def label_curve(labels: Sequence[LabelRow], window: int = ROLLING_WINDOW, points: int = 200) -> list[dict[str, Any]]:
    """Rolling figures over the labels in the order they were learnt: at label n, over the last
    ``window`` labels, the share of (non-spot) exceptions people accepted and the ECE of the confidence."""
    n = len(labels)
    if not n:
        return []
    step = max(1, n // points)
    out = []
    for end in [*range(step, n, step), n]:
        chunk = labels[max(0, end - window):end]
        raised = [r for r in chunk if not r.spot_check]
        out.append({"labels": end,
                    "false_alarm_share": sum(r.good for r in raised) / len(raised) if raised else None,
                    "ece": expected_calibration_error([r.confidence for r in chunk], [r.good for r in chunk])})
    return out


def review_curve(buckets: Iterable[tuple[datetime, int, int, int]]) -> list[dict[str, Any]]:
    """Per time bucket (start, decided receipts, exceptions, the model's label count): the review rate,
    and the label count carried forward where a bucket's outputs name none."""
    out = []
    labels = 0
    for start, decided, exceptions, model_labels in sorted(buckets, key=lambda b: b[0]):
        labels = max(labels, int(model_labels))
        out.append({"time": start, "decided": int(decided), "exceptions": int(exceptions),
                    "review_rate": exceptions / decided if decided else None, "model_labels": labels})
    return out


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``--since``: an ISO date or time (UTC unless it says otherwise), or a span back from now (``90m``,
    ``24h``, ``7d``, ``2w``)."""
    now = now or datetime.now(UTC)
    m = _RELATIVE.match(text.strip().lower())
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m.group(2)]
        return now - timedelta(**{unit: float(m.group(1))})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r}: not an ISO date/time nor a span like 24h or 7d") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


# --- reading ClickHouse -------------------------------------------------------------------------------
def _tables(client: Any, database: str) -> set[str]:
    result = client.query("SELECT name FROM system.tables WHERE database = {db:String}", parameters={"db": database})
    return {str(row[0]) for row in result.result_rows}


@dataclass
class Stored:
    decided: list[tuple[str, str, int]]
    exceptions: list[tuple[str, str, int, int]]
    labels: list[LabelRow]
    buckets: dict[str, list[tuple[datetime, int, int, int]]]  # per node
    missing_tables: list[str]


def read_stored(client: Any, database: str, node: str | None, since: datetime | None) -> Stored:
    from clickhouse_connect.driver.binding import quote_identifier

    db = quote_identifier(database)
    have = _tables(client, database)
    missing = [t for t in ("verified", "exceptions", "labels") if t not in have]
    params: dict[str, Any] = {"node": node or "", "since": since or datetime(1970, 1, 1, tzinfo=UTC)}
    node_filter = "({node:String} = '' OR node = {node:String})"
    decisions_from = []
    if "verified" in have:
        decisions_from.append(f"SELECT node, vendor_id, subject_id, decision_time, model_version, 0 AS exc, 0 AS spot "
                              f"FROM {db}.verified FINAL WHERE decision_source != 'HUMAN'")
    if "exceptions" in have:
        decisions_from.append(f"SELECT node, vendor_id, subject_id, decision_time, model_version, 1 AS exc, "
                              f"has(reason_codes, '{SPOT_CHECK}') AS spot FROM {db}.exceptions FINAL")
    decided: list[tuple[str, str, int]] = []
    exceptions: list[tuple[str, str, int, int]] = []
    buckets: dict[str, list[tuple[datetime, int, int, int]]] = defaultdict(list)
    if decisions_from:
        union = (f"(SELECT * FROM ({' UNION ALL '.join(decisions_from)}) WHERE {node_filter} "
                 "AND decision_time >= {since:DateTime64(3, 'UTC')})")
        result = client.query(f"SELECT node, vendor_id, uniqExact(subject_id), sum(exc), sum(spot) FROM {union} "
                              "GROUP BY node, vendor_id", parameters=params)
        for n, vendor, count, exc, spot in result.result_rows:
            decided.append((str(n), str(vendor), int(count)))
            if exc:
                exceptions.append((str(n), str(vendor), int(exc), int(spot)))
        span = client.query(f"SELECT min(decision_time), max(decision_time), count() FROM {union}",
                            parameters=params).result_rows[0]
        if span[2]:
            seconds = max(60, math.ceil((_aware(span[1]) - _aware(span[0])).total_seconds() / 60))
            result = client.query(
                f"SELECT node, toStartOfInterval(decision_time, toIntervalSecond({seconds})) AS b, "
                "uniqExact(subject_id), sum(exc), "
                "max(toInt64OrZero(extract(model_version, '/L([0-9]+)'))) "
                f"FROM {union} GROUP BY node, b ORDER BY node, b", parameters=params)
            for n, start, count, exc, labels_then in result.result_rows:
                buckets[str(n)].append((_aware(start), int(count), int(exc), int(labels_then)))
    labels: list[LabelRow] = []
    if "labels" in have:
        result = client.query(
            f"SELECT node, vendor_id, good, spot_check, confidence FROM {db}.labels FINAL WHERE {node_filter} "
            "AND decided_at >= {since:DateTime64(3, 'UTC')} ORDER BY node, kafka_offset", parameters=params)
        labels = [LabelRow(str(n), str(v), bool(g), bool(s), float(c)) for n, v, g, s, c in result.result_rows]
    return Stored(decided, exceptions, labels, dict(buckets), missing)


def _aware(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return datetime.fromtimestamp(float(value), UTC)


def add_drift(reports: Mapping[str, NodeReport], settings: Any, say: Say) -> None:
    """Drift events from each node's newest checkpoint (Kafka); unknown when it cannot be read."""
    from lotflow.model_admin import read_checkpoints
    from lotflow.schemas.serde import schema_source

    try:
        checkpoints = read_checkpoints(settings, schema_source(settings.schema_registry_url))
    except RuntimeError as exc:
        say(f"drift events unknown: {exc}")
        for r in reports.values():
            r.drift_events, r.checkpoint = None, "unreadable"
        return
    from lotflow.scorers.learner import Learner

    for node, r in reports.items():
        c = checkpoints.get(node)
        if c is None:
            r.drift_events, r.checkpoint = 0, "no checkpoint"
            continue
        try:
            learner = Learner.from_bytes(c.state)
        except Exception as exc:  # a checkpoint of another format: the workers refuse it too
            r.drift_events, r.checkpoint = None, f"checkpoint unreadable ({exc})"
            continue
        r.drift_events = len(learner.drift_events)
        r.drift_detail = learner.drift_events[-20:]
        r.checkpoint = f"checkpoint of {c.labels} labels ({c.source})"


# --- output ---------------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            for row in rows]


def report_lines(r: NodeReport) -> list[str]:
    t = r.total
    out = [f"node {r.node}: {t.decided} decided receipts, {t.exceptions} exceptions ({t.spot_checks} spot checks), "
           f"{t.labels} labels"]
    if not t.decided:
        out.append("  no decided receipts yet")
    out.append(f"  review rate {_pct(t.review_rate)}, false-alarm rate {_pct(t.false_alarm_rate)} "
               f"({t.accepted} exceptions accepted by people)")
    if t.labels:
        low, high = t.spot_interval
        out.append(f"  ECE of the confidence: {_num(t.ece_all)} over all labels, {_num(t.ece_spot)} over "
                   f"{t.spot_labels} spot-check labels")
        out.append(f"  spot-check precision {_pct(t.spot_precision)} ({t.spot_good}/{t.spot_labels}; Wilson 95% "
                   f"{100 * low:.1f}-{100 * high:.1f}%)")
    else:
        out.append("  no labels yet")
    drift = "unknown" if r.drift_events is None else str(r.drift_events)
    out.append(f"  drift events: {drift}" + (f" ({r.checkpoint})" if r.checkpoint else ""))
    if r.vendors:
        rows = [("VENDOR", "DECIDED", "EXCEPTIONS", "SPOT", "REVIEW", "LABELS", "FALSE ALARM", "SPOT PREC",
                 "WILSON 95%", "ECE ALL", "ECE SPOT")]
        for v in r.vendors:
            low, high = v.spot_interval
            rows.append((v.vendor_id, str(v.decided), str(v.exceptions), str(v.spot_checks), _pct(v.review_rate),
                         str(v.labels), _pct(v.false_alarm_rate), _pct(v.spot_precision),
                         f"{100 * low:.0f}-{100 * high:.0f}%" if v.spot_labels else "-", _num(v.ece_all),
                         _num(v.ece_spot)))
        out += _table(rows)
    return out


def plot_reliability(reports: Mapping[str, NodeReport], path: Path) -> bool:
    """Mean confidence against the observed good share per bin, per node (and its spot checks)."""
    if not any(r.total.labels for r in reports.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for r in reports.values():
        for name, bins in ((f"{r.node}: all labels (ECE {_num(r.total.ece_all)})", r.bins),
                           (f"{r.node}: spot checks (ECE {_num(r.total.ece_spot)})", r.spot_bins)):
            used = [b for b in bins if b.count]
            if not used:
                continue
            xs = [b.mean_confidence for b in used]
            ys = [b.observed_rate for b in used]
            ax.plot(xs, ys, marker="o", label=name)
            for b in used:
                ax.annotate(str(b.count), (b.mean_confidence, b.observed_rate), textcoords="offset points",
                            xytext=(4, -10), fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("mean confidence in the bin")
    ax.set_ylabel("observed share of good hand-offs (labels)")
    ax.set_title("reliability of the confidence (10 bins; numbers: labels per bin)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_learning(curves: Mapping[str, list[dict[str, Any]]], reviews: Mapping[str, list[dict[str, Any]]],
                  path: Path) -> bool:
    """Rolling false-alarm share and ECE over the label count; review rate and label count over time."""
    if not any(curves.values()) and not any(reviews.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8.5))
    for node, curve in curves.items():
        xs = [p["labels"] for p in curve]
        top.plot(xs, [math.nan if p["false_alarm_share"] is None else p["false_alarm_share"] for p in curve],
                 label=f"{node}: share of exceptions people accepted")
        top.plot(xs, [p["ece"] for p in curve], label=f"{node}: ECE of the confidence")
    top.set_title(f"over the labels learnt (rolling, last {ROLLING_WINDOW} labels)")
    top.set_xlabel("labels")
    top.set_ylim(0, 1)
    top.grid(alpha=0.3)
    top.legend(fontsize=8)
    if not any(curves.values()):
        top.text(0.5, 0.5, "no labels yet", ha="center", va="center", transform=top.transAxes)
    twin = bottom.twinx()
    for node, review in reviews.items():
        times = [p["time"] for p in review]
        bottom.plot(times, [math.nan if p["review_rate"] is None else 100 * p["review_rate"] for p in review],
                    label=f"{node}: review rate (%)")
        twin.plot(times, [p["model_labels"] for p in review], linestyle="--", label=f"{node}: model's labels")
    bottom.set_title("over time (decision time): review rate and the model's label count")
    bottom.set_ylabel("review rate (%)")
    twin.set_ylabel("labels in the model")
    bottom.grid(alpha=0.3)
    handles = bottom.get_legend_handles_labels()
    twin_handles = twin.get_legend_handles_labels()
    if handles[0] or twin_handles[0]:
        bottom.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], fontsize=8, loc="upper right")
    for tick in bottom.get_xticklabels():
        tick.set_rotation(25)
        tick.set_horizontalalignment("right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_report(settings: Any, *, node: str | None = None, since: str | None = None, as_json: bool = False,
               checkpoint: bool = True, plots: bool = True, say: Say = print) -> int:
    """``lotflow report``: returns the exit code."""
    from lotflow.sinks.client import connect

    when = parse_since(since) if since else None
    database = settings.clickhouse_database
    stored = read_stored(connect(settings), database, node, when)
    notes: list[str] = []
    if stored.missing_tables:
        notes.append(f"tables missing in {database}: {', '.join(stored.missing_tables)} (run lotflow db migrate); "
                     "counted as empty")
    reports = aggregate(stored.decided, stored.exceptions, stored.labels, [node or DEFAULT_NODE])
    if node is not None:
        reports = {k: v for k, v in reports.items() if k == node}
    if checkpoint:
        add_drift(reports, settings, notes.append)
    else:
        for r in reports.values():
            r.drift_events, r.checkpoint = None, "--no-checkpoint"
    written: list[str] = []
    if plots:
        by_node: dict[str, list[LabelRow]] = defaultdict(list)
        for row in stored.labels:
            if row.node in reports:
                by_node[row.node].append(row)
        curves = {n: label_curve(rows) for n, rows in by_node.items()}
        reviews = {n: review_curve(b) for n, b in stored.buckets.items() if n in reports}
        var = Path(settings.var_dir)
        try:
            if plot_reliability(reports, var / "report-reliability.png"):
                written.append(str(var / "report-reliability.png"))
            if plot_learning(curves, reviews, var / "report-learning-curve.png"):
                written.append(str(var / "report-learning-curve.png"))
        except ImportError as exc:
            notes.append(f"no plots: {exc} (pip install matplotlib)")
    if as_json:
        say(json.dumps({"database": database, "since": when.isoformat() if when else None,
                        "nodes": [r.to_json() for r in reports.values()], "plots": written, "notes": notes},
                       indent=2, default=str))
        return 0
    say(f"lotflow report: {database}" + (f", since {when.isoformat()}" if when else ""))
    for r in reports.values():
        say("")
        for line in report_lines(r):
            say(line)
    say("")
    for note in notes:
        say(f"note: {note}")
    say("plots: " + (", ".join(written) if written else "none (nothing to plot yet)" if plots else "off"))
    return 0
