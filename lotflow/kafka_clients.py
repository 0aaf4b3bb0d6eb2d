"""Every Kafka client's configuration, and the one produce loop, in one place.

* :func:`client_config` — librdkafka settings (bootstrap servers + security) for any
  ``Producer`` / ``Consumer`` / ``AdminClient``; :func:`producer_config` adds the project's
  producer settings (``murmur2_random`` partitioner, idempotence, lz4).
* :func:`faust_broker_credentials` — the same security settings for Faust (aiokafka).
* :func:`produce` — produce with back-pressure: while librdkafka's local queue is full,
  serve delivery reports and try again.
* :class:`RedeliveringProducer` — for non-transactional producers (simulator, benchmarks):
  a record whose delivery failed with a transient error (broker restarting, leader moving,
  message timed out) is produced again with back-off, so a broker restart loses nothing.
* :func:`redacted` — a config safe to log.
"""

from __future__ import annotations

import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Producer

from lotflow.settings import Settings

__all__ = [
    "REDELIVERABLE_ERRORS",
    "ProducerLike",
    "RedeliveringProducer",
    "client_config",
    "faust_broker_credentials",
    "is_redeliverable",
    "produce",
    "producer_config",
    "redacted",
]

DeliveryCallback = Callable[[Any, Any], None]
SECRET_KEYS = frozenset({
    "sasl.password", "ssl.key.password", "ssl.keystore.password", "sasl.oauthbearer.client.secret",
})


