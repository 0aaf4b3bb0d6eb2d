"""``lotflow review``: the review service as one process.

With the embedded ClickHouse engine (the default), only one process may open the engine, so
this process also runs the ClickHouse sink in a thread: what the sink writes is what the pages
read, through the one client. Against a ClickHouse server the sink is its own deployment
(``lotflow sink``) and any number of review processes read the server.

TLS: pass ``--certfile``/``--keyfile`` (uvicorn terminates TLS, cookies become Secure), or run
it behind a TLS-terminating proxy on a private address with ``LOTFLOW_REVIEW_SECURE_COOKIES=true``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

from lotflow.review.app import ReviewServices, create_app
from lotflow.review.decisions import DecisionWriter
from lotflow.review.inputs import InputReader
from lotflow.review.store import RESOLVING, ReviewStore
from lotflow.review.users import UserStore
from lotflow.schemas.serde import schema_source
from lotflow.settings import Settings
from lotflow.sinks.clickhouse import connect, run_sink
from lotflow.sinks.migrations import migrate
from lotflow.streams.reference import SpecCache

__all__ = ["build_services", "embedded_clickhouse", "run_review"]

log = logging.getLogger(__name__)


def embedded_clickhouse(settings: Settings) -> bool:
    return settings.clickhouse_url().startswith("chdb:")


def build_services(settings: Settings) -> tuple[ReviewServices, SpecCache]:
    client = connect(settings)
    migrate(client, settings.clickhouse_database)
    store = ReviewStore(client, settings.clickhouse_database)

    def stored_first(exception_id: str) -> dict[str, Any] | None:
        for row in store.decisions_on(exception_id):
            if row.resolution in RESOLVING:
                return dataclasses.asdict(row)
        return None

    specs = SpecCache(settings, schema_source(settings.schema_registry_url))
    specs.load()
    specs_lock = threading.Lock()

    def current_specs() -> dict[str, Any]:
        with specs_lock:
            specs.poll()
            return dict(specs.specs)

    services = ReviewServices(store=store, users=UserStore(settings.users_file),
                              decisions=DecisionWriter(settings, stored_first), inputs=InputReader(settings),
                              specs=current_specs)
    return services, specs


def run_review(settings: Settings, *, host: str | None = None, port: int | None = None,
               certfile: Path | None = None, keyfile: Path | None = None) -> None:
    import uvicorn

    if (certfile is None) != (keyfile is None):
        raise ValueError("--certfile and --keyfile go together")
    stop = threading.Event()
    sink: threading.Thread | None = None
    if embedded_clickhouse(settings):
        # the one process that may open the embedded engine: the sink runs here
        sink = threading.Thread(target=run_sink, args=(settings, stop), name="lotflow-sink", daemon=True)
        sink.start()
    services, specs = build_services(settings)
    app = create_app(services, secure_cookies=certfile is not None or settings.review_secure_cookies)
    bind_host = host or settings.review_host
    bind_port = port or settings.review_port
    scheme = "https" if certfile else "http"
    print(f"[lotflow review] serving {scheme}://{bind_host}:{bind_port} (users: {settings.users_file}; "
          f"sink {'in this process' if sink else 'separate'})", flush=True)
    try:
        uvicorn.run(app, host=bind_host, port=bind_port, log_level="warning",
                    ssl_certfile=str(certfile) if certfile else None, ssl_keyfile=str(keyfile) if keyfile else None)
    finally:
        stop.set()
        if sink is not None:
            sink.join(30)
        specs.close()
        if services.inputs is not None:
            services.inputs.close()
