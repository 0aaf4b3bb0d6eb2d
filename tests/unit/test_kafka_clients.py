"""lotflow.kafka_clients without a broker: configs, validation, redaction, the produce loop and
RedeliveringProducer's classification (the broker-backed half is in tests/integration)."""

from __future__ import annotations

import logging
import ssl
from collections import deque
from pathlib import Path
from typing import Any

import faust
import pytest
from confluent_kafka import KafkaError, KafkaException
from pydantic import SecretStr, ValidationError

from lotflow.kafka_clients import (
    RedeliveringProducer,
    client_config,
    faust_broker_credentials,
    is_redeliverable,
    produce,
    producer_config,
    redacted,
)
from lotflow.settings import Settings

SECRET = "s3cr3t-Pa55"


def sasl(**extra: Any) -> Settings:
    return Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_mechanism="SCRAM-SHA-256",
                    kafka_sasl_username="lotflow", kafka_sasl_password=SecretStr(SECRET), **extra)


# --- configuration -----------------------------------------------------------------------------


def test_plaintext_config_has_only_servers_and_protocol() -> None:
    assert client_config(Settings(bootstrap_servers="k1:9092,k2:9092")) == {
        "bootstrap.servers": "k1:9092,k2:9092", "security.protocol": "PLAINTEXT"}


def test_sasl_config_and_overrides() -> None:
    config = client_config(sasl(), **{"group.id": "g", "security.protocol": "SASL_PLAINTEXT"})
    assert config == {
        "bootstrap.servers": "127.0.0.1:9092", "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-256", "sasl.username": "lotflow", "sasl.password": SECRET,
        "group.id": "g",
    }


def test_ssl_config_only_keys_that_are_set(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    config = client_config(Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=ca))
    assert config == {"bootstrap.servers": "127.0.0.1:9092", "security.protocol": "SSL", "ssl.ca.location": str(ca)}
    mtls = client_config(Settings(
        kafka_security_protocol="SASL_SSL", kafka_sasl_username="u", kafka_sasl_password=SecretStr("p"),
        kafka_ssl_cafile=ca, kafka_ssl_certfile=tmp_path / "c.pem", kafka_ssl_keyfile=tmp_path / "k.pem",
        kafka_ssl_key_password=SecretStr("kp")))
    assert mtls["ssl.certificate.location"] == str(tmp_path / "c.pem")
    assert mtls["ssl.key.location"] == str(tmp_path / "k.pem")
    assert mtls["ssl.key.password"] == "kp" and mtls["sasl.password"] == "p"
    assert mtls["sasl.mechanism"] == "PLAIN"


def test_ssl_files_are_ignored_without_ssl(tmp_path: Path) -> None:
    config = client_config(sasl(kafka_ssl_cafile=tmp_path / "ca.pem"))
    assert "ssl.ca.location" not in config


def test_producer_config_defaults_security_and_overrides() -> None:
    config = producer_config(sasl(), **{"linger.ms": 5})
    assert config["partitioner"] == "murmur2_random"
    assert config["enable.idempotence"] is True
    assert config["compression.type"] == "lz4"
    assert config["batch.num.messages"] == 10000
    assert config["queue.buffering.max.messages"] == 500000
    assert config["linger.ms"] == 5
    assert config["sasl.password"] == SECRET and config["security.protocol"] == "SASL_PLAINTEXT"


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
@pytest.mark.parametrize("given", [{}, {"kafka_sasl_username": "u"}, {"kafka_sasl_password": SECRET},
                                   {"kafka_sasl_username": "", "kafka_sasl_password": SECRET}])
def test_sasl_needs_username_and_password(protocol: str, given: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="needs LOTFLOW_KAFKA_SASL_USERNAME and LOTFLOW_KAFKA_SASL_PASS") as exc:
        Settings.model_validate({"kafka_security_protocol": protocol, **given})
    assert SECRET not in str(exc.value)  # the error never echoes the input


def test_sasl_port_needs_credentials() -> None:
    with pytest.raises(ValidationError, match="LOTFLOW_KAFKA_SASL_PORT"):
        Settings(kafka_sasl_port=9393)
    ok = Settings(kafka_sasl_port=9393, kafka_sasl_username="u", kafka_sasl_password=SecretStr("p"))
    assert ok.kafka_sasl_port == 9393


def test_invalid_protocol_and_mechanism_rejected() -> None:
    with pytest.raises(ValidationError):
        Settings.model_validate({"kafka_security_protocol": "SASL"})
    with pytest.raises(ValidationError):
        Settings.model_validate({"kafka_sasl_mechanism": "GSSAPI"})


