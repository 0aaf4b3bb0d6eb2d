"""The plant simulator: determinism, fault rates, schema fit and every fault's semantics."""

from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from lotflow.schemas.serde import AvroCodec, DecodeError, schema_source
from lotflow.settings import Settings
from lotflow.simulator.faults import (
    BENIGN,
    CATALOGUE,
    FAULTS,
    FaultKind,
    FaultMix,
    fault_info,
    parse_fault_spec,
)
from lotflow.simulator.generate import HISTORY_SHARE, SimEvent, generate
from lotflow.simulator.publish import publish
from lotflow.simulator.units import ALTERNATE_UNIT, LB_PER_KG, factor
from lotflow.simulator.world import DEGRADE_END, DEGRADE_START, World, build_world
from lotflow.streams.topics import (
    CERTIFICATES,
    GROUND_TRUTH,
    MATERIAL_SPECS,
    PURCHASE_ORDERS,
    RECEIPTS,
    TopicSpec,
)

Record = dict[str, Any]

SEED = 11
COUNT = 20_000
START_MS = 1_750_000_000_000
Y2000_MS = 946_684_800_000
DAY_MS = 86_400_000


def codec(spec: TopicSpec) -> AvroCodec:
    return AvroCodec(schema_source(None), f"{spec.name}-value", spec.schema)


@dataclass
class Stream:
    """One generated run, indexed the way the pipeline joins it."""

    events: list[SimEvent]
    world: World
    seconds: float
    specs: dict[str, Record] = field(default_factory=dict)
    pos: dict[str, Record] = field(default_factory=dict)
    po_position: dict[str, int] = field(default_factory=dict)
    coas: dict[str, list[Record]] = field(default_factory=lambda: defaultdict(list))  # by vendor_lot
    receipts: list[tuple[int, SimEvent]] = field(default_factory=list)  # (position, event)

    def __post_init__(self) -> None:
        for pos, event in enumerate(self.events):
            value = event.value
            if event.topic is MATERIAL_SPECS:
                assert isinstance(value, dict)
                self.specs[value["material_id"]] = value
            elif event.topic is PURCHASE_ORDERS:
                assert isinstance(value, dict)
                self.pos[value["po_number"]] = value
                self.po_position[value["po_number"]] = pos
            elif event.topic is CERTIFICATES:
                assert isinstance(value, dict)
                self.coas[value["vendor_lot"]].append(value)
            elif event.topic is RECEIPTS:
                self.receipts.append((pos, event))

    def by_fault(self, fault: str) -> list[Record]:
        out = []
        for _, event in self.receipts:
            assert event.truth is not None
            if event.truth["fault"] == fault:
                assert isinstance(event.value, dict), fault
                out.append(event.value)
        return out

    def by_benign(self, benign: str) -> list[Record]:
        return [
            e.value for _, e in self.receipts
            if e.truth is not None and e.truth["fault"] == "NONE" and e.truth["benign"] == benign
            and isinstance(e.value, dict)
        ]

    def po_line(self, receipt: Record, line: Record) -> Record:
        po = self.pos[receipt["po_number"]]
        return next(pl for pl in po["lines"] if pl["line_no"] == line["po_line"])

    def coa_values(self, receipt: Record) -> list[tuple[Record, Record]]:
        """(coa, value) of every CoA of the receipt's lots."""
        return [(c, v) for line in receipt["lines"] for c in self.coas[line["vendor_lot"]]
                for v in c["values"]]


def plain(value: Any) -> Any:
    """A decoded record with timestamp-millis datetimes back as epoch ms."""
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def run(seed: int, count: int, mix: FaultMix | None = None, **kw: Any) -> Stream:
    mix = mix or FaultMix.default()
    t0 = time.perf_counter()
    events = list(generate(seed, count, mix, START_MS, **kw))
    seconds = time.perf_counter() - t0
    return Stream(events, build_world(seed, mix.rate("near_limit")), seconds)


