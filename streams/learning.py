"""A node's learner, kept up to date from the labels topic and checkpointed to a compacted topic.

On start a worker loads the node's newest checkpoint (``lotflow.model-checkpoints``, key =
node), then replays the labels after it (``lotflow.labels``, one partition, read
``read_committed``) before its agents handle a record; afterwards it follows the labels
before every batch. Every replica reads the same labels in the same order, so every replica
holds the same model. Every ``model_checkpoint_every`` labels a replica writes a checkpoint;
replicas write identical ones, and compaction keeps the newest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from lotflow.kafka_clients import client_config, producer_config
from lotflow.metrics import WorkerMetrics
from lotflow.schemas.serde import AvroCodec, SchemaSource
from lotflow.scorers.learner import Label, Learner, LearnerConfig
from lotflow.settings import Settings
from lotflow.streams import topics

__all__ = ["Checkpoint", "ModelFeed", "latest_checkpoint", "model_consumer", "publish_quality", "read_checkpoints",
           "read_to_end", "topic_codec", "write_checkpoint"]

log = logging.getLogger(__name__)
CATCH_UP_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Checkpoint:
    node: str
    labels_offset: int
    labels: int
    fingerprint: str
    source: str
    created_at_ms: int
    state: bytes
    offset: int  # on the checkpoints topic

    def learner(self, config: LearnerConfig | None = None) -> Learner:
        learner = Learner.from_bytes(self.state)
        if config is not None:  # the settings of the process win over those it was saved with
            learner.config = replace(config)
        return learner


def topic_codec(settings: Settings, source: SchemaSource, spec: topics.TopicSpec) -> AvroCodec:
    name = spec.full_name(settings)
    return AvroCodec(source, f"{name}-value", spec.schema, epoch_millis=True)


def model_consumer(settings: Settings) -> Consumer:
    return Consumer(client_config(settings, **{
        "group.id": f"{settings.app_id}-model-unused",  # required by librdkafka; never committed
        "enable.auto.commit": False, "enable.partition.eof": False, "fetch.wait.max.ms": 50,
        "isolation.level": "read_committed"}))


def read_to_end(consumer: Consumer, topic: str, start: int, timeout_s: float) -> Iterator[Any]:
    """Every committed record of partition 0 of ``topic`` from ``start`` to its end as of now."""
    tp = TopicPartition(topic, 0, start if start >= 0 else OFFSET_BEGINNING)
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
    except KafkaException as exc:
        raise RuntimeError(f"cannot read {topic}: {exc} (were the topics created? `lotflow topics create` "
                           "creates the labels and checkpoint topics of this release)") from exc
    consumer.assign([tp])
    deadline = time.monotonic() + timeout_s
    if high <= max(start, 0):
        return
    while time.monotonic() < deadline:
        for msg in consumer.consume(1000, timeout=0.2):
            error = msg.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("reading %s: %s", topic, error)
                continue
            yield msg
        [position] = consumer.position([TopicPartition(topic, 0)])
        if position.offset >= high:  # past the end as it was (control records included)
            return
    log.warning("%s: not read to its end (%d) within %.0fs; going on with what was read", topic, high, timeout_s)


def read_checkpoints(settings: Settings, source: SchemaSource, consumer: Consumer | None = None,
                     timeout_s: float = 60.0) -> dict[str, Checkpoint]:
    """The newest checkpoint of every node on the checkpoints topic (a tombstone removes a node's)."""
    own = consumer is None
    consumer = consumer or model_consumer(settings)
    codec = topic_codec(settings, source, topics.MODEL_CHECKPOINTS)
    found: dict[str, Checkpoint] = {}
    try:
        for msg in read_to_end(consumer, topics.MODEL_CHECKPOINTS.full_name(settings), -1, timeout_s):
            if msg.value() is None:
                found.pop((msg.key() or b"").decode(), None)
                continue
            r = codec.decode(msg.value())
            found[r["node"]] = Checkpoint(r["node"], r["labels_offset"], r["labels"], r["fingerprint"], r["source"],
                                          r["created_at"], r["state"], msg.offset())
    finally:
        if own:
            consumer.close()
    return found


def latest_checkpoint(settings: Settings, source: SchemaSource, node: str,
                      consumer: Consumer | None = None) -> Checkpoint | None:
    """The newest checkpoint of ``node`` (None: none yet)."""
    return read_checkpoints(settings, source, consumer).get(node)


def write_checkpoint(settings: Settings, source: SchemaSource, node: str, learner: Learner, origin: str,
                     producer: Producer | None = None) -> None:
    """Write ``learner`` as ``node``'s newest checkpoint (``origin``: worker, train or import)."""
    codec = topic_codec(settings, source, topics.MODEL_CHECKPOINTS)
    value = codec.encode({"node": node, "labels_offset": learner.labels_offset, "labels": learner.n_labels,
                          "fingerprint": learner.fingerprint(), "source": origin,
                          "created_at": int(time.time() * 1000), "state": learner.to_bytes()})
    own = producer is None
    producer = producer or Producer(producer_config(settings, **{"message.max.bytes": settings.max_message_bytes}))
    producer.produce(topics.MODEL_CHECKPOINTS.full_name(settings), value=value, key=node.encode(), partition=0)
    if own:
        if producer.flush(30) != 0:
            raise RuntimeError("the checkpoint was not acknowledged within 30s")
    else:
        producer.poll(0)


class ModelFeed:
    """The worker's side: restore, replay, follow, checkpoint."""

    def __init__(self, settings: Settings, source: SchemaSource, node: str, config: LearnerConfig) -> None:
        self.settings = settings
        self.source = source
        self.node = node
        self.config = config
        self.labels_topic = topics.LABELS.full_name(settings)
        self._labels = topic_codec(settings, source, topics.LABELS)
        self._consumer = model_consumer(settings)
        self._producer: Producer | None = None
        self._checkpointed_at = 0
        self.restored_from: Checkpoint | None = None

    def restore(self) -> Learner:
        """The newest checkpoint (or a new learner), brought up to date with the labels after it."""
        checkpoint = latest_checkpoint(self.settings, self.source, self.node, self._consumer)
        learner = checkpoint.learner(self.config) if checkpoint is not None else Learner(self.config)
        self.restored_from = checkpoint
        started = time.monotonic()
        replayed = 0
        for msg in read_to_end(self._consumer, self.labels_topic, learner.labels_offset + 1, CATCH_UP_TIMEOUT_S):
            replayed += self._apply(learner, msg)
        self._checkpointed_at = learner.n_labels
        origin = f"checkpoint of {checkpoint.labels} labels ({checkpoint.source})" if checkpoint else "no checkpoint"
        log.warning("model %s: %s, %d labels replayed in %.1fs; version %s, fingerprint %s", self.node, origin,
                    replayed, time.monotonic() - started, learner.version, learner.fingerprint())
        return learner

    def _apply(self, learner: Learner, msg: Any) -> int:
        if msg.value() is None:
            return 0
        try:
            record = self._labels.decode(msg.value())
        except Exception as exc:  # a label nobody can read teaches nothing; every replica skips it alike
            log.warning("label at offset %d unreadable, skipped: %s", msg.offset(), exc)
            return 0
        if record["node"] != self.node:
            return 0
        learner.learn(Label.from_record(record), msg.offset())
        return 1

    def poll(self, learner: Learner, max_messages: int = 1000) -> int:
        """Apply the labels committed since the last poll; never blocks. Checkpoints when due."""
        applied = 0
        for msg in self._consumer.consume(max_messages, timeout=0):
            if not msg.error():
                applied += self._apply(learner, msg)
        if learner.n_labels - self._checkpointed_at >= self.settings.model_checkpoint_every:
            self.checkpoint(learner)
        return applied

    def checkpoint(self, learner: Learner) -> None:
        """Write a checkpoint; a failure is logged, not raised: the labels topic keeps every label, so a
        missing checkpoint costs a longer replay at the next start, never a decision."""
        self._checkpointed_at = learner.n_labels  # the next attempt comes after as many labels again
        try:
            if self._producer is None:
                self._producer = Producer(producer_config(self.settings,
                                                          **{"message.max.bytes": self.settings.max_message_bytes}))
            write_checkpoint(self.settings, self.source, self.node, learner, "worker", self._producer)
        except Exception as exc:
            log.error("model %s: checkpoint at %d labels not written: %s", self.node, learner.n_labels, exc)

    def close(self) -> None:
        self._consumer.close()
        if self._producer is not None:
            self._producer.flush(10)


def publish_quality(learner: Learner, metrics: WorkerMetrics, node: str) -> None:
    """The learner's labels, calibration and spot-check precision on /metrics."""
    quality = learner.quality()
    metrics.model_labels.labels(node).set(quality.labels)
    metrics.model_ece.labels(node, "all_labels").set(quality.ece_all)
    metrics.model_ece.labels(node, "spot_checks").set(quality.ece_spot)
    for b in quality.bins:
        bin_name = f"{b.low:.1f}-{b.high:.1f}"
        metrics.model_reliability.labels(node, bin_name, "mean_confidence").set(b.mean_confidence)
        metrics.model_reliability.labels(node, bin_name, "observed_rate").set(b.observed_rate)
        metrics.model_reliability.labels(node, bin_name, "count").set(b.count)
    low, high = quality.spot_interval
    metrics.spot_check_precision.labels(node, "estimate").set(quality.spot_precision)
    metrics.spot_check_precision.labels(node, "wilson_low").set(low)
    metrics.spot_check_precision.labels(node, "wilson_high").set(high)
    metrics.spot_checks.labels(node).set(quality.spot_checks)
    metrics.drifted_vendors.labels(node).set(quality.tightened_vendors)
    metrics.drift_events.labels(node).set(quality.drift_events)
