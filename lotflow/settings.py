"""One frozen settings object, read once from ``LOTFLOW_*`` environment variables.

Secrets (the ClickHouse DSN may carry a password) are ``SecretStr`` so they never
appear in logs or reprs.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOTFLOW_", frozen=True, extra="ignore")

    # --- Kafka -----------------------------------------------------------------
    bootstrap_servers: str = "127.0.0.1:9092"
    schema_registry_url: str | None = None
    topic_prefix: str = Field(default="", description="prepended to every topic name")
    partitions: int = Field(default=4, ge=1, description="partitions of every co-partitioned topic")
    replication_factor: int = Field(default=1, ge=1)
    app_id: str = "lotflow-receiving"

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
    min_labels_for_model: int = Field(default=50, ge=1)
    po_state_retention_s: float = Field(default=30 * 86400.0, gt=0, description="forget a PO idle this long")

    # --- worker hot path -------------------------------------------------------
    batch_size: int = Field(default=2000, ge=1)
    batch_within_s: float = Field(default=0.05, gt=0)
    max_poll_records: int = Field(default=20000, ge=1)
    sweep_interval_s: float = Field(default=1.0, gt=0)
    worker_web_port: int = 6066
    worker_web_host: str = "127.0.0.1"

    # --- sink -----------------------------------------------------------------------
    sink_group: str = "lotflow-clickhouse-sink"
    sink_batch_rows: int = Field(default=20000, ge=1)
    sink_batch_s: float = Field(default=0.5, gt=0)
    sink_metrics_port: int = 9108
    sink_metrics_host: str = "127.0.0.1"
    sink_max_retry_s: float = Field(default=30.0, gt=0)

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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