@pytest.fixture(scope="module")
def big() -> Stream:
    return run(SEED, COUNT)


def prop_spec(stream: Stream, material_id: str, name: str) -> Record:
    return next(p for p in stream.specs[material_id]["properties"] if p["name"] == name)


# --- determinism and shape ------------------------------------------------------------------


def test_same_seed_gives_identical_events() -> None:
    a = list(generate(3, 3000, FaultMix.default(), START_MS))
    b = list(generate(3, 3000, FaultMix.default(), START_MS))
    assert repr(a) == repr(b)  # repr: NaN quantities compare unequal to themselves


def test_start_time_only_shifts_timestamps() -> None:
    def shape(start: int) -> list[tuple[str, str, Any]]:
        return [(e.topic.name, e.key, e.truth and e.truth["fault"])
                for e in generate(3, 3000, FaultMix.default(), start)]

    assert shape(START_MS) == shape(1)


def test_different_seeds_differ_and_never_collide() -> None:
    a, b = run(1, 2000), run(2, 2000)
    assert repr(a.events) != repr(b.events)
    assert not set(a.pos) & set(b.pos)
    ids = lambda s: {e.truth["subject_id"] for _, e in s.receipts if e.truth}  # noqa: E731
    assert not ids(a) & ids(b)


@pytest.mark.parametrize("count", [0, 1, 2, 7, 500])
def test_count_is_the_number_of_receipt_topic_records(count: int) -> None:
    stream = run(5, count)
    assert len(stream.receipts) == count
    assert all((e.truth is not None) == (e.topic is RECEIPTS) for e in stream.events)
    assert len(stream.specs) == 40
    assert all(e.topic is MATERIAL_SPECS for e in stream.events[:40])


def test_ids_unique_and_keys_are_join_keys(big: Stream) -> None:
    subjects = [e.truth["subject_id"] for _, e in big.receipts if e.truth]
    assert len(subjects) == len(set(subjects))
    assert all(s.startswith(("RCV-", "MALFORMED-")) for s in subjects)
    assert all(po.startswith(f"PO-{SEED}-") for po in big.pos)
    for event in big.events:
        if isinstance(event.value, dict):
            if event.topic is MATERIAL_SPECS:
                assert event.key == event.value["material_id"]
            else:
                assert event.key == event.value["po_number"]
    lots = Counter(
        line["vendor_lot"] for _, e in big.receipts if isinstance(e.value, dict)
        and e.truth and e.truth["fault"] != "DUPLICATE_RECEIPT" for line in e.value["lines"]
    )
    malformed_lots = sum(1 for n in lots.values() if n > 1)
    assert malformed_lots == 0


def test_event_times_do_not_go_backwards(big: Stream) -> None:
    times = [e.value["event_time"] for e in big.events if isinstance(e.value, dict)]
    assert times == sorted(times)
    assert times[0] == START_MS
    for _, e in big.receipts:
        assert e.truth is not None
        if isinstance(e.value, dict):
            assert e.truth["event_time"] == e.value["event_time"]
            if e.truth["fault"] != "MALFORMED_IMPOSSIBLE_VALUE":
                assert e.value["received_at"] <= e.value["event_time"]


def test_generation_is_fast(big: Stream) -> None:
    print(f"\n{COUNT} receipts -> {len(big.events)} events in {big.seconds:.2f}s")
    assert big.seconds < 20


# --- world ----------------------------------------------------------------------------------


