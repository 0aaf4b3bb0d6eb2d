"""``lotflow model status|export|import``: the nodes' learnt models, as their checkpoints hold them.

A node's model lives on the compacted topic ``lotflow.model-checkpoints`` (key: node): a worker
loads the newest checkpoint when it starts and then replays the labels (``lotflow.labels``, one
partition) after the checkpoint's labels offset. So:

* ``status`` shows the newest checkpoint of every node (labels, labels offset, fingerprint,
  source, when, size), the labels topic's end offset, how many of the node's labels came after the
  checkpoint (what a restarting worker replays), and what a running worker answers on
  ``/model`` (its live version, fingerprint and labels);
* ``export FILE`` writes the newest checkpoint's learner bytes to a file;
* ``import FILE`` checks that the file is a learner and writes it as the node's newest checkpoint
  (source ``import``): workers load it when they (re)start, then replay the labels after its
  offset. A learner is a pickle: import only files you trust.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lotflow.schemas.serde import SchemaSource, schema_source
from lotflow.scorers.learner import Learner
from lotflow.settings import Settings
from lotflow.streams import topics
from lotflow.streams.learning import Checkpoint, latest_checkpoint, write_checkpoint

__all__ = ["ModelStatus", "export_model", "import_model", "model_status", "read_checkpoints", "run_model",
           "worker_model"]

Say = Callable[[str], None]
DEFAULT_NODE = "receiving"
READ_TIMEOUT_S = 60.0


def _kafka_error(settings: Settings, what: str, exc: Exception) -> RuntimeError:
    return RuntimeError(f"{what}: Kafka at {settings.bootstrap_servers} did not answer ({exc}); is the broker up "
                        "and were the topics created (lotflow topics create)?")


def _records(settings: Settings, spec: topics.TopicSpec, start: int, consumer: Any) -> Iterator[Any]:
    from lotflow.streams.learning import read_to_end  # the reader the workers restore with

    yield from read_to_end(consumer, spec.full_name(settings), start, READ_TIMEOUT_S)


def read_checkpoints(settings: Settings, source: SchemaSource) -> dict[str, Checkpoint]:
    """The newest checkpoint of every node on the checkpoints topic."""
    from lotflow.streams import learning

    try:
        return learning.read_checkpoints(settings, source, timeout_s=READ_TIMEOUT_S)
    except Exception as exc:
        raise _kafka_error(settings, f"reading {topics.MODEL_CHECKPOINTS.full_name(settings)}", exc) from exc


def labels_end_offset(settings: Settings) -> int:
    """The end offset of the labels topic (partition 0): the offset the next label gets."""
    from confluent_kafka import TopicPartition

    from lotflow.streams.learning import model_consumer

    consumer = model_consumer(settings)
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(topics.LABELS.full_name(settings), 0), timeout=10)
        return int(high)
    except Exception as exc:
        raise _kafka_error(settings, f"reading {topics.LABELS.full_name(settings)}", exc) from exc
    finally:
        consumer.close()


def labels_after(settings: Settings, source: SchemaSource, offsets: dict[str, int]) -> Counter[str]:
    """Per node, the labels on the labels topic after ``offsets[node]`` (-1: all of them)."""
    from lotflow.streams.learning import model_consumer, topic_codec

    codec = topic_codec(settings, source, topics.LABELS)
    counts: Counter[str] = Counter({node: 0 for node in offsets})
    consumer = model_consumer(settings)
    try:
        start = min(offsets.values(), default=-1) + 1
        for msg in _records(settings, topics.LABELS, start, consumer):
            if msg.value() is None:
                continue
            try:
                node = codec.decode(msg.value())["node"]
            except Exception:  # an unreadable label teaches nothing (the workers skip it too)
                continue
            if node in offsets and msg.offset() > offsets[node]:
                counts[node] += 1
    except Exception as exc:
        raise _kafka_error(settings, f"reading {topics.LABELS.full_name(settings)}", exc) from exc
    finally:
        consumer.close()
    return counts


def worker_url(settings: Settings) -> str:
    return f"http://{settings.worker_web_host}:{settings.worker_web_port}/model"


def worker_model(settings: Settings, timeout: float = 2.0) -> dict[str, Any] | None:
    """What a running worker says about its live model (None: no worker answers)."""
    try:
        with urllib.request.urlopen(worker_url(settings), timeout=timeout) as response:
            answer = json.loads(response.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return answer if isinstance(answer, dict) else None


@dataclass
class ModelStatus:
    checkpoints: dict[str, Checkpoint]
    labels_end_offset: int
    labels_after: dict[str, int]
    worker: dict[str, Any] | None
    worker_url: str
    topic: str
    labels_topic: str

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoints_topic": self.topic, "labels_topic": self.labels_topic,
            "labels_end_offset": self.labels_end_offset,
            "nodes": [{"node": node, "checkpoint": None if c is None else {
                "labels": c.labels, "labels_offset": c.labels_offset, "fingerprint": c.fingerprint,
                "source": c.source, "created_at": _when(c.created_at_ms), "bytes": len(c.state),
                "topic_offset": c.offset}, "labels_after_checkpoint": self.labels_after.get(node, 0)}
                for node, c in self._rows()],
            "worker": {"url": self.worker_url, "answer": self.worker},
        }

    def _rows(self) -> list[tuple[str, Checkpoint | None]]:
        nodes = sorted(set(self.checkpoints) | set(self.labels_after))
        return [(node, self.checkpoints.get(node)) for node in nodes]

    def lines(self) -> list[str]:
        out = [f"model checkpoints ({self.topic}):"]
        rows = [("NODE", "LABELS", "LABELS OFFSET", "FINGERPRINT", "SOURCE", "CREATED (UTC)", "SIZE",
                 "LABELS AFTER")]
        for node, c in self._rows():
            after = str(self.labels_after.get(node, 0))
            if c is None:
                rows.append((node, "-", "-", "-", "none", "-", "-", after))
            else:
                rows.append((node, str(c.labels), str(c.labels_offset), c.fingerprint, c.source,
                             _when(c.created_at_ms), _size(len(c.state)), after))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        out += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        for node, c in self._rows():
            if c is None:
                out.append(f"  {node}: no checkpoint: a worker starts from the prior and replays every label "
                           f"({self.labels_after.get(node, 0)})")
        out.append(f"labels topic {self.labels_topic}: end offset {self.labels_end_offset}; LABELS AFTER = the "
                   "node's labels after its checkpoint's offset (what a restarting worker replays)")
        if self.worker is None:
            out.append(f"worker: none answers on {self.worker_url}")
        else:
            w = self.worker
            node = str(w.get("node", DEFAULT_NODE))
            line = (f"worker ({self.worker_url}): node {node}, version {w.get('version')}, fingerprint "
                    f"{w.get('fingerprint')}, {w.get('labels')} labels (offset {w.get('labels_offset')})")
            checkpoint = self.checkpoints.get(node)
            if checkpoint is not None and w.get("fingerprint") == checkpoint.fingerprint:
                line += "; the same model as the checkpoint"
            elif checkpoint is not None and isinstance(w.get("labels"), int):
                line += f"; {w['labels'] - checkpoint.labels:+d} labels against the checkpoint"
            out.append(line)
        return out


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MiB"


def model_status(settings: Settings, nodes: tuple[str, ...] = (DEFAULT_NODE,)) -> ModelStatus:
    source = schema_source(settings.schema_registry_url)
    checkpoints = read_checkpoints(settings, source)
    offsets = {node: -1 for node in nodes}
    offsets.update({node: c.labels_offset for node, c in checkpoints.items()})
    return ModelStatus(checkpoints, labels_end_offset(settings), dict(labels_after(settings, source, offsets)),
                       worker_model(settings), worker_url(settings), topics.MODEL_CHECKPOINTS.full_name(settings),
                       topics.LABELS.full_name(settings))


def export_model(settings: Settings, path: Path, node: str = DEFAULT_NODE, force: bool = False) -> Checkpoint:
    """Write the newest checkpoint's learner bytes of ``node`` to ``path``."""
    if path.exists() and not force:
        raise ValueError(f"{path} exists; use --force to overwrite it")
    try:
        checkpoint = latest_checkpoint(settings, schema_source(settings.schema_registry_url), node)
    except Exception as exc:
        raise _kafka_error(settings, f"reading {topics.MODEL_CHECKPOINTS.full_name(settings)}", exc) from exc
    if checkpoint is None:
        raise ValueError(f"no checkpoint of node {node!r} on {topics.MODEL_CHECKPOINTS.full_name(settings)}: "
                         "nothing to export (workers write one every LOTFLOW_MODEL_CHECKPOINT_EVERY labels; "
                         "lotflow train writes one)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(checkpoint.state)
    return checkpoint


def load_learner(path: Path) -> Learner:
    """The learner in ``path``, or a ValueError saying why it is not one."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    data = path.read_bytes()
    try:
        learner = Learner.from_bytes(data)
    except Exception as exc:  # unpickling garbage raises anything
        raise ValueError(f"{path} is not a lotflow learner ({type(exc).__name__}: {exc})") from exc
    if not isinstance(learner, Learner):  # pragma: no cover - from_bytes builds one
        raise ValueError(f"{path} is not a lotflow learner")
    return learner


def import_model(settings: Settings, path: Path, node: str = DEFAULT_NODE, replay_all: bool = False) -> Learner:
    """Write the learner in ``path`` as ``node``'s newest checkpoint (source ``import``)."""
    learner = load_learner(path)
    if replay_all:
        learner.labels_offset = -1
    try:
        write_checkpoint(settings, schema_source(settings.schema_registry_url), node, learner, "import")
    except Exception as exc:
        raise _kafka_error(settings, f"writing to {topics.MODEL_CHECKPOINTS.full_name(settings)}", exc) from exc
    return learner


def run_model(settings: Settings, action: str, *, node: str = DEFAULT_NODE, path: Path | None = None,
              force: bool = False, replay_all: bool = False, as_json: bool = False, say: Say = print) -> int:
    """``lotflow model ACTION``: returns the exit code."""
    if action == "status":
        status = model_status(settings, (node,))
        if as_json:
            say(json.dumps(status.to_json(), indent=2))
        else:
            for line in status.lines():
                say(line)
        return 0
    assert path is not None
    if action == "export":
        c = export_model(settings, path, node, force)
        say(f"checkpoint of node {node} written to {path} ({_size(len(c.state))}): {c.labels} labels, labels "
            f"offset {c.labels_offset}, fingerprint {c.fingerprint}, source {c.source}, "
            f"created {_when(c.created_at_ms)}")
        return 0
    learner = import_model(settings, path, node, replay_all)
    end = labels_end_offset(settings)
    offset = learner.labels_offset
    say(f"{path} imported as the newest checkpoint of node {node} (source import): {learner.n_labels} labels, "
        f"fingerprint {learner.fingerprint()}, labels offset {offset}")
    replay = "every label on the labels topic" if offset < 0 else f"the labels after offset {offset}"
    say(f"workers load it when they (re)start, then replay {replay} (the labels topic ends at offset {end}); "
        "running workers keep their model until restarted")
    if offset >= 0 and offset >= end:
        say(f"warning: its labels offset {offset} is at or past the end of this cluster's labels topic ({end}): "
            f"workers will skip the labels up to offset {offset}. If it was trained elsewhere, import it with "
            "--replay-all")
    return 0
