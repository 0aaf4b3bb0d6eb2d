"""One frozen settings object, read once from ``LOTFLOW_*`` environment variables.

Secrets (the ClickHouse DSN may carry a password) are ``SecretStr`` so they never
appear in logs or reprs.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOTFLOW_", frozen=True, extra="ignore",
                                      hide_input_in_errors=True)  # errors never echo a password

    # --- Kafka -----------------------------------------------------------------
    bootstrap_servers: str = "127.0.0.1:9092"
    schema_registry_url: str | None = None
    topic_prefix: str = Field(default="", description="prepended to every topic name")
    partitions: int = Field(default=4, ge=1, description="partitions of every co-partitioned topic")
    replication_factor: int = Field(default=1, ge=1)
    app_id: str = "lotflow-receiving"

    # --- Kafka security -------------------------------------------------------------
    # Every Kafka client (librdkafka producers/consumers/admin, Faust) takes these through
    # lotflow.kafka_clients. Passwords are SecretStr: never in a repr or a log line.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = Field(default=None, description="CA bundle (PEM) to verify the brokers")
    kafka_ssl_certfile: Path | None = Field(default=None, description="client certificate (PEM), for mutual TLS")
    kafka_ssl_keyfile: Path | None = Field(default=None, description="client private key (PEM), for mutual TLS")
    kafka_ssl_key_password: SecretStr | None = None
    # lotflow kafka start only: also open a SASL_PLAINTEXT listener on this port (0: none),
    # serving PLAIN and SCRAM-SHA-256 for the user kafka_sasl_username / kafka_sasl_password.
    kafka_sasl_port: int = Field(default=0, ge=0, le=65535)

    # --- local broker (lotflow kafka start) ------------------------------------
    var_dir: Path = Path("var")
    kafka_port: int = 9092
    zookeeper_port: int = 2181
    kafka_heap: str = "512m"

    # --- ClickHouse ----------------------------------------------------------------
    # None: the embedded engine on disk under var_dir. Else chdb:///abs/path or http(s)://user:pw@host:port
    clickhouse_dsn: SecretStr | None = None
    clickhouse_database: str = "lotflow"

    # --- receiving node ------------------------------------------------------------
    receiving_verify_threshold: float = Field(default=0.90, ge=0, le=1)
    receiving_high_priority_threshold: float = Field(default=0.75, ge=0, le=1)
    document_wait_s: float = Field(default=3600.0, gt=0, description="how long a receipt waits for its PO/spec/CoA")
    quantity_tolerance_pct: float = Field(default=2.0, ge=0)
    price_tolerance_pct: float = Field(default=15.0, ge=0)
    spot_check_share: float = Field(default=0.02, ge=0, le=1, description="share of would-be-verified receipts "
                                                                        "sent to a person as SPOT_CHECK")
    soft_accepts_needed: int = Field(default=3, ge=1, description="consistent accepts of a vendor x material x "
                                                                  "soft reason without a size before the model may "
                                                                  "verify it")
    soft_graded_accepts: int = Field(default=2, ge=1, description="accepts at least as large before a size of a "
                                     "graded soft reason (an over-delivery of 3.4 %) may be verified, plus one per "
                                     "reject at most as large (among the pattern's last 30 decisions)")
    soft_graded_uncontested_accepts: int = Field(default=1, ge=1, description="the same (at most "
                                                 "soft_graded_accepts) where no reject lies above the size up to "
                                                 "the largest of those accepts and the pattern's last 30 decisions "
                                                 "hold soft_graded_accepts accepts of any size")
    label_error_rate: float = Field(default=0.0, ge=0, lt=0.5, description="share of people's decisions "
                                    "that are wrong (attribute agreement study); the calibration corrects for it")
    model_checkpoint_every: int = Field(default=200, ge=1, description="labels between model checkpoints")
    po_state_retention_s: float = Field(default=30 * 86400.0, gt=0, description="forget a PO idle this long")

    # --- worker hot path -------------------------------------------------------
    batch_size: int = Field(default=2000, ge=1)
    batch_within_s: float = Field(default=0.05, gt=0)
    max_poll_records: int = Field(default=20000, ge=1)
    sweep_interval_s: float = Field(default=1.0, gt=0)
    worker_web_port: int = 6066
    worker_web_host: str = "127.0.0.1"
    max_message_bytes: int = Field(default=1_000_000, ge=10_000,
                                   description="largest output/state record; the broker's message.max.bytes")
    transaction_timeout_s: float = Field(default=10.0, gt=0, description="a dead worker's open transaction "
                                                                         "blocks read_committed readers this long")
    commit_max_backoff_s: float = Field(default=5.0, gt=0, description="longest pause between commit retries")
    stall_timeout_s: float = Field(default=60.0, gt=0, description="/healthz fails when input waits and no "
                                                                  "batch completed for this long")
    worker_instance_id: str | None = Field(default=None, description="static group membership id and "
                                           "transactional id; stable per worker (pod name); unset: host+port")
    session_timeout_s: float = Field(default=10.0, gt=0, description="consumer group session timeout")
    fault_inject: str | None = Field(default=None, description="testing only: POINT[:N] kills the worker at "
                                     "the Nth batch reaching after_produce|before_commit|after_commit")
    fault_seek_delay_s: float = Field(default=0.0, ge=0, le=30, description="testing only: delay before the "
                                      "seek to the committed offsets when input partitions are resumed")

    # --- sink -----------------------------------------------------------------------
    sink_group: str = "lotflow-clickhouse-sink"
    sink_batch_rows: int = Field(default=50000, ge=1)  # per insert: the embedded engine pays ~0.2 s per insert (bench)
    sink_batch_s: float = Field(default=0.5, gt=0)
    sink_metrics_port: int = 9108
    sink_metrics_host: str = "127.0.0.1"
    sink_max_retry_s: float = Field(default=30.0, gt=0)

    # --- review service -------------------------------------------------------------
    review_users_file: Path | None = Field(default=None, description="users, roles and API-token digests of "
                                           "the review service (JSON); unset: var_dir/review-users.json")
    review_host: str = Field(default="127.0.0.1", description="address the review service listens on")
    review_port: int = Field(default=8700, ge=1, le=65535)
    review_secure_cookies: bool = Field(default=False, description="mark session cookies Secure: set it when a "
                                        "TLS-terminating proxy serves the review service")

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        needs_credentials = self.kafka_security_protocol.startswith("SASL_") or self.kafka_sasl_port > 0
        if needs_credentials and (not self.kafka_sasl_username or self.kafka_sasl_password is None):
            why = (f"LOTFLOW_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol}"
                   if self.kafka_security_protocol.startswith("SASL_") else "LOTFLOW_KAFKA_SASL_PORT > 0")
            raise ValueError(f"{why} needs LOTFLOW_KAFKA_SASL_USERNAME and LOTFLOW_KAFKA_SASL_PASSWORD")
        if (self.kafka_ssl_certfile is None) != (self.kafka_ssl_keyfile is None):
            raise ValueError("LOTFLOW_KAFKA_SSL_CERTFILE and LOTFLOW_KAFKA_SSL_KEYFILE go together (mutual TLS)")
        if self.soft_graded_uncontested_accepts > self.soft_graded_accepts:
            raise ValueError("LOTFLOW_SOFT_GRADED_UNCONTESTED_ACCEPTS must be at most LOTFLOW_SOFT_GRADED_ACCEPTS "
                             f"({self.soft_graded_uncontested_accepts} > {self.soft_graded_accepts}): more would "
                             "make a reject clear what its absence did not")
        return self

    def to_env(self) -> dict[str, str]:
        """These settings as ``LOTFLOW_*`` variables, for a child process (worker, sink)."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, Path):
                value = value.resolve()
            env[f"LOTFLOW_{name.upper()}"] = str(value)
        return env

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def clickhouse_url(self) -> str:
        if self.clickhouse_dsn is None:
            return f"chdb://{(self.var_dir / 'clickhouse').resolve()}"
        return self.clickhouse_dsn.get_secret_value()

    @property
    def users_file(self) -> Path:
        return self.review_users_file or self.var_dir / "review-users.json"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