def test_world_shape() -> None:
    world = build_world(4)
    assert len(world.vendors) == 12 and len(world.materials) == 40
    assert sorted(world.materials)[0] == "MAT-0001"
    for m in world.materials.values():
        if m.base_unit == "EA":
            assert not m.properties and not m.requires_coa
        else:
            assert m.base_unit in ("KG", "L") and m.requires_coa and 1 <= len(m.properties) <= 3
            assert all(p.min < p.max for p in m.properties)
        assert 1 <= m.quantity_tolerance_pct <= 5
    assert all(4 <= len(v.materials) <= 6 for v in world.vendors)
    assert sum(v.degrading for v in world.vendors) == 1
    degrading = next(v for v in world.vendors if v.degrading)
    assert degrading.multiplier(0.0) == DEGRADE_START and degrading.multiplier(1.0) == DEGRADE_END
    assert not set(world.unknown_material_ids) & set(world.materials)


def test_near_limit_pairs_sit_near_a_limit_with_tight_std() -> None:
    world = build_world(4)
    coa_pairs = [s for s in world.supplies.values() if s.profiles]
    near = [s for s in coa_pairs if s.near_limit]
    assert abs(len(near) / len(coa_pairs) - 0.15) < 0.03
    for supply in world.supplies.values():
        material = world.materials[supply.material_id]
        for prop in material.properties:
            profile = supply.profile(prop.name)
            distance = min(profile.mean - prop.min, prop.max - profile.mean) / prop.span
            assert prop.min + 4 * profile.std <= profile.mean <= prop.max - 4 * profile.std
            if not supply.near_limit:
                assert distance >= 0.3 - 1e-9
        if supply.near_limit:
            assert any(
                min(supply.profile(p.name).mean - p.min, p.max - supply.profile(p.name).mean) / p.span <= 0.08
                for p in material.properties
            )
    assert not [s for s in build_world(4, 0.0).supplies.values() if s.near_limit]


# --- rates ----------------------------------------------------------------------------------


def test_fault_rates_match_the_mix(big: Stream) -> None:
    mix = FaultMix.default()
    truths = [e.truth for _, e in big.receipts if e.truth]
    faults = Counter(t["fault"] for t in truths)
    for name in FAULTS:  # within 4 sigma (Poisson) + 10% of the expected count
        expected, observed = mix.rate(name) * COUNT, faults[fault_info(name).code]
        assert abs(observed - expected) <= 4 * math.sqrt(expected) + 0.1 * expected, (name, observed)
    benign = Counter(t["benign"] for t in truths)
    for name in ("partial_delivery", "converted_unit"):
        share = benign[name.upper()] / COUNT
        assert 0.75 * mix.rate(name) <= share <= 1.3 * mix.rate(name), (name, share)
    assert 0.05 < benign["NEAR_LIMIT"] / COUNT < 0.45
    expected = mix.total_fault_rate * COUNT
    assert abs(COUNT - faults["NONE"] - expected) < 0.15 * expected


def test_history_stretch_has_no_faults(big: Stream) -> None:
    history = [e.truth for _, e in big.receipts[: int(COUNT * HISTORY_SHARE)] if e.truth]
    assert all(t["fault"] == "NONE" for t in history)


def test_degrading_vendor_gets_worse(big: Stream) -> None:
    vendor = next(v.vendor_id for v in big.world.vendors if v.degrading)
    start = int(COUNT * HISTORY_SHARE)
    window = (COUNT - start) * 15 // 100  # multiplier ~1.25x early vs ~4.7x late

    def rate(part: list[tuple[int, SimEvent]]) -> float:
        mine = [e.truth for _, e in part if e.truth and e.truth["vendor_id"] == vendor]
        # malformed faults are the dock system's, not the vendor's
        return sum(t["is_fault"] and not t["fault"].startswith("MALFORMED") for t in mine) / len(mine)

    assert rate(big.receipts[-window:]) > 2 * rate(big.receipts[start:start + window])


def test_none_mix_is_clean() -> None:
    stream = run(9, 3000, FaultMix.none())
    truths = [e.truth for _, e in stream.receipts if e.truth]
    assert {(t["fault"], t["benign"]) for t in truths} == {("NONE", "")}


