"""``lotflow model status|export|import`` and ``lotflow train`` against the real broker."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from pydantic import SecretStr

from lotflow.cli import main
from lotflow.kafka_clients import producer_config
from lotflow.schemas.serde import AvroCodec, schema_source
from lotflow.scorers.learner import Label, Learner, LearnerConfig
from lotflow.settings import Settings, get_settings
from lotflow.streams import topics
from lotflow.streams.learning import latest_checkpoint, write_checkpoint
from lotflow.training import write_history

TopicSetFactory = Callable[..., Settings]


class FakeWorker:
    """Answers ``/model`` like a worker's web server does."""

    def __init__(self) -> None:
        self.answer: dict[str, Any] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps(owner.answer).encode()
                self.send_response(200 if self.path == "/model" else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def worker() -> Iterator[FakeWorker]:
    w = FakeWorker()
    yield w
    w.close()


@pytest.fixture
def settings(topic_set: TopicSetFactory, worker: FakeWorker, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Fresh labels and checkpoint topics; the CLI reads these settings from the environment."""
    s = topic_set([topics.LABELS, topics.MODEL_CHECKPOINTS], worker_web_port=worker.port, var_dir=tmp_path / "var")
    for key, value in s.to_env().items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()  # read once per process: this test's environment
    yield s
    get_settings.cache_clear()


def _label(i: int) -> Label:
    return Label(f"d{i}", "V-1", "M-1", ("QUANTITY_SHORT",), {"n_warn": 1.0, "x": float(i)}, i % 2 == 0, 0.7)


def _publish_labels(settings: Settings, nodes: list[str]) -> None:
    name = topics.LABELS.full_name(settings)
    codec = AvroCodec(schema_source(settings.schema_registry_url), f"{name}-value", topics.LABELS.schema,
                      epoch_millis=True)
    producer = Producer(producer_config(settings))
    for i, node in enumerate(nodes):
        label = _label(i)
        record = {"label_id": label.label_id, "node": node, "exception_id": f"x{i}", "subject_id": f"R{i}",
                  "vendor_id": label.vendor_id, "material_id": label.material_id, "reason_codes": ["QUANTITY_SHORT"],
                  "soft_codes": list(label.soft_codes), "features": dict(label.features), "good": label.good,
                  "resolution": "ACCEPT" if label.good else "REJECT", "confidence": label.confidence,
                  "spot_check": False, "decided_by": "alice", "decided_at": 1_700_000_000_000 + i,
                  "decision_time": 1_700_000_000_000 + i}
        producer.produce(name, key=node.encode(), value=codec.encode(record), partition=0)
    assert producer.flush(30) == 0


def test_status_and_export_without_a_checkpoint(settings: Settings, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "status"]) == 0
    out = capsys.readouterr().out
    assert "receiving" in out and "no checkpoint" in out and "end offset 0" in out
    assert "worker (http://127.0.0.1:" in out  # the fake worker answered (with nothing in particular)
    assert main(["model", "export", str(tmp_path / "m.bin")]) == 2
    assert "no checkpoint of node 'receiving'" in capsys.readouterr().err
    assert not (tmp_path / "m.bin").exists()


def test_export_import_and_status(settings: Settings, worker: FakeWorker, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    source = schema_source(settings.schema_registry_url)
    _publish_labels(settings, ["receiving", "receiving", "other", "receiving", "receiving"])
    learner = Learner(LearnerConfig())
    learner.learn(_label(0), 0)
    learner.learn(_label(1), 1)
    write_checkpoint(settings, source, "receiving", learner, "worker")
    worker.answer = {"node": "receiving", "version": learner.version, "labels": 4, "labels_offset": 4,
                     "fingerprint": "f" * 16}

    assert main(["model", "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["labels_end_offset"] == 5
    [node] = status["nodes"]
    assert node["node"] == "receiving" and node["labels_after_checkpoint"] == 2  # offsets 3 and 4
    assert node["checkpoint"]["source"] == "worker" and node["checkpoint"]["labels"] == 2
    assert node["checkpoint"]["fingerprint"] == learner.fingerprint()
    assert status["worker"]["answer"]["labels"] == 4

    exported = tmp_path / "receiving.model"
    assert main(["model", "export", str(exported)]) == 0
    assert "2 labels" in capsys.readouterr().out
    assert Learner.from_bytes(exported.read_bytes()).fingerprint() == learner.fingerprint()
    assert main(["model", "export", str(exported)]) == 2  # no overwrite without --force
    assert "--force" in capsys.readouterr().err
    assert main(["model", "export", str(exported), "--force"]) == 0

    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    assert main(["model", "import", str(not_a_model)]) == 2
    assert "is not a lotflow learner" in capsys.readouterr().err

    assert main(["model", "import", str(exported)]) == 0
    out = capsys.readouterr().out
    assert f"fingerprint {learner.fingerprint()}" in out and "labels offset 1" in out
    assert "workers load it when they (re)start" in out and "the labels after offset 1" in out
    checkpoint = latest_checkpoint(settings, source, "receiving")
    assert checkpoint is not None and checkpoint.source == "import" and checkpoint.labels == 2
    assert checkpoint.fingerprint == learner.fingerprint()

    worker.answer["fingerprint"] = learner.fingerprint()
    assert main(["model", "status"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("receiving"))
    assert "import" in row and learner.fingerprint() in row
    assert "the same model as the checkpoint" in out

    assert main(["model", "import", str(exported), "--node", "other", "--replay-all"]) == 0
    assert "replay every label" in capsys.readouterr().out
    other = latest_checkpoint(settings, source, "other")
    assert other is not None and other.labels_offset == -1 and other.source == "import"


def test_train_from_a_file_writes_a_train_checkpoint(settings: Settings, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    history = tmp_path / "history.csv"
    write_history(history, [{"vendor_id": f"V-{i % 3}", "material_id": "M-1", "soft_codes": "", "good": i % 5 != 0,
                             "n_block": float(i % 5 == 0), "n_warn": float(i % 7 == 0)} for i in range(300)])
    assert main(["train", "--from-file", str(history)]) == 0
    out = capsys.readouterr().out
    assert "trained on 240 previous receipts; held-out ECE" in out and "source train" in out
    checkpoint = latest_checkpoint(settings, schema_source(settings.schema_registry_url), "receiving")
    assert checkpoint is not None and checkpoint.source == "train"
    assert checkpoint.labels == 240 and checkpoint.labels_offset == -1
    assert main(["model", "status"]) == 0
    assert "train" in capsys.readouterr().out


@pytest.fixture
def database(settings: Settings, clickhouse_dsn: SecretStr, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh migrated ClickHouse database (the session's engine) for the report and train commands."""
    from lotflow.sinks.client import connect
    from lotflow.sinks.migrations import migrate

    name = f"report_{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("LOTFLOW_CLICKHOUSE_DSN", clickhouse_dsn.get_secret_value())
    monkeypatch.setenv("LOTFLOW_CLICKHOUSE_DATABASE", name)
    get_settings.cache_clear()
    client = connect(get_settings())
    migrate(client, name)
    yield name
    client.command(f"DROP DATABASE IF EXISTS {name} SYNC")


def test_report_and_train_from_clickhouse(settings: Settings, database: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from lotflow.sinks.client import connect

    assert main(["report", "--no-checkpoint"]) == 0  # empty tables
    out = capsys.readouterr().out
    assert "no decided receipts yet" in out and "no labels yet" in out
    assert main(["train", "--dry-run"]) == 2
    assert "no labels of node 'receiving'" in capsys.readouterr().err

    client = connect(get_settings())
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    common = ["node", "subject_key", "subject_id", "decision", "event_time", "decision_time", "vendor_id",
              "model_version", "kafka_topic", "kafka_partition", "kafka_offset"]
    verified = [(f"v{i}", "receiving", "PO", f"R{i}", "VERIFIED", t0, t0 + timedelta(minutes=i), "V-1",
                 f"prior-1+lr/L{i}/C0", "MACHINE", "t", 0, i) for i in range(8)]
    verified.append(("x8:released", "receiving", "PO", "R8", "VERIFIED", t0, t0, "V-1", "person:alice", "HUMAN",
                     "t", 0, 99))  # a person's release: not a machine decision
    client.insert("verified", verified, column_names=["id", *common[:8], "decision_source", *common[8:]],
                  database=database)
    exceptions = [(f"x{i}", "receiving", "PO", f"R{i}", "EXCEPTION", t0, t0 + timedelta(minutes=i), "V-1",
                   "prior-1+lr/L3/C0", ["SPOT_CHECK"] if i == 9 else ["QUANTITY_SHORT"], "t", 0, i) for i in (8, 9)]
    client.insert("exceptions", exceptions, column_names=["id", *common[:8], "reason_codes", *common[8:]],
                  database=database)
    labels = [(f"d{i}", "receiving", f"x{i}", f"R{i}", "V-1", "M-1", ["QUANTITY_SHORT"], {"n_warn": 1.0},
               i != 9, 0.8, i == 9, t0, t0, "t", 0, i) for i in (8, 9)]
    client.insert("labels", labels, column_names=[
        "label_id", "node", "exception_id", "subject_id", "vendor_id", "material_id", "soft_codes", "features", "good",
        "confidence", "spot_check", "decided_at", "decision_time", "kafka_topic", "kafka_partition", "kafka_offset"],
        database=database)

    assert main(["report", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    [node] = result["nodes"]
    total = node["total"]
    assert (total["decided"], total["exceptions"], total["spot_checks"], total["labels"]) == (10, 2, 1, 2)
    assert total["review_rate"] == pytest.approx(0.2) and total["false_alarm_rate"] == pytest.approx(0.1)
    assert (total["spot_labels"], total["spot_good"]) == (1, 0)
    assert node["drift_events"] == 0 and node["checkpoint"] == "no checkpoint"
    var = Path(get_settings().var_dir)
    assert sorted(result["plots"]) == [str(var / "report-learning-curve.png"), str(var / "report-reliability.png")]
    assert (var / "report-reliability.png").stat().st_size > 0

    assert main(["train", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trained on 2 labels" in out and "labels offset 9" in out
