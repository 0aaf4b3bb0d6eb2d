"""The open-PO workload of ``make bench``: worker memory with many open purchase orders.

``open_po_events`` yields, in publish order: every material spec, ``pos`` purchase orders
that stay open (no receipt ever arrives for them), then one *blanket* PO (one line ordering
``blanket_receipts`` times a delivery) with ``blanket_receipts`` partial receipts against it,
each with its certificate of analysis. Records are cloned from clean simulated traffic
(``lotflow.simulator.generate``), so they have the shape and values the worker expects.
``publish_events`` produces them Avro-encoded, keyed by PO number (material specs by material
id), through a redelivering producer.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from lotflow.kafka_clients import RedeliveringProducer, producer_config
from lotflow.schemas.serde import AvroCodec, schema_source
from lotflow.settings import Settings
from lotflow.simulator.faults import parse_fault_spec
from lotflow.simulator.generate import generate
from lotflow.streams.topics import CERTIFICATES, MATERIAL_SPECS, PURCHASE_ORDERS, RECEIPTS, TopicSpec

Event = tuple[TopicSpec, str, dict[str, Any]]
Record = dict[str, Any]
HOUR_MS = 3_600_000
TEMPLATE_RECEIPTS = 300  # clean simulated traffic the records are cloned from


def _templates(seed: int, now_ms: int) -> tuple[list[Record], list[Record], Record, Record, Record]:
    """From clean simulated traffic: the material specs, its POs, and one delivery whose
    receipt has a line with a CoA (its PO, receipt and CoA)."""
    specs: list[Record] = []
    pos: dict[str, Record] = {}
    receipts: dict[str, Record] = {}
    coas: dict[tuple[str, str], Record] = {}  # (po_number, vendor_lot)
    for event in generate(seed, TEMPLATE_RECEIPTS, parse_fault_spec("none"), now_ms - HOUR_MS):
        if not isinstance(event.value, dict):
            continue
        if event.topic is MATERIAL_SPECS:
            specs.append(event.value)
        elif event.topic is PURCHASE_ORDERS:
            pos[event.value["po_number"]] = event.value
        elif event.topic is RECEIPTS:
            receipts.setdefault(event.value["po_number"], event.value)
        elif event.topic is CERTIFICATES:
            coas[(event.value["po_number"], event.value["vendor_lot"])] = event.value
    for po_number, receipt in receipts.items():
        for line in receipt["lines"]:
            coa = coas.get((po_number, line["vendor_lot"]))
            if coa is not None and po_number in pos:
                return specs, list(pos.values()), pos[po_number], {**receipt, "lines": [line]}, coa
    raise RuntimeError("no delivery with a certificate of analysis in the template traffic")


def open_po_events(seed: int, pos: int, blanket_receipts: int, now_ms: int) -> Iterator[Event]:
    specs, po_templates, po, receipt, coa = _templates(seed, now_ms)
    for spec in specs:
        yield MATERIAL_SPECS, spec["material_id"], spec
    opened = now_ms - HOUR_MS
    for i, template in zip(range(pos), itertools.cycle(po_templates), strict=False):
        open_po = copy.deepcopy(template)
        open_po["po_number"] = f"OPEN-{seed}-{i:07d}"
        open_po["order_date"] = open_po["event_time"] = opened + i // 100
        yield PURCHASE_ORDERS, open_po["po_number"], open_po

    delivery = receipt["lines"][0]
    blanket_no = f"BLANKET-{seed}"
    po_line = next(line for line in po["lines"] if line["line_no"] == delivery["po_line"])
    per_delivery = po_line["quantity"]
    blanket = copy.deepcopy(po)
    blanket.update(po_number=blanket_no, order_date=opened, event_time=opened,
                   lines=[{**po_line, "quantity": per_delivery * blanket_receipts}])
    yield PURCHASE_ORDERS, blanket_no, blanket
    for j in range(blanket_receipts):
        at = now_ms + j
        lot = f"{delivery['vendor_lot']}-B{j:04d}"
        cert = copy.deepcopy(coa)
        cert.update(coa_id=f"{coa['coa_id']}-B{j:04d}", po_number=blanket_no, vendor_lot=lot,
                    issued_at=at - 60_000, event_time=at - 60_000)
        yield CERTIFICATES, blanket_no, cert
        line = {**delivery, "quantity": per_delivery, "unit": po_line["unit"], "unit_price": po_line["unit_price"],
                "vendor_lot": lot, "partial": True}
        partial = {**receipt, "receipt_id": f"{receipt['receipt_id']}-B{j:04d}", "po_number": blanket_no,
                   "lines": [line], "received_at": at - 30_000, "event_time": at}
        yield RECEIPTS, blanket_no, partial


def publish_events(settings: Settings, events: Iterable[Event]) -> Counter[str]:
    """Produce ``events``; returns records delivered per full topic name (raises on a loss)."""
    source = schema_source(settings.schema_registry_url)
    codecs: dict[str, AvroCodec] = {}
    producer = RedeliveringProducer(producer_config(settings, **{"linger.ms": 20}))
    sent: Counter[str] = Counter()
    for n, (spec, key, record) in enumerate(events):
        topic = spec.full_name(settings)
        codec = codecs.get(topic)
        if codec is None:
            codec = codecs[topic] = AvroCodec(source, f"{topic}-value", spec.schema)
        producer.send(topic, key.encode(), codec.encode(record))
        sent[topic] += 1
        if n % 5000 == 0:
            producer.poll(0)
    producer.flush(300)  # raises if anything failed for good
    return sent