def test_a_single_fault_mix() -> None:
    stream = run(9, 3000, parse_fault_spec("unit_mismatch=0.1"))
    faults = Counter(e.truth["fault"] for _, e in stream.receipts if e.truth)
    assert set(faults) == {"NONE", "UNIT_MISMATCH"}
    assert 0.07 < faults["UNIT_MISMATCH"] / 3000 < 0.13


# --- schemas --------------------------------------------------------------------------------


def test_every_valid_record_encodes_against_its_schema(big: Stream) -> None:
    codecs = {spec.name: codec(spec) for spec in (MATERIAL_SPECS, PURCHASE_ORDERS, RECEIPTS, CERTIFICATES)}
    truth_codec = codec(GROUND_TRUTH)
    for n, event in enumerate(big.events):
        if isinstance(event.value, dict):
            data = codecs[event.topic.name].encode(event.value)
            if n % 50 == 0 and not (event.truth and event.truth["fault"] == "MALFORMED_IMPOSSIBLE_VALUE"):
                assert plain(codecs[event.topic.name].decode(data)) == event.value
        if event.truth is not None:
            record = {**event.truth, "source_topic": RECEIPTS.name, "source_partition": 0, "source_offset": n}
            assert plain(truth_codec.decode(truth_codec.encode(record))) == record


# --- fault semantics ------------------------------------------------------------------------


def test_truth_flags_are_consistent(big: Stream) -> None:
    silent = {fault_info(n).code for n in FAULTS if fault_info(n).kind is FaultKind.SILENT}
    for _, event in big.receipts:
        t = event.truth
        assert t is not None
        assert t["is_fault"] == (t["fault"] != "NONE")
        assert t["silent"] == (t["fault"] in silent)
        assert t["benign"] in ("", "PARTIAL_DELIVERY", "NEAR_LIMIT", "CONVERTED_UNIT")
        if t["is_fault"]:
            assert t["benign"] == ""


def test_clean_receipts_are_clean(big: Stream) -> None:
    clean = big.by_benign("") + big.by_benign("NEAR_LIMIT")
    assert len(clean) > 0.8 * COUNT
    for receipt in clean:
        assert receipt["po_number"] in big.pos
        for line in receipt["lines"]:
            po_line = big.po_line(receipt, line)
            spec = big.specs[line["material_id"]]
            assert line["material_id"] == po_line["material_id"]
            assert line["unit"] == po_line["unit"] and not line["partial"]
            spread = min(spec["quantity_tolerance_pct"] / 2, 1) / 100
            assert abs(line["quantity"] / po_line["quantity"] - 1) <= spread + 1e-9
            assert line["unit_price"] in (None, po_line["unit_price"])
            coas = big.coas[line["vendor_lot"]]
            assert len(coas) == (1 if spec["requires_coa"] else 0)
            for coa in coas:
                for value in coa["values"]:
                    prop = prop_spec(big, coa["material_id"], value["property"])
                    assert prop["min"] <= value["value"] <= prop["max"]
                    profile = big.world.supply(coa["vendor_id"], coa["material_id"]).profile(value["property"])
                    assert abs(value["value"] - profile.mean) <= 4 * profile.std + 1e-4


def test_near_limit_receipts_have_values_near_a_limit_inside_spec(big: Stream) -> None:
    receipts = big.by_benign("NEAR_LIMIT")
    assert receipts
    for receipt in receipts:
        closest = 1.0
        for coa, value in big.coa_values(receipt):
            prop = prop_spec(big, coa["material_id"], value["property"])
            assert prop["min"] <= value["value"] <= prop["max"]
            span = prop["max"] - prop["min"]
            closest = min(closest, (value["value"] - prop["min"]) / span, (prop["max"] - value["value"]) / span)
        assert closest <= 0.13


