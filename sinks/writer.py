"""Insert one sealed batch into ClickHouse, retrying until it is accepted.

Each insert of a batch carries the batch's deduplication token (suffixed per target), so a
retried or re-delivered insert is dropped by ClickHouse; an insert the engine accepted is
never sent again on a retry. The fast path (Avro container into ``<table>_avro``, decoded
by ClickHouse) falls back to the Python path after its first failure, so a batch ClickHouse
cannot parse is decoded record by record and its bad records go to ``sink_rejects``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client

from lotflow.metrics import SinkMetrics
from lotflow.sinks.batches import Batch
from lotflow.sinks.retry import Retry
from lotflow.sinks.rows import REJECT_COLUMNS, REJECTS, Row

__all__ = ["BatchWriter"]

log = logging.getLogger(__name__)

# optimize_on_insert=0: do not collapse equal ids inside each inserted block (costs ~40 % of
# an audit insert); the merges and FINAL collapse them anyway.
_INSERT_SETTINGS = {"optimize_on_insert": 0}


class BatchWriter:
    """Runs on the sink's writer thread (one at a time, in order)."""

    def __init__(self, client: Client, database: str, metrics: SinkMetrics, retry: Retry) -> None:
        self._client = client
        self._db = database
        self._metrics = metrics
        self._retry = retry
        self._column_types: dict[str, Sequence[Any]] = {}

    def write(self, batch: Batch) -> bool:
        """Insert ``batch``, retrying with back-off until it succeeds.

        Returns False only when the batch was revoked or the sink stops and gives up.
        """
        table = batch.route.table.table
        attempt = 0
        while not batch.abandoned:
            if self._retry.gave_up():
                return False
            try:
                self._write_once(batch)
                return True
            except Exception as exc:
                self._metrics.errors.labels(table).inc()
                if batch.raw and "avro" not in batch.done:
                    # Let Python find what ClickHouse could not parse; retry at once.
                    log.warning(
                        "sink: Avro insert into %s failed, decoding %d records in Python: %s",
                        table,
                        len(batch.raw),
                        exc,
                    )
                    batch.decode_raw()
                    continue
                delay = self._retry.delay(attempt)
                attempt += 1
                log.warning(
                    "sink: insert into %s failed (attempt %d), retrying in %.2f s: %s", table, attempt, delay, exc
                )
                if not self._retry.sleep(delay):
                    return False
        return False

    def _write_once(self, batch: Batch) -> None:
        spec = batch.route.table
        token = batch.token
        if batch.raw and "avro" not in batch.done:
            data = b"".join(batch.blocks)
            target = f"{quote_identifier(self._db)}.{quote_identifier(spec.avro_table or '')}"
            self._timed(
                spec.table,
                len(batch.raw),
                lambda: self._client.raw_insert(
                    target,
                    insert_block=data,
                    fmt="Avro",
                    settings={
                        "insert_deduplication_token": token,
                        "deduplicate_blocks_in_dependent_materialized_views": 1,
                        **_INSERT_SETTINGS,
                    },
                ),
            )
            batch.done.add("avro")
            batch.written += len(batch.raw)
        if batch.rows and "rows" not in batch.done:
            rows_token = f"{token}:rows" if "avro" in batch.done else token
            self._insert(spec.table, spec.columns, batch.rows, rows_token)
            batch.done.add("rows")
            batch.written += len(batch.rows)
        if batch.rejects and "rejects" not in batch.done:
            self._insert(REJECTS, REJECT_COLUMNS, batch.rejects, f"{token}:rejects")
            batch.done.add("rejects")

    def _insert(self, table: str, columns: Sequence[str], rows: list[Row], token: str) -> None:
        types = self._column_types.get(table)
        if types is None:
            ctx = self._client.create_insert_context(table, list(columns), database=self._db)
            types = self._column_types[table] = ctx.column_types
        self._timed(
            table,
            len(rows),
            lambda: self._client.insert(
                table,
                rows,
                column_names=list(columns),
                database=self._db,
                column_types=types,
                settings={"insert_deduplication_token": token, **_INSERT_SETTINGS},
            ),
        )

    def _timed(self, table: str, n: int, insert: Callable[[], object]) -> None:
        started = time.perf_counter()
        insert()
        self._metrics.batch_latency.labels(table).observe(time.perf_counter() - started)
        self._metrics.batch_rows.labels(table).observe(n)
        self._metrics.rows.labels(table).inc(n)
