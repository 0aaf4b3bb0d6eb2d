"""Real-infrastructure fixtures: one Kafka broker per test session, fresh topics per test.

If a broker already answers on ``LOTFLOW_KAFKA_PORT`` (default 9092) it is used. Otherwise a
broker is started under ``var/test-kafka`` on ports 9192/2281 (so it never collides with
the demo's) and stopped when the session ends. Nothing here is mocked.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from lotflow import localkafka
from lotflow.admin import create_topics, delete_topics_with_prefix
from lotflow.settings import Settings
from lotflow.streams.topics import TOPICS, TopicSpec

from .pipeline import WorkerProcess

HERE = Path(__file__).resolve().parent
PROJECT_ROOT = HERE.parents[1]
TEST_VAR_DIR = PROJECT_ROOT / "var" / "test-kafka"
TEST_KAFKA_PORT = 9192
TEST_ZOOKEEPER_PORT = 2281

TopicSetFactory = Callable[..., Settings]
# The embedded engine allows one path per process: every test in the session shares this one,
# each with a database of its own.
# LOTFLOW_TEST_CLICKHOUSE_DIR lets concurrent test sessions use engines of their own.
CLICKHOUSE_DIR = Path(os.environ.get("LOTFLOW_TEST_CLICKHOUSE_DIR", PROJECT_ROOT / "var" / "test-clickhouse"))


@pytest.fixture(scope="session")
def clickhouse_dsn() -> SecretStr:
    CLICKHOUSE_DIR.mkdir(parents=True, exist_ok=True)
    return SecretStr(f"chdb://{CLICKHOUSE_DIR}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/integration is an ``integration`` test."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def kafka_settings() -> Iterator[Settings]:
    """Settings pointing at a live broker for the whole session."""
    base = Settings()
    if localkafka.broker_answers(base.kafka_port):
        yield base.model_copy(update={"bootstrap_servers": f"127.0.0.1:{base.kafka_port}"})
        return
    settings = base.model_copy(
        update={
            "var_dir": TEST_VAR_DIR,
            "kafka_port": TEST_KAFKA_PORT,
            "zookeeper_port": TEST_ZOOKEEPER_PORT,
            "bootstrap_servers": f"127.0.0.1:{TEST_KAFKA_PORT}",
        }
    )
    localkafka.start(settings)
    try:
        yield settings
    finally:
        localkafka.stop(settings)  # only what var/test-kafka's pid files record


@pytest.fixture
def topic_set(kafka_settings: Settings) -> Iterator[TopicSetFactory]:
    """Factory: ``topic_set(specs=TOPICS, *, create=True, **settings_overrides) -> Settings``.

    Each call returns a copy of ``kafka_settings`` with a fresh ``topic_prefix`` (``t<8 hex>.``),
    ``app_id`` and ``sink_group``, and (unless ``create=False``) the given topics created.
    Every topic under those prefixes is deleted at teardown (best effort).
    """
    made: list[Settings] = []

    def make(
        specs: Iterable[TopicSpec] = TOPICS, *, create: bool = True, **update: Any
    ) -> Settings:
        tag = uuid.uuid4().hex[:8]
        fields: dict[str, Any] = {
            "topic_prefix": f"t{tag}.",
            "app_id": f"lotflow-test-{tag}",
            "sink_group": f"lotflow-sink-test-{tag}",
            "spot_check_share": 0.0,  # exact counts of exceptions; the learning tests turn them on
            **update,
        }
        settings = kafka_settings.model_copy(update=fields)
        made.append(settings)
        if create:
            create_topics(settings, specs)
        return settings

    yield make

    for settings in made:
        try:
            delete_topics_with_prefix(settings, settings.topic_prefix, timeout=30)
        except Exception as exc:  # teardown must not mask the test's own result
            warnings.warn(
                f"could not delete topics {settings.topic_prefix}*: {exc!r}", stacklevel=1
            )


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Worker processes a test starts (append them): stopped at teardown."""
    started: list[WorkerProcess] = []
    yield started
    for w in started:
        w.stop()