def test_client_cert_and_key_go_together(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="go together"):
        Settings(kafka_security_protocol="SSL", kafka_ssl_certfile=tmp_path / "c.pem")


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOTFLOW_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("LOTFLOW_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("LOTFLOW_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("LOTFLOW_KAFKA_SASL_PASSWORD", SECRET)
    settings = Settings()
    assert client_config(settings)["sasl.mechanism"] == "SCRAM-SHA-512"
    env = settings.to_env()  # what a child process (worker, sink) gets
    assert env["LOTFLOW_KAFKA_SASL_PASSWORD"] == SECRET


# --- secrets never shown ---------------------------------------------------------------------


def test_secrets_not_in_repr_or_str(tmp_path: Path) -> None:
    settings = sasl(kafka_ssl_key_password=SecretStr("keypw-XYZ"))
    for text in (repr(settings), str(settings), str(settings.model_dump())):
        assert SECRET not in text and "keypw-XYZ" not in text


def test_redacted() -> None:
    config = client_config(sasl(), **{"ssl.key.password": "keypw-XYZ"})
    shown = redacted(config)
    assert shown["sasl.password"] == "***" and shown["ssl.key.password"] == "***"
    assert shown["sasl.username"] == "lotflow"
    assert SECRET not in repr(shown) and "keypw-XYZ" not in repr(shown)
    assert config["sasl.password"] == SECRET  # the original is untouched
    assert redacted({"bootstrap.servers": "x"}) == {"bootstrap.servers": "x"}


def test_log_lines_carry_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    settings = sasl()
    with caplog.at_level(logging.INFO):
        logging.getLogger("lotflow.test").info("settings %s config %s", settings, redacted(client_config(settings)))
    assert caplog.text and SECRET not in caplog.text


# --- Faust credentials ----------------------------------------------------------------------------


def test_faust_credentials() -> None:
    assert faust_broker_credentials(Settings()) is None
    creds = faust_broker_credentials(sasl())
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.username == "lotflow" and creds.password == SECRET
    assert creds.mechanism.value == "SCRAM-SHA-256" and creds.protocol.value == "SASL_PLAINTEXT"
    assert creds.ssl_context is None
    assert SECRET not in repr(creds)


def test_faust_credentials_with_tls() -> None:
    creds = faust_broker_credentials(Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_username="u",
                                              kafka_sasl_password=SecretStr("p")))
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.protocol.value == "SASL_SSL" and isinstance(creds.ssl_context, ssl.SSLContext)
    assert creds.ssl_context.verify_mode == ssl.CERT_REQUIRED and creds.ssl_context.check_hostname
    tls = faust_broker_credentials(Settings(kafka_security_protocol="SSL"))
    assert isinstance(tls, faust.SSLCredentials) and tls.protocol.value == "SSL"
    assert isinstance(tls.context, ssl.SSLContext)


def test_faust_credentials_missing_cafile_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        faust_broker_credentials(Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=tmp_path / "none.pem"))


# --- produce() and RedeliveringProducer with a scripted producer --------------------------------


class Msg:
    def __init__(self, topic: str, partition: int, key: bytes | None, value: bytes | None) -> None:
        self._t, self._p, self._k, self._v = topic, partition, key, value

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def key(self) -> bytes | None:
        return self._k

    def value(self) -> bytes | None:
        return self._v

    def offset(self) -> int:
        return 0


class ScriptedProducer:
    """Queue-full for the first ``full`` produce calls; then each produce is answered, at the next
    poll, with the next error of ``outcomes`` (None: delivered) or success when they run out."""

    def __init__(self, outcomes: list[KafkaError | None] | None = None, full: int = 0) -> None:
        self.outcomes = deque(outcomes or [])
        self.full = full
        self.queue: list[tuple[Any, Msg, KafkaError | None]] = []
        self.calls: list[dict[str, Any]] = []
        self.polls: list[float] = []

    def produce(self, topic: str, **kwargs: Any) -> None:
        if self.full > 0:
            self.full -= 1
            raise BufferError("Local: Queue full")
        self.calls.append({"topic": topic, **kwargs})
        err = self.outcomes.popleft() if self.outcomes else None
        msg = Msg(topic, kwargs.get("partition", 0), kwargs.get("key"), kwargs.get("value"))
        self.queue.append((kwargs.get("on_delivery"), msg, err))

    def poll(self, timeout: float = 0.0) -> int:
        self.polls.append(timeout)
        served, self.queue = self.queue, []
        for callback, msg, err in served:
            if callback is not None:
                callback(err, msg)
        return len(served)

    def flush(self, timeout: float = 0.0) -> int:
        self.poll(timeout)
        return len(self.queue)

    def __len__(self) -> int:
        return len(self.queue)


def test_produce_waits_while_queue_full() -> None:
    fake = ScriptedProducer(full=3)
    seen: list[Any] = []
    produce(fake, "t", b"k", b"v", on_delivery=lambda err, msg: seen.append(err))
    assert fake.polls == [0.05, 0.05, 0.05]
    assert fake.calls == [{"topic": "t", "key": b"k", "value": b"v", "on_delivery": fake.calls[0]["on_delivery"]}]
    produce(fake, "t", None, None, partition=2)
    assert fake.calls[1] == {"topic": "t", "key": None, "value": None, "partition": 2}
    fake.poll()
    assert seen == [None]


@pytest.mark.parametrize("code", [
    KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
    KafkaError._UNKNOWN_PARTITION, KafkaError._UNKNOWN_TOPIC, KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NOT_ENOUGH_REPLICAS,
])
def test_transient_errors_are_redeliverable(code: int) -> None:
    assert is_redeliverable(KafkaError(code))


