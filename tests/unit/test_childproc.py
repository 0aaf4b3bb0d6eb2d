"""lotflow/childproc.py: child environments, metrics parsing, RSS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from pydantic import SecretStr

from lotflow.childproc import child_env, metric_value, parse_metrics, process_rss_mb
from lotflow.settings import Settings


def test_child_env_carries_exactly_these_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOTFLOW_SCHEMA_REGISTRY_URL", "http://parent-registry:8081")  # unset in settings
    monkeypatch.setenv("LOTFLOW_TOPIC_PREFIX", "parent.")
    monkeypatch.setenv("LOTFLOW_NOT_A_SETTING", "kept")
    monkeypatch.setenv("PATH", os.environ.get("PATH", "/usr/bin"))
    settings = Settings(
        topic_prefix="child.",
        schema_registry_url=None,
        clickhouse_dsn=SecretStr("https://u:p@h:8443"),
        document_wait_s=2.5,
        var_dir=Path("/tmp/lotflow-child"),  # absolute: the child gets it resolved
    )
    env = child_env(settings, BENCH_IN="t.in", BENCH_WEB_PORT=6067)
    assert env["LOTFLOW_TOPIC_PREFIX"] == "child."
    assert "LOTFLOW_SCHEMA_REGISTRY_URL" not in env
    assert env["LOTFLOW_NOT_A_SETTING"] == "kept"
    assert env["PATH"] == os.environ["PATH"]
    assert (env["BENCH_IN"], env["BENCH_WEB_PORT"]) == ("t.in", "6067")
    for key in [k for k in os.environ if k.startswith("LOTFLOW_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("LOTFLOW_"):
            monkeypatch.setenv(key, value)
    assert Settings() == settings


def test_metric_value_sums_matching_samples() -> None:
    registry = CollectorRegistry()
    out = Counter("lotflow_records_out", "out", ["topic", "decision"], registry=registry)
    lag = Gauge("lotflow_consumer_lag", "lag", ["topic", "partition"], registry=registry)
    out.labels("lotflow.verified", "VERIFIED").inc(3)
    out.labels("lotflow.exceptions", "EXCEPTION").inc(2)
    lag.labels("t", "0").set(5)
    lag.labels("t", "1").set(7)
    samples = parse_metrics(generate_latest(registry).decode())
    assert metric_value(samples, "lotflow_records_out_total") == 5
    assert metric_value(samples, "lotflow_records_out_total", topic="lotflow.verified") == 3
    assert metric_value(samples, "lotflow_consumer_lag", partition="1") == 7
    assert metric_value(samples, "lotflow_consumer_lag", topic="other") == 0
    assert metric_value(samples, "no_such_metric") == 0


def test_process_rss_of_this_process() -> None:
    assert 5 < process_rss_mb(os.getpid()) < 100_000
