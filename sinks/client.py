"""One ClickHouse client per DSN per process, and row counts of the sink tables.

``chdb:///abs/path`` opens the embedded engine (one path per process); ``http(s)://`` a
server. The embedded engine needs no lock around the client: clickhouse-connect's chdb
backend serializes every call on a client's handle with its own lock (and the engine
releases the GIL while it works), so a web/query thread may share ``connect(settings)``
with the sink's writer thread. An HTTP client is created without a session id, so
concurrent calls from several threads are safe there too. The DSN is never logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client

from lotflow.settings import Settings
from lotflow.sinks.rows import REJECTS, TABLES

__all__ = ["connect", "table_counts"]

log = logging.getLogger(__name__)

_clients: dict[str, Client] = {}
_clients_lock = threading.Lock()


def connect(settings: Settings) -> Client:
    """The process's ClickHouse client for ``settings.clickhouse_url()`` (created once)."""
    url = settings.clickhouse_url()
    with _clients_lock:
        client = _clients.get(url)
        if client is None:
            client = _clients[url] = _open_client(url)
        return client


def _open_client(url: str) -> Client:
    parts = urlsplit(url)
    if parts.scheme == "chdb":
        where = parts.path if not parts.netloc else parts.netloc
        if where and not parts.netloc:
            Path(where).mkdir(parents=True, exist_ok=True)
        log.info("ClickHouse: embedded engine at %s", where or "memory")
        return clickhouse_connect.get_client(dsn=url)
    if parts.scheme in ("http", "https"):
        log.info("ClickHouse: server %s://%s:%s", parts.scheme, parts.hostname, parts.port)
        # No session: a session id makes concurrent calls from two threads fail.
        return clickhouse_connect.get_client(dsn=url, autogenerate_session_id=False)
    raise ValueError(f"unsupported ClickHouse DSN scheme {parts.scheme!r} (chdb, http, https)")


def table_counts(client: Client, database: str, tables: Iterable[str] | None = None) -> dict[str, int]:
    """``SELECT count() FROM t FINAL`` for every sink table (or ``tables``)."""
    names = list(tables) if tables is not None else [s.table for s in TABLES.values()] + [REJECTS]
    db = quote_identifier(database)
    counts: dict[str, int] = {}
    for name in names:
        result = client.query(f"SELECT count() FROM {db}.{quote_identifier(name)} FINAL")
        counts[name] = int(result.result_rows[0][0])
    return counts