def client_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """librdkafka configuration for any client: bootstrap servers, security, then ``overrides``.

    Only the settings that are set appear (no ``None`` values). Keys with dots can be passed
    as ``**{"group.id": ...}``.
    """
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "security.protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol.startswith("SASL_"):
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism
        if settings.kafka_sasl_username is not None:
            config["sasl.username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            config["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        if settings.kafka_ssl_cafile is not None:
            config["ssl.ca.location"] = str(settings.kafka_ssl_cafile)
        if settings.kafka_ssl_certfile is not None:
            config["ssl.certificate.location"] = str(settings.kafka_ssl_certfile)
        if settings.kafka_ssl_keyfile is not None:
            config["ssl.key.location"] = str(settings.kafka_ssl_keyfile)
        if settings.kafka_ssl_key_password is not None:
            config["ssl.key.password"] = settings.kafka_ssl_key_password.get_secret_value()
    config.update(overrides)
    return config


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """:func:`client_config` plus the project's producer settings, then ``overrides``."""
    config = client_config(settings)
    config.update({
        # Java clients, aiokafka and Faust hash keys with murmur2; librdkafka's default (CRC32)
        # would put the same key on another partition and break co-partitioned joins.
        "partitioner": "murmur2_random",
        "enable.idempotence": True,
        "linger.ms": 2,
        "batch.num.messages": 10000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 500000,
    })
    config.update(overrides)
    return config


def redacted(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with passwords replaced by ``"***"``: safe to log."""
    return {k: ("***" if k in SECRET_KEYS and v is not None else v) for k, v in config.items()}


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    cafile = str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile is not None else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    if settings.kafka_ssl_certfile is not None:
        password = settings.kafka_ssl_key_password
        context.load_cert_chain(
            str(settings.kafka_ssl_certfile),
            str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile is not None else None,
            password.get_secret_value() if password is not None else None,
        )
    return context


def faust_broker_credentials(settings: Settings) -> Any | None:
    """Faust's ``broker_credentials`` for these settings; ``None`` for PLAINTEXT.

    SASL_* gives ``faust.SASLCredentials`` (with an ``ssl.SSLContext`` for SASL_SSL), SSL gives
    ``faust.SSLCredentials``. Pass it as ``faust.App(..., broker_credentials=...)``.
    """
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    import faust

    if protocol == "SSL":
        return faust.SSLCredentials(_ssl_context(settings))
    password = settings.kafka_sasl_password
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=password.get_secret_value() if password is not None else None,
        mechanism=settings.kafka_sasl_mechanism,
        ssl_context=_ssl_context(settings) if protocol == "SASL_SSL" else None,
    )


class ProducerLike(Protocol):
    """The part of ``confluent_kafka.Producer`` used here (tests pass fakes)."""

    @property
    def produce(self) -> Callable[..., None]: ...  # produce(topic, *, key, value, partition, on_delivery)

    def poll(self, timeout: float = ...) -> int: ...

    def flush(self, timeout: float = ...) -> int: ...

    def __len__(self) -> int: ...


def produce(producer: ProducerLike, topic: str, key: bytes | None, value: bytes | None, *,
            partition: int | None = None, on_delivery: Callable[..., None] | None = None) -> None:
    """``producer.produce`` with back-pressure: while the local queue is full, serve delivery
    reports for 50 ms and try again (never drops, never raises ``BufferError``)."""
    kwargs: dict[str, Any] = {"key": key, "value": value}
    if partition is not None:
        kwargs["partition"] = partition
    if on_delivery is not None:
        kwargs["on_delivery"] = on_delivery
    while True:
        try:
            producer.produce(topic, **kwargs)
            return
        except BufferError:  # local queue full: let deliveries drain
            producer.poll(0.05)


# Delivery errors after which producing the record again is safe and may succeed: the broker
# was unreachable, restarting, or not (yet) the leader; the topic's metadata was not known yet.
REDELIVERABLE_ERRORS = frozenset({
    KafkaError._MSG_TIMED_OUT,
    KafkaError._TIMED_OUT,
    KafkaError._TIMED_OUT_QUEUE,
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._UNKNOWN_PARTITION,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError._QUEUE_FULL,
    KafkaError._NODE_UPDATE,
    KafkaError._WAIT_COORD,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NETWORK_EXCEPTION,
    KafkaError.NOT_ENOUGH_REPLICAS,
    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.BROKER_NOT_AVAILABLE,
    KafkaError.KAFKA_STORAGE_ERROR,
})
# Never redelivered even if flagged retriable: the producer instance is unusable (fatal), the
# application gave up on the record (purged / destroyed), or the record itself is wrong.
_PERMANENT_ERRORS = frozenset({
    KafkaError._FATAL,
    KafkaError._PURGE_QUEUE,
    KafkaError._PURGE_INFLIGHT,
    KafkaError._DESTROY,
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError._INVALID_ARG,
    KafkaError.INVALID_RECORD,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
})


def is_redeliverable(err: KafkaError) -> bool:
    """Whether a record whose delivery failed with ``err`` should be produced again."""
    if err.fatal() or err.code() in _PERMANENT_ERRORS:
        return False
    return err.code() in REDELIVERABLE_ERRORS or bool(err.retriable())


@dataclass(slots=True)
class _Record:
    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None
    on_delivery: DeliveryCallback | None
    attempts: int = 1
    due: float = 0.0


class RedeliveringProducer:
    """A non-transactional librdkafka producer that produces a record again when its delivery
    failed with a transient error (:func:`is_redeliverable`), up to ``max_attempts`` in all.

    librdkafka already retries within ``message.timeout.ms``; this covers what it gives up on
    (a broker restart longer than the timeout, a topic whose metadata is not there yet, ...).
    A redelivered record goes to the same explicit partition if one was given, else the
    partitioner picks again (same key, same partition with ``murmur2_random``). It is produced
    after the records sent since, so per-key order holds only for records never redelivered,
    and a record that timed out in flight may have been written: at-least-once at worst.

    ``on_delivery(err, msg)`` of :meth:`send` is called once per record, with its final
    outcome (``msg`` is None when librdkafka refused to even queue it, e.g. an unknown topic).
    :meth:`send` does not raise for a record: failures are counted, and :meth:`flush` raises.
    Not for transactional producers (a transaction aborts as a whole instead).
    """

    def __init__(self, config: dict[str, Any], *, max_attempts: int = 20,
                 producer: ProducerLike | None = None,
                 backoff_s: float = 0.1, max_backoff_s: float = 5.0) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if "transactional.id" in config:
            raise ValueError("RedeliveringProducer is for non-transactional producers")
        self._producer: ProducerLike = producer if producer is not None else Producer(config)
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._waiting: deque[_Record] = deque()  # failed transiently, to be produced again
        self._delivered = 0
        self._failed = 0
        self._redelivered = 0
        self.errors: list[str] = []  # the first few permanent failures, for a report

    # --- counters ---------------------------------------------------------------------
    @property
    def delivered(self) -> int:
        return self._delivered

    @property
    def failed(self) -> int:
        """Records that failed permanently (not redeliverable, or ``max_attempts`` used up)."""
        return self._failed

    @property
    def redelivered(self) -> int:
        """Times a record was produced again after a transient failure."""
        return self._redelivered

    @property
    def in_flight(self) -> int:
        """Records in librdkafka's queue plus those waiting to be produced again."""
        return len(self._producer) + len(self._waiting)

    def __len__(self) -> int:
        return self.in_flight

    # --- producing --------------------------------------------------------------------
    def send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None,
             on_delivery: DeliveryCallback | None = None) -> None:
        self._produce(_Record(topic, key, value, partition, on_delivery))

    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery reports (up to ``timeout`` s), then produce due redeliveries."""
        served = self._producer.poll(timeout)
        self._redeliver_due()
        return served

    def flush(self, timeout: float = 120.0, *, raise_on_failure: bool = True) -> None:
        """Wait until every record is delivered or failed for good.

        Raises ``KafkaException`` when records are still in flight after ``timeout`` s, or
        (with ``raise_on_failure``) when any record failed permanently.
        """
        deadline = time.monotonic() + timeout
        while True:
            self._redeliver_due()
            if not self.in_flight:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KafkaException(KafkaError(
                    KafkaError._TIMED_OUT,
                    f"{self.in_flight} records not delivered within {timeout:.0f} s "
                    f"(delivered {self._delivered}, failed {self._failed})"))
            if self._waiting:
                next_due = min(r.due for r in self._waiting)
                self._producer.poll(max(0.0, min(remaining, next_due - time.monotonic(), 0.5)))
            else:
                self._producer.flush(min(remaining, 1.0))
        if raise_on_failure and self._failed:
            first = f", first: {self.errors[0]}" if self.errors else ""
            raise KafkaException(KafkaError(
                KafkaError._FAIL, f"{self._failed} records failed permanently{first}"))

    # --- internals ----------------------------------------------------------------------
    def _produce(self, record: _Record) -> None:
        try:
            produce(self._producer, record.topic, record.key, record.value, partition=record.partition,
                    on_delivery=partial(self._on_delivery, record))
        except KafkaException as exc:
            # Refused before it was queued (e.g. _UNKNOWN_TOPIC once metadata says the topic
            # does not exist): the same outcome as a failed delivery, with no message.
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else KafkaError(
                KafkaError._FAIL, str(exc))
            self._on_delivery(record, err, None)

    def _redeliver_due(self) -> None:
        if not self._waiting:
            return
        now = time.monotonic()
        waiting, self._waiting = self._waiting, deque()
        for record in waiting:
            if record.due <= now:
                self._redelivered += 1
                self._produce(record)
            else:
                self._waiting.append(record)

    def _on_delivery(self, record: _Record, err: Any, msg: Any) -> None:
        if err is None:
            self._delivered += 1
        elif isinstance(err, KafkaError) and is_redeliverable(err) and record.attempts < self._max_attempts:
            delay = min(self._backoff_s * 2 ** (record.attempts - 1), self._max_backoff_s)
            record.attempts += 1
            record.due = time.monotonic() + delay
            self._waiting.append(record)
            return  # not final: the caller's callback waits for the outcome
        else:
            self._failed += 1
            if len(self.errors) < 10:
                self.errors.append(f"{record.topic}: {err} (after {record.attempts} attempts)")
        if record.on_delivery is not None:
            record.on_delivery(err, msg)