def test_unit_mismatch_keeps_the_po_number_in_another_unit(big: Stream) -> None:
    for receipt in big.by_fault("UNIT_MISMATCH"):
        off = [(line, big.po_line(receipt, line)) for line in receipt["lines"]
               if line["unit"] != big.po_line(receipt, line)["unit"]]
        assert len(off) == 1
        line, po_line = off[0]
        assert line["unit"] == ALTERNATE_UNIT[po_line["unit"]]
        assert line["quantity"] == po_line["quantity"]


def test_converted_unit_is_correctly_converted(big: Stream) -> None:
    receipts = big.by_benign("CONVERTED_UNIT")
    assert receipts
    for receipt in receipts:
        off = [(line, big.po_line(receipt, line)) for line in receipt["lines"]
               if line["unit"] != big.po_line(receipt, line)["unit"]]
        assert len(off) == 1
        line, po_line = off[0]
        k = factor(po_line["unit"], line["unit"])
        assert abs(line["quantity"] - po_line["quantity"] * k) <= 0.005 + 1e-9
        if line["unit_price"] is not None:
            assert abs(line["unit_price"] * k - po_line["unit_price"]) <= 1e-4 * k + 1e-9


@pytest.mark.parametrize("fault, low, high", [("QUANTITY_SHORT", 0.6, 0.9), ("QUANTITY_OVER", 1.1, 1.4)])
def test_quantity_short_and_over(big: Stream, fault: str, low: float, high: float) -> None:
    for receipt in big.by_fault(fault):
        ratios = [line["quantity"] / big.po_line(receipt, line)["quantity"] for line in receipt["lines"]]
        off = [r for r in ratios if not 0.98 <= r <= 1.02]
        assert len(off) == 1 and low <= off[0] <= high, ratios
        assert not any(line["partial"] for line in receipt["lines"])


def test_partial_deliveries_sum_to_the_order(big: Stream) -> None:
    groups: dict[tuple[str, int], list[tuple[str, Record]]] = defaultdict(list)
    for receipt in big.by_benign("PARTIAL_DELIVERY"):
        partial = [line for line in receipt["lines"] if line["partial"]]
        assert len(partial) == 1
        groups[(receipt["po_number"], partial[0]["po_line"])].append((receipt["receipt_id"], partial[0]))
    assert groups
    for (po_number, line_no), parts in groups.items():
        assert len(parts) == 2, parts
        assert parts[0][0] != parts[1][0] and parts[0][1]["vendor_lot"] != parts[1][1]["vendor_lot"]
        ordered = next(pl for pl in big.pos[po_number]["lines"] if pl["line_no"] == line_no)["quantity"]
        assert math.isclose(sum(p["quantity"] for _, p in parts), ordered)


def test_coa_out_of_spec_by_2_to_20_percent(big: Stream) -> None:
    for receipt in big.by_fault("COA_OUT_OF_SPEC"):
        outside = []
        for coa, value in big.coa_values(receipt):
            prop = prop_spec(big, coa["material_id"], value["property"])
            span = prop["max"] - prop["min"]
            excess = max(prop["min"] - value["value"], value["value"] - prop["max"]) / span
            if excess > 0:
                outside.append(excess)
        assert len(outside) == 1 and 0.02 <= outside[0] <= 0.20


def test_silent_coa_drift_is_inside_spec_but_six_std_off(big: Stream) -> None:
    receipts = big.by_fault("SILENT_COA_DRIFT")
    assert receipts
    for receipt in receipts:
        zs = []
        for coa, value in big.coa_values(receipt):
            prop = prop_spec(big, coa["material_id"], value["property"])
            assert prop["min"] <= value["value"] <= prop["max"]
            profile = big.world.supply(coa["vendor_id"], coa["material_id"]).profile(value["property"])
            zs.append(abs(value["value"] - profile.mean) / profile.std)
        assert sum(z >= 6 for z in zs) == 1, zs


