"""Generate the lotflow Grafana dashboard (grafanalib) into the Helm chart.

    python helm/dashboards/lotflow_dashboard.py          # rewrite helm/lotflow/files/dashboard.json
    python helm/dashboards/lotflow_dashboard.py --check  # exit 1 if the committed JSON is stale

The chart ships the JSON in a ConfigMap labelled for the Grafana sidecar. Queries use
the metric names of lotflow/metrics.py (counters with the ``_total`` suffix).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafanalib._gen import DashboardEncoder
from grafanalib.core import Dashboard as GrafanaDashboard
from grafanalib.core import (
    GridPos,
    Heatmap,
    Panel,
    RowPanel,
    Target,
    Template,
    Templating,
    TimeSeries,
)

__all__ = ["OUTPUT", "build", "render"]

OUTPUT = Path(__file__).resolve().parents[1] / "lotflow" / "files" / "dashboard.json"

DATASOURCE = "${datasource}"
NS = 'namespace=~"$namespace"'
RATE = "$__rate_interval"
WIDTH = 12
HEIGHT = 8


def _target(expr: str, legend: str, ref: str) -> Target:
    return Target(expr=expr, legendFormat=legend, refId=ref, datasource=DATASOURCE)


def _timeseries(title: str, description: str, unit: str, *queries: tuple[str, str]) -> TimeSeries:
    return TimeSeries(
        title=title,
        description=description,
        dataSource=DATASOURCE,
        targets=[_target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)],
        unit=unit,
        legendDisplayMode="list",
        tooltipMode="multi",
        fillOpacity=10,
    )


def _quantiles(metric: str, by: str) -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{NS}}}[{RATE}])))",
            f"p{round(q * 100)} {{{{{by}}}}}",
        )
        for q in (0.5, 0.99)
    ]


def _worker_panels() -> list[Panel]:
    # Same ratio as the LotflowExceptionRatioHigh alert: exceptions among decisions.
    out = "lotflow_records_out_total"
    decided = f'{out}{{{NS}, decision=~"(?i)verified|exception"}}'
    decisions = f"sum by (namespace) (rate({decided}[{RATE}]))"
    exceptions = f'sum by (namespace) (rate({out}{{{NS}, decision=~"(?i)exception"}}[{RATE}]))'
    return [
        _timeseries(
            "Throughput in / out by decision",
            "Records consumed per input topic and records produced per decision.",
            "reqps",
            (f"sum by (topic) (rate(lotflow_records_in_total{{{NS}}}[{RATE}]))", "in {{topic}}"),
            (
                f"sum by (decision) (rate(lotflow_records_out_total{{{NS}}}[{RATE}]))",
                "out {{decision}}",
            ),
        ),
        _timeseries(
            "Exception ratio",
            "Share of decisions that raised an explainable exception (alert above 25 %).",
            "percentunit",
            (f"{exceptions} / {decisions}", "{{namespace}}"),
        ),
        _timeseries(
            "Dead letters",
            "Inputs sent to the dead-letter topic, per source topic and error class.",
            "reqps",
            (
                f"sum by (topic, error_class) (rate(lotflow_dead_letters_total{{{NS}}}[{RATE}]))",
                "{{topic}} {{error_class}}",
            ),
        ),
        _timeseries(
            "Processing latency p50 / p99",
            "Publish time of the input to decision time, per node (alert: p99 > 0.5 s).",
            "s",
            *_quantiles("lotflow_processing_latency_seconds", "node"),
        ),
        _timeseries(
            "Consumer lag",
            "Records behind the end of the input partitions, per topic.",
            "short",
            (
                f"sum by (topic) (max by (topic, partition) (lotflow_consumer_lag{{{NS}}}))",
                "{{topic}}",
            ),
        ),
        Heatmap(
            title="Confidence distribution",
            description="Model confidence of the decisions (all nodes), per time bucket.",
            dataSource=DATASOURCE,
            targets=[
                Target(
                    expr=f"sum by (le) (increase(lotflow_confidence_bucket{{{NS}}}[{RATE}]))",
                    legendFormat="{{le}}",
                    refId="A",
                    format="heatmap",
                    datasource=DATASOURCE,
                )
            ],
            dataFormat="tsbuckets",
            hideZeroBuckets=True,
            yBucketBound="upper",
        ),
        _timeseries(
            "Pending subjects",
            "Subjects waiting for their documents (PO, spec, certificate), per node.",
            "short",
            (f"sum by (node) (lotflow_pending_subjects{{{NS}}})", "{{node}}"),
        ),
        _timeseries(
            "Batch duration p50 / p99",
            "Time to process one batch of events, per node.",
            "s",
            *_quantiles("lotflow_batch_duration_seconds", "node"),
        ),
        _timeseries(
            "Transaction p50 / p99",
            "Time to produce and commit one batch's Kafka transaction (outputs, changelog, input marks).",
            "s",
            *_quantiles("lotflow_transaction_seconds", "node"),
        ),
        _timeseries(
            "Human labels learned",
            "People's decisions the confidence model has learnt from, per node (every replica holds the same).",
            "short",
            (f"max by (node) (lotflow_model_labels{{{NS}}})", "{{node}}"),
        ),
        _timeseries(
            "Calibration error (ECE)",
            "Expected calibration error of the confidence, 10 bins, on all labels and on the unbiased spot checks.",
            "percentunit",
            (f"max by (node, sample) (lotflow_model_ece{{{NS}}})", "{{node}} {{sample}}"),
        ),
        _timeseries(
            "Spot-check precision of automatic verification",
            "Share of spot-checked verified receipts people accepted, with its 95 % Wilson interval.",
            "percentunit",
            (f"max by (node, bound) (lotflow_spot_check_precision{{{NS}}})", "{{node}} {{bound}}"),
        ),
        _timeseries(
            "Vendors tightened by drift",
            "Vendors whose model error rose (ADWIN): their soft reasons go to people until the model agrees again.",
            "short",
            (f"max by (node) (lotflow_model_drifted_vendors{{{NS}}})", "{{node}}"),
        ),
    ]


def _sink_panels() -> list[Panel]:
    return [
        _timeseries(
            "Sink rows/s",
            "Rows written to ClickHouse, per table.",
            "rowsps",
            (f"sum by (table) (rate(lotflow_sink_rows_total{{{NS}}}[{RATE}]))", "{{table}}"),
        ),
        _timeseries(
            "Sink batch latency p50 / p99",
            "Insert latency per table.",
            "s",
            *_quantiles("lotflow_sink_batch_latency_seconds", "table"),
        ),
        _timeseries(
            "Sink errors",
            "Failed inserts per table (retried: rows are late, not lost).",
            "short",
            (f"sum by (table) (increase(lotflow_sink_errors_total{{{NS}}}[{RATE}]))", "{{table}}"),
        ),
        _timeseries(
            "Sink consumer lag",
            "Records the sink is behind, per topic.",
            "short",
            (
                f"sum by (topic) (max by (topic, partition) (lotflow_sink_consumer_lag{{{NS}}}))",
                "{{topic}}",
            ),
        ),
        _timeseries(
            "Sink rows per insert",
            "Average batch size per table.",
            "short",
            (
                f"sum by (table) (rate(lotflow_sink_batch_rows_sum{{{NS}}}[{RATE}])) / "
                f"sum by (table) (rate(lotflow_sink_batch_rows_count{{{NS}}}[{RATE}]))",
                "{{table}}",
            ),
        ),
    ]


def _layout(sections: list[tuple[str, list[Panel]]]) -> list[Panel]:
    """Rows of two panels under a row header per section."""
    panels: list[Panel] = []
    y = 0
    for title, section in sections:
        panels.append(RowPanel(title=title, gridPos=GridPos(h=1, w=24, x=0, y=y)))
        y += 1
        for i, panel in enumerate(section):
            panel.gridPos = GridPos(h=HEIGHT, w=WIDTH, x=(i % 2) * WIDTH, y=y + (i // 2) * HEIGHT)
        panels.extend(section)
        y += ((len(section) + 1) // 2) * HEIGHT
    return panels


def build() -> GrafanaDashboard:
    templating = Templating(
        list=[
            Template(
                name="datasource",
                label="Data source",
                type="datasource",
                query="prometheus",
                default="Prometheus",
            ),
            Template(
                name="namespace",
                label="Namespace",
                query="label_values(lotflow_records_in_total, namespace)",
                dataSource=DATASOURCE,
                includeAll=True,
                multi=True,
                allValue=".*",
                default="$__all",
                refresh=2,
                sort=1,
            ),
        ]
    )
    return GrafanaDashboard(
        title="lotflow",
        uid="lotflow-overview",
        description="Verification workers and ClickHouse sink: throughput, exceptions, latency.",
        tags=["lotflow", "kafka", "clickhouse"],
        timezone="browser",
        refresh="30s",
        templating=templating,
        panels=_layout([("Verification workers", _worker_panels()), ("ClickHouse sink", _sink_panels())]),
    ).auto_panel_ids()


def render() -> str:
    data: dict[str, Any] = build().to_json_data()
    return json.dumps(data, cls=DashboardEncoder, sort_keys=True, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.output.exists() or args.output.read_text(encoding="utf-8") != text:
            print(f"{args.output} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
