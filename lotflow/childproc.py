"""What the demo, the benchmarks and the tests need to run lotflow as child processes:
their environment, their Prometheus ``/metrics``, and their memory.

- :func:`child_env` — the parent's environment with every ``LOTFLOW_*`` setting replaced by
  ``settings`` (a setting the parent's environment had but ``settings`` leaves unset is
  removed, so the child reads exactly these settings), plus extra variables.
- :func:`scrape_metrics` / :func:`parse_metrics` — samples of a ``/metrics`` page (or of any
  exposition text, e.g. ``prometheus_client.generate_latest(registry)``), parsed with
  ``prometheus_client``'s own parser; :func:`metric_value` sums the samples of one name whose
  labels include the given ones.
- :func:`process_rss_mb` — resident memory of a process.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from lotflow.settings import Settings

__all__ = ["Sample", "child_env", "metric_value", "parse_metrics", "process_rss_mb", "scrape_metrics"]


def child_env(settings: Settings, **extra: object) -> dict[str, str]:
    """Environment for a child process that must run with ``settings`` (plus ``extra`` vars)."""
    ours = {f"LOTFLOW_{name.upper()}" for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env.update(settings.to_env())
    env.update({k: str(v) for k, v in extra.items()})
    return env


def parse_metrics(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition (counters as ``<name>_total``)."""
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def scrape_metrics(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> list[Sample]:
    """The samples ``http://host:port/metrics`` serves; ``OSError`` when it does not answer."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as resp:
        return parse_metrics(resp.read().decode())


def metric_value(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0.0 if none)."""
    return sum(
        s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def process_rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB (psutil when installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise ProcessLookupError(f"no VmRSS for process {pid}") from None
    return float(psutil.Process(pid).memory_info().rss) / (1024 * 1024)