def test_silent_coa_drift_needs_twenty_earlier_receipts_of_the_pair(big: Stream) -> None:
    seen: Counter[tuple[str, str]] = Counter()
    for _, event in big.receipts:
        if not isinstance(event.value, dict) or event.truth is None:
            continue
        receipt = event.value
        if event.truth["fault"] == "SILENT_COA_DRIFT":
            drifted = []
            for coa, value in big.coa_values(receipt):
                profile = big.world.supply(coa["vendor_id"], coa["material_id"]).profile(value["property"])
                if abs(value["value"] - profile.mean) >= 6 * profile.std:
                    drifted.append(coa["material_id"])
            assert len(drifted) == 1 and seen[(receipt["vendor_id"], drifted[0])] >= 20
        if event.truth["fault"] != "DUPLICATE_RECEIPT" and not event.truth["fault"].startswith("MALFORMED"):
            for line in receipt["lines"]:
                seen[(receipt["vendor_id"], line["material_id"])] += 1


def test_silent_unit_label_is_pounds_labelled_kilograms(big: Stream) -> None:
    for receipt in big.by_fault("SILENT_UNIT_LABEL"):
        hits = []
        for line in receipt["lines"]:
            po_line = big.po_line(receipt, line)
            assert line["unit"] == po_line["unit"]
            if abs(line["quantity"] / po_line["quantity"] - LB_PER_KG) < 0.01 / po_line["quantity"] + 1e-9:
                hits.append(line)
                assert line["unit"] == "KG"
        assert len(hits) == 1


def test_unknown_po_is_never_published(big: Stream) -> None:
    receipts = big.by_fault("UNKNOWN_PO")
    assert receipts and all(r["po_number"] not in big.pos for r in receipts)
    known = [r for _, e in big.receipts if isinstance(e.value, dict) and e.truth
             and not e.truth["fault"].startswith(("UNKNOWN_PO", "MALFORMED")) for r in [e.value]]
    assert all(r["po_number"] in big.pos for r in known)


def test_unknown_material_has_no_spec_and_is_not_on_the_po(big: Stream) -> None:
    for receipt in big.by_fault("UNKNOWN_MATERIAL"):
        unknown = [line for line in receipt["lines"] if line["material_id"] not in big.specs]
        assert len(unknown) == 1
        assert unknown[0]["material_id"] != big.po_line(receipt, unknown[0])["material_id"]


def test_missing_coa_is_never_published(big: Stream) -> None:
    for receipt in big.by_fault("MISSING_COA"):
        missing = [line for line in receipt["lines"]
                   if big.specs[line["material_id"]]["requires_coa"] and not big.coas[line["vendor_lot"]]]
        assert len(missing) == 1


def test_duplicate_repeats_an_earlier_clean_receipt(big: Stream) -> None:
    firsts: dict[tuple[str, tuple[tuple[str, float], ...]], Record] = {}
    truths: dict[str, Record] = {}
    duplicates = 0
    for _, event in big.receipts:
        if not isinstance(event.value, dict) or event.truth is None:
            continue
        receipt = event.value
        signature = (receipt["po_number"], tuple((x["vendor_lot"], x["quantity"]) for x in receipt["lines"]))
        if event.truth["fault"] == "DUPLICATE_RECEIPT":
            duplicates += 1
            original = firsts[signature]
            assert original["receipt_id"] != receipt["receipt_id"]
            assert original["lines"] == receipt["lines"]
            assert truths[original["receipt_id"]]["fault"] == "NONE"
        else:
            firsts.setdefault(signature, receipt)
            truths[receipt["receipt_id"]] = event.truth
    assert duplicates > 0


def test_price_anomaly(big: Stream) -> None:
    for receipt in big.by_fault("PRICE_ANOMALY"):
        ratios = [line["unit_price"] / big.po_line(receipt, line)["unit_price"]
                  for line in receipt["lines"] if line["unit_price"] is not None]
        odd = [r for r in ratios if not math.isclose(r, 1.0)]
        assert len(odd) == 1
        assert 1.4 <= odd[0] <= 2.5 or 0.3 <= odd[0] <= 0.6


