"""The learning run, shortened for CI: 3,000 receipts through a real worker, the sink and the review
service, with the simulated reviewer deciding the queue through the API from the ground truth.

Once people's labels reach the worker's model, fewer clean receipts are held for a person: the
false-alarm rate of the last windows is below that of the first windows with labels, or below what
the fixed prior alone would have held on the same receipts.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from pydantic import SecretStr

from lotflow.learning_run import TABLE_HEADER, LearningOptions, format_window, run_core
from lotflow.settings import Settings
from lotflow.sinks.clickhouse import connect

from .pipeline import PROJECT_ROOT, WorkerProcess, free_port

TopicSetFactory = Callable[..., Settings]
LOGS = PROJECT_ROOT / "var" / "test-logs"
WINDOW = 500  # 6 windows of the 3,000 receipts
POOLED = 2  # windows compared at each end


def pooled_far(ws: Sequence[Mapping[str, Any]]) -> float:
    return sum(w["false_alarms"] for w in ws) / max(1, sum(w["decided"] for w in ws))


def pooled_prior_far(ws: Sequence[Mapping[str, Any]]) -> float | None:
    if any(w["prior_false_alarm_rate"] is None for w in ws):
        return None
    return sum(w["prior_false_alarm_rate"] * w["decided"] for w in ws) / max(1, sum(w["decided"] for w in ws))


def test_false_alarms_fall_once_people_label(topic_set: TopicSetFactory, workers: list[WorkerProcess],
                                            clickhouse_dsn: SecretStr, tmp_path: Path,
                                            request: pytest.FixtureRequest) -> None:
    database = f"learning_{uuid.uuid4().hex[:10]}"
    settings = topic_set(document_wait_s=2.0, worker_web_port=free_port(), clickhouse_database=database,
                         clickhouse_dsn=clickhouse_dsn, sink_batch_s=1.0, sink_metrics_port=free_port(),
                         review_users_file=tmp_path / "users.json",
                         spot_check_share=0.02)  # as in production (the fixture turns them off)
    worker = WorkerProcess(settings, LOGS / f"{request.node.name}-{settings.app_id}.log").start()
    workers.append(worker)

    def worker_error() -> str | None:
        assert worker.proc is not None
        code = worker.proc.poll()
        return None if code is None else f"the worker exited with {code}: see {worker.log}"

    lines: list[str] = []
    opts = LearningOptions(count=3000, seed=7, rate=60.0, faults="learning", window=WINDOW, drain_s=0.0,
                           progress_s=10.0)
    try:
        result = run_core(settings, opts, worker_error=worker_error, say=lines.append,
                          hasher=PasswordHasher(time_cost=1, memory_cost=1024))
    finally:
        connect(settings).command(f"DROP DATABASE IF EXISTS {database} SYNC")
    table = "\n".join([TABLE_HEADER, *(format_window(w) for w in result["windows"])])
    print(table)  # shown with -s, and in the report of a failure
    assert result["undecided"] == 0, table
    assert result["reviewer"].get("posted", 0) > 0, "\n".join(lines[-20:])
    assert result["reviewer"].get("errors", 0) == 0, result["reviewer"]["errors_first"]

    ws = result["windows"]
    labelled = [i for i, w in enumerate(ws) if (w["labels_min"] or 0) > 0]  # decided with labels throughout
    assert labelled, f"no window was decided with labels:\n{table}"
    first = ws[labelled[0]:labelled[0] + POOLED]
    last = ws[-POOLED:]
    assert labelled[0] + POOLED <= len(ws) - POOLED, f"too few windows after the first labels:\n{table}"
    far_first, far_last, prior_last = pooled_far(first), pooled_far(last), pooled_prior_far(last)
    assert far_last < far_first or (prior_last is not None and far_last < prior_last), (
        f"false alarms did not fall: first windows with labels {far_first:.2%}, last {far_last:.2%}, "
        f"the prior's on the last {'n/a' if prior_last is None else f'{prior_last:.2%}'}\n{table}")
