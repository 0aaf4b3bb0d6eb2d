"""The bench's stage profile (load-tests/stages.py): exclusive stage times that add up, on real traffic."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "load-tests"))

import stages

from lotflow.settings import Settings


def test_the_stage_clock_keeps_exclusive_time() -> None:
    clock = stages.StageClock()

    def inner() -> None:
        time.sleep(0.02)

    timed_inner = clock.wrap("inner", inner)

    def outer() -> None:
        time.sleep(0.01)
        timed_inner()

    clock.wrap("outer", outer)()
    assert clock.seconds["inner"] == pytest.approx(0.02, abs=0.015)
    assert clock.seconds["outer"] == pytest.approx(0.01, abs=0.015)  # without inner's 20 ms


def test_the_stages_of_the_processor_add_up_to_its_instrumented_time() -> None:
    figures = stages.measure_stages(Settings(), 150, say=lambda message: None, tune_gc=False)
    assert figures["events"] > 400  # POs, receipts and certificates of 150 receipts
    parts = [figures[stage] for stage in stages.STAGES]
    assert all(part > 0 for part in parts), figures
    # everything the instrumented run spent is in some stage (the batch loop itself is not)
    assert sum(parts) == pytest.approx(figures["instrumented"], rel=0.1)
    assert figures["processor"] > 0 and figures["outputs_per_event"] > 1
    assert "produce" not in figures  # no broker asked for