def test_malformed_records_do_not_decode(big: Stream) -> None:
    receipts = codec(RECEIPTS)
    header = receipts.encode(big.by_benign("")[0])[:5]
    seen: Counter[str] = Counter()
    for _, event in big.receipts:
        assert event.truth is not None
        fault = event.truth["fault"]
        if fault in ("MALFORMED_BYTES", "MALFORMED_MISSING_FIELDS"):
            assert isinstance(event.value, bytes)
            assert event.truth["subject_id"].startswith("MALFORMED-")
            with pytest.raises(DecodeError):
                receipts.decode(event.value)
            if fault == "MALFORMED_MISSING_FIELDS":
                assert event.value[:5] == header and len(event.value) > 5
            seen[fault] += 1
    assert seen["MALFORMED_BYTES"] and seen["MALFORMED_MISSING_FIELDS"]


def test_impossible_values_are_schema_valid_but_impossible(big: Stream) -> None:
    receipts = codec(RECEIPTS)
    found = big.by_fault("MALFORMED_IMPOSSIBLE_VALUE")
    assert found
    for receipt in found:
        receipts.encode(receipt)
        quantities = [line["quantity"] for line in receipt["lines"]]
        assert (
            not quantities
            or any(math.isnan(q) or q <= 0 for q in quantities)
            or receipt["received_at"] < Y2000_MS
            or receipt["received_at"] > receipt["event_time"] + DAY_MS
        )


def test_publish_order_receipts_before_pos_and_coas_around_receipts(big: Stream) -> None:
    before = after = 0
    for position, event in big.receipts:
        if not isinstance(event.value, dict) or event.truth is None or event.truth["fault"] != "NONE":
            continue
        po_pos = big.po_position[event.value["po_number"]]
        if event.truth["benign"] == "PARTIAL_DELIVERY":
            continue
        if po_pos > position:
            before += 1
            between = sum(1 for e in big.events[position + 1: po_pos] if e.topic is RECEIPTS)
            assert between <= 8  # 4 + any partial-delivery halves due at the same time
        else:
            after += 1
    assert 0.25 < before / (before + after) < 0.35
    coa_before = coa_after = 0
    receipt_pos = {line["vendor_lot"]: p for p, e in big.receipts if isinstance(e.value, dict)
                   for line in e.value["lines"]}
    for position, event in enumerate(big.events):
        if event.topic is CERTIFICATES and isinstance(event.value, dict):
            if position < receipt_pos[event.value["vendor_lot"]]:
                coa_before += 1
            else:
                coa_after += 1
    assert 0.4 < coa_before / (coa_before + coa_after) < 0.6


# --- fault spec -----------------------------------------------------------------------------


def test_parse_fault_spec() -> None:
    assert parse_fault_spec("default") == FaultMix.default()
    assert parse_fault_spec(" none ").total_fault_rate == 0
    mix = parse_fault_spec("unit_mismatch=0.05,missing_coa=1%")
    assert mix.rate("unit_mismatch") == 0.05 and mix.rate("missing_coa") == 0.01
    assert mix.rate("partial_delivery") == 0
    tuned = parse_fault_spec("default,price_anomaly=0,near_limit=0.3")
    assert tuned.rate("price_anomaly") == 0 and tuned.rate("near_limit") == 0.3
    assert tuned.rate("unit_mismatch") == FaultMix.default().rate("unit_mismatch")
    assert parse_fault_spec(FaultMix.default().describe()) == FaultMix.default()
    assert {i.name for i in CATALOGUE} == set(FAULTS) | set(BENIGN)


