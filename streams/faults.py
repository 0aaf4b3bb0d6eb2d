"""Fault injection for crash tests: kill the worker at a chosen point of the batch commit.

``LOTFLOW_FAULT_INJECT=POINT[:N]`` kills the process with SIGKILL (no clean-up, as a power cut
or the OOM killer would) the Nth time a batch reaches POINT:

* ``after_produce``  — the batch's outputs and changelog records are produced, not flushed;
* ``before_commit``  — they are on the broker, the transaction is not committed;
* ``after_commit``   — the transaction is committed, Faust has not committed the input offsets.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

__all__ = ["POINTS", "crash_injector"]

POINTS = ("after_produce", "before_commit", "after_commit")


def crash_injector(spec: str | None) -> Callable[[str], None] | None:
    if not spec:
        return None
    point, _, count = spec.partition(":")
    if point not in POINTS:
        raise ValueError(f"fault_inject point {point!r} is not one of {', '.join(POINTS)}")
    remaining = int(count or 1)

    def crash_at(reached: str) -> None:
        nonlocal remaining
        if reached != point:
            return
        remaining -= 1
        if remaining <= 0:
            print(f"[lotflow worker] fault injection: killed at {point}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    return crash_at