@pytest.mark.parametrize("code", [
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError._PURGE_QUEUE,
    KafkaError._INVALID_ARG, KafkaError.INVALID_RECORD,
])
def test_permanent_errors_are_not(code: int) -> None:
    assert not is_redeliverable(KafkaError(code))


def test_fatal_error_is_not_redeliverable() -> None:
    assert not is_redeliverable(KafkaError(KafkaError._MSG_TIMED_OUT, fatal=True))
    assert is_redeliverable(KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, retriable=True)) is True


def test_redelivers_transient_failures_to_the_same_partition() -> None:
    fake = ScriptedProducer([KafkaError(KafkaError._MSG_TIMED_OUT), KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION)])
    outcomes: list[Any] = []
    rp = RedeliveringProducer({}, producer=fake, backoff_s=0.001)
    rp.send("t", b"k", b"v", partition=3, on_delivery=lambda err, msg: outcomes.append((err, msg.partition())))
    rp.send("t", b"k2", b"v2")
    rp.flush(5)
    assert outcomes == [(None, 3)]  # the caller hears the final outcome only
    assert rp.delivered == 2 and rp.failed == 0 and rp.redelivered == 2 and rp.in_flight == 0
    assert [c.get("partition") for c in fake.calls] == [3, None, 3, None]
    assert [c["key"] for c in fake.calls] == [b"k", b"k2", b"k", b"k2"]


def test_permanent_failure_reported_once_and_flush_raises() -> None:
    fake = ScriptedProducer([KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)])
    outcomes: list[Any] = []
    rp = RedeliveringProducer({}, producer=fake)
    rp.send("t", b"big", b"x" * 10, on_delivery=lambda err, msg: outcomes.append(err))
    rp.send("t", b"ok", b"v")
    with pytest.raises(KafkaException, match="1 records failed permanently"):
        rp.flush(5)
    assert len(fake.calls) == 2 and rp.failed == 1 and rp.delivered == 1 and rp.redelivered == 0
    assert outcomes[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
    rp.flush(5, raise_on_failure=False)  # the counts are there to report instead


def test_gives_up_after_max_attempts() -> None:
    fake = ScriptedProducer([KafkaError(KafkaError._TRANSPORT)] * 10)
    rp = RedeliveringProducer({}, producer=fake, max_attempts=3, backoff_s=0.001)
    rp.send("t", b"k", b"v")
    with pytest.raises(KafkaException, match="after 3 attempts"):
        rp.flush(5)
    assert len(fake.calls) == 3 and rp.redelivered == 2 and rp.failed == 1 and rp.delivered == 0


def test_backoff_grows_and_flush_times_out() -> None:
    fake = ScriptedProducer([KafkaError(KafkaError._TRANSPORT)] * 100)
    rp = RedeliveringProducer({}, producer=fake, backoff_s=0.05, max_backoff_s=0.2)
    rp.send("t", b"k", b"v")
    with pytest.raises(KafkaException, match="1 records not delivered within"):
        rp.flush(0.6)
    # 0.05 + 0.1 + 0.2 + 0.2 ... : about 4-5 attempts in 0.6 s, not hundreds
    assert 3 <= len(fake.calls) <= 7


def test_refuses_transactional_config_and_bad_attempts() -> None:
    with pytest.raises(ValueError, match="non-transactional"):
        RedeliveringProducer({"transactional.id": "x"}, producer=ScriptedProducer())
    with pytest.raises(ValueError, match="max_attempts"):
        RedeliveringProducer({}, max_attempts=0, producer=ScriptedProducer())


class RefusingProducer(ScriptedProducer):
    """Refuses to queue (``KafkaException`` from produce) the first ``refuse`` times."""

    def __init__(self, refuse: int, code: int) -> None:
        super().__init__()
        self.refuse, self.code = refuse, code

    def produce(self, topic: str, **kwargs: Any) -> None:
        if self.refuse > 0:
            self.refuse -= 1
            raise KafkaException(KafkaError(self.code))
        super().produce(topic, **kwargs)


def test_refused_before_queueing_is_redelivered_or_counted() -> None:
    fake = RefusingProducer(2, KafkaError._UNKNOWN_TOPIC)
    rp = RedeliveringProducer({}, producer=fake, backoff_s=0.001)
    rp.send("t", b"k", b"v")  # does not raise: the topic may appear
    rp.flush(5)
    assert rp.delivered == 1 and rp.redelivered == 2 and len(fake.calls) == 1

    outcomes: list[Any] = []
    refused = RedeliveringProducer({}, producer=RefusingProducer(1, KafkaError._INVALID_ARG))
    refused.send("t", b"k", b"v", on_delivery=lambda err, msg: outcomes.append((err.code(), msg)))
    assert outcomes == [(KafkaError._INVALID_ARG, None)] and refused.failed == 1
    with pytest.raises(KafkaException, match="failed permanently"):
        refused.flush(5)