@pytest.mark.parametrize("spec, message", [
    ("unit_mismatc=0.1", "unknown fault 'unit_mismatc'; valid names: unit_mismatch, quantity_short"),
    ("unit_mismatch=1.5", "rate of unit_mismatch must be between 0 and 1"),
    ("unit_mismatch=-0.1", "rate of unit_mismatch must be between 0 and 1"),
    ("unit_mismatch=nan", "rate of unit_mismatch must be between 0 and 1"),
    ("unit_mismatch=lots", "rate of unit_mismatch is not a number"),
    ("unit_mismatch", "is not name=rate"),
    ("", "empty fault spec"),
    ("unit_mismatch=0.1,,", "empty fault spec item"),
    ("unit_mismatch=0.1,unit_mismatch=0.2", "given twice"),
    ("unit_mismatch=0.6,missing_coa=0.6", "sum to 1.2 > 1"),
    ("quantity_over=0.1,default", "'default'/'none' may only come first"),
])
def test_parse_fault_spec_errors_are_clear(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_fault_spec(spec)


# --- publish (fake producer) ----------------------------------------------------------------


class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


class FakeProducer:
    def __init__(self) -> None:
        self.log: dict[str, list[tuple[bytes | None, bytes | None]]] = defaultdict(list)
        self.pending: list[tuple[Any, FakeMessage]] = []

    def produce(self, topic: str, *, value: bytes | None = None, key: bytes | None = None,
                on_delivery: Any = None) -> None:
        self.log[topic].append((key, value))
        self.pending.append((on_delivery, FakeMessage(topic, 0, len(self.log[topic]) - 1)))

    def poll(self, timeout: float = 0) -> int:
        served, self.pending = self.pending, []
        for callback, msg in served:
            callback(None, msg)
        return len(served)

    def flush(self, timeout: float = 0) -> int:
        while self.pending:
            self.poll()
        return 0

    def __len__(self) -> int:
        return len(self.pending)


def test_publish_produces_records_and_truth_with_offsets(tmp_path: Path) -> None:
    settings = Settings(topic_prefix="t.")
    producer = FakeProducer()
    truth_path = tmp_path / "truth.jsonl"
    mix = parse_fault_spec("default,malformed_missing_fields=0.05,malformed_bytes=0.05")
    report = publish(settings, 21, 400, mix, 0, truth_path=truth_path, start_ms=START_MS,
                     producer=producer)
    receipts_topic, truth_topic = f"t.{RECEIPTS.name}", f"t.{GROUND_TRUTH.name}"
    assert report.receipts == 400 and report.failed == 0
    assert report.per_topic[receipts_topic] == 400 and report.ground_truth == 400
    assert sum(report.per_fault.values()) == 400
    assert report.per_topic[f"t.{MATERIAL_SPECS.name}"] == 40
    truth_codec = codec(GROUND_TRUTH)
    truths = [plain(truth_codec.decode(value)) for _, value in producer.log[truth_topic]]
    assert [json.loads(line) for line in truth_path.read_text().splitlines()] == truths
    receipt_codec = codec(RECEIPTS)
    for (key, _), truth in zip(producer.log[truth_topic], truths, strict=True):
        assert key == truth["subject_id"].encode()
        assert truth["source_topic"] == receipts_topic
        _, value = producer.log[receipts_topic][truth["source_offset"]]
        if truth["fault"].startswith("MALFORMED_") and truth["fault"] != "MALFORMED_IMPOSSIBLE_VALUE":
            with pytest.raises(DecodeError):
                receipt_codec.decode(value)
        else:
            assert receipt_codec.decode(value)["receipt_id"] == truth["subject_id"]
    assert report.per_fault.get("MALFORMED_MISSING_FIELDS", 0) > 0


def test_publish_paces_receipts() -> None:
    t0 = time.monotonic()
    report = publish(Settings(), 2, 30, FaultMix.none(), 200.0, start_ms=START_MS, producer=FakeProducer())
    assert report.receipts == 30
    assert time.monotonic() - t0 >= 30 / 200 * 0.9
