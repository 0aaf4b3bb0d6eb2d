"""Plant simulator: a seeded world of vendors and materials, a pure deterministic event
generator with injected faults and ground truth, and a Kafka publisher.

``generate`` (pure) and ``publish`` (Kafka) are the entry points; ``parse_fault_spec``
reads a ``--faults`` option.
"""

from lotflow.simulator.faults import CATALOGUE, FaultMix, parse_fault_spec
from lotflow.simulator.generate import SimEvent, generate
from lotflow.simulator.publish import PublishReport, publish
from lotflow.simulator.world import World, build_world

__all__ = [
    "CATALOGUE",
    "FaultMix",
    "PublishReport",
    "SimEvent",
    "World",
    "build_world",
    "generate",
    "parse_fault_spec",
    "publish",
]
