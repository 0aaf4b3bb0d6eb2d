"""Every Prometheus metric lotflow exposes, defined once.

Metrics are built on a registry passed in, so tests and benchmarks get their own.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["SinkMetrics", "WorkerMetrics", "serve"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_CONFIDENCE_BUCKETS = (0.1, 0.25, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99, 1.0)


@dataclass(frozen=True)
class WorkerMetrics:
    records_in: Counter
    records_out: Counter
    dead_letters: Counter
    processing_latency: Histogram
    batch_duration: Histogram
    transaction_duration: Histogram
    confidence: Histogram
    pending: Gauge
    consumer_lag: Gauge
    model_labels: Gauge
    model_ece: Gauge
    model_reliability: Gauge
    spot_check_precision: Gauge
    spot_checks: Gauge
    drifted_vendors: Gauge
    drift_events: Gauge
    shared_history_records: Counter
    state_keys: Gauge
    compiled_core: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> WorkerMetrics:
        return cls(
            records_in=Counter("lotflow_records_in", "Input records consumed", ["topic"], registry=registry),
            records_out=Counter(
                "lotflow_records_out", "Output records produced", ["topic", "decision"], registry=registry
            ),
            dead_letters=Counter(
                "lotflow_dead_letters", "Inputs sent to the dead-letter topic", ["topic", "error_class"],
                registry=registry,
            ),
            processing_latency=Histogram(
                "lotflow_processing_latency_seconds", "Receipt publish time to decision time",
                ["node"], buckets=_LATENCY_BUCKETS, registry=registry,
            ),
            batch_duration=Histogram(
                "lotflow_batch_duration_seconds", "Time to process one batch of events",
                ["node"], buckets=_LATENCY_BUCKETS, registry=registry,
            ),
            transaction_duration=Histogram(
                "lotflow_transaction_seconds", "Time to produce and commit one batch's Kafka transaction",
                ["node"], buckets=_LATENCY_BUCKETS, registry=registry,
            ),
            confidence=Histogram(
                "lotflow_confidence", "Confidence of decisions", ["node", "decision"],
                buckets=_CONFIDENCE_BUCKETS, registry=registry,
            ),
            pending=Gauge("lotflow_pending_subjects", "Subjects waiting for documents", ["node"], registry=registry),
            state_keys=Gauge(
                "lotflow_state_keys", "Keys this worker holds in a state table (its partitions')", ["node", "table"],
                registry=registry,
            ),
            consumer_lag=Gauge(
                "lotflow_consumer_lag", "Records behind the end of the partition", ["topic", "partition"],
                registry=registry,
            ),
            compiled_core=Gauge(
                "lotflow_compiled_core", "1 when the processor's core runs compiled (lotflow.compiled), 0 when "
                "it runs from its sources", registry=registry,
            ),
            model_labels=Gauge(
                "lotflow_model_labels", "People's decisions the confidence model has learnt from", ["node"],
                registry=registry,
            ),
            model_ece=Gauge(
                "lotflow_model_ece", "Expected calibration error (10 bins) of the confidence on labelled "
                "outcomes: all labels, or the unbiased spot checks", ["node", "sample"], registry=registry,
            ),
            model_reliability=Gauge(
                "lotflow_model_reliability", "Reliability diagram of the confidence on labels: per bin the mean "
                "confidence, the observed rate of good hand-offs and the count", ["node", "bin", "stat"],
                registry=registry,
            ),
            spot_check_precision=Gauge(
                "lotflow_spot_check_precision", "Precision of automatic verification estimated from spot checks, "
                "with its 95 % Wilson interval", ["node", "bound"], registry=registry,
            ),
            spot_checks=Gauge("lotflow_spot_checks", "Spot checks decided by people", ["node"], registry=registry),
            drifted_vendors=Gauge(
                "lotflow_model_drifted_vendors", "Vendors tightened after ADWIN saw the model's error rise",
                ["node"], registry=registry,
            ),
            drift_events=Gauge(
                "lotflow_model_drift_events", "Drift detections since the model started learning", ["node"],
                registry=registry,
            ),
            shared_history_records=Counter(
                "lotflow_shared_history_records", "Committed vendor-history changelog records (every partition's) "
                "this worker has applied to its shared history", registry=registry,
            ),
        )


@dataclass(frozen=True)
class SinkMetrics:
    rows: Counter
    batch_rows: Histogram
    batch_latency: Histogram
    errors: Counter
    consumer_lag: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> SinkMetrics:
        return cls(
            rows=Counter("lotflow_sink_rows", "Rows written to ClickHouse", ["table"], registry=registry),
            batch_rows=Histogram(
                "lotflow_sink_batch_rows", "Rows per insert", ["table"],
                buckets=(1, 10, 100, 1000, 5000, 10000, 20000, 50000, 100000), registry=registry,
            ),
            batch_latency=Histogram(
                "lotflow_sink_batch_latency_seconds", "Insert latency", ["table"],
                buckets=_LATENCY_BUCKETS, registry=registry,
            ),
            errors=Counter("lotflow_sink_errors", "Failed inserts (retried)", ["table"], registry=registry),
            consumer_lag=Gauge(
                "lotflow_sink_consumer_lag", "Records behind the end of the partition", ["topic", "partition"],
                registry=registry,
            ),
        )


def observe_all(histogram: Any, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for every value, with one update per bucket and one of the sum.

    ``observe`` takes a lock per call (two per decision on the hot path); counting a batch's
    values per bucket first gives the same buckets, count and sum. ``histogram`` is a labelled
    child; a NaN lands in no bucket, as with ``observe``.
    """
    if not values:
        return
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    for value in values:
        if value == value:  # not NaN
            counts[bisect_left(bounds, value)] += 1
    histogram._sum.inc(sum(values))
    for bucket, count in zip(histogram._buckets, counts, strict=True):
        if count:
            bucket.inc(count)


def serve(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> None:
    """Expose ``/metrics`` for ``registry`` on a background thread."""
    start_http_server(port, addr=host, registry=registry)
