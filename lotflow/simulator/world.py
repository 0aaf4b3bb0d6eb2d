"""The simulated plant's suppliers and materials, built deterministically from a seed.

* ~40 materials ``MAT-0001``..: chemicals in KG, liquids in L (each with 1-3 measured
  properties and ``requires_coa``), discrete parts in EA (no properties, no CoA);
* 12 vendors, each supplying ~5 materials and with a reliability that scales its fault
  probability; one vendor degrades over the run (0.5x -> 5x);
* per vendor-material pair a characteristic mean and small std per property (the pair's
  *baseline*): well inside the range for most pairs, close to a limit (with a tight std) for
  a ``near_limit`` fraction of them. Lot values scatter around the baseline with a Student-t
  (``T_DOF`` degrees of freedom) scaled to the baseline std: heavier tails than a normal;
* four other vendors have a behaviour (``Vendor.behaviour``), switched on by the fault mix:
  ``over_ship`` (routinely ships up to 0.9 x the quantity tolerance over), ``other_unit``
  (prints quantities and CoA values in the other, exactly converted unit), ``coa_drift``
  (one property of one of its materials drifts linearly from progress ``DRIFT_START`` to the end of the
  run, up to ``Supply.drift_max_z`` baseline std, staying inside the spec) and
  ``variance_jump`` (from progress ``Vendor.jump_at`` its lots scatter ``JUMP_FACTOR`` x the
  baseline std);
* four more vendors have a *learning* behaviour (``LEARNING_BEHAVIOURS``: patterns the
  pipeline's rules get wrong in either direction, off in the default mix, on in the
  ``learning`` preset), drawn after everything above so the rest of the world is the same
  whether they exist or not:

  - ``agreed_over_ship``: a standing agreement (``Vendor.agreed_over_pct`` = ``AGREED_OVER_PCT``
    = 4 %) lets the vendor over-deliver; it ships ``AGREED_OVER_RANGE`` = 2.3-3.8 % over on a
    share of its lines, beyond the spec's quantity tolerance (the QUANTITY_OVER rule fires) but
    within the agreement: benign (``AGREED_OVER_SHIP``). The agreement is ``max(tolerance,
    4 %)`` per material; lines of a material whose tolerance already reaches 3.8 % are not
    over-shipped (the rule would not fire). The vendor is drawn among those with at least two
    materials whose tolerance is below 3.8 %;
  - ``test_method_change``: at progress ``Vendor.change_at`` (U``METHOD_CHANGE_AT`` = 0.25-0.4)
    the vendor's laboratory changes its method for one property of one of its CoA materials
    (``Supply.method_prop``): from then on that property's values scatter around a new mean
    ``Supply.method_shift_z`` = 3-4.5 baseline std away (upwards unless the spec has no room
    there; the new mean keeps ``METHOD_MARGIN_Z`` std inside the limits, values are always in
    spec). The new mean *is* the pair's baseline after the change (``Supply.baseline``): the
    lots are clean (``TEST_METHOD_CHANGE``);
  - ``trend_clean``: a vendor with a steady high rate of rule-visible faults (its rule
    perturbations are drawn at the behaviour's rate: ~30 % of its receipts end up with a rule
    fault, the pipeline's vendor-trend signal fires on all of them) whose other receipts are
    clean (its silent faults come at the mix's average rate). The degrading vendor reaches
    that regime only near the end of the run (~16 % of its receipts with a rule fault over
    the run, 25 % only from progress ~0.8), so this is a separate, steady vendor;
  - ``coa_comovement``: a silent fault pattern. From the mix's ``coa_comovement_start``
    (default 0.5) the lots of one of its materials with at least two properties
    (``Supply.comove_sign`` set) have *every* property placed ``COMOVE_Z`` = 2-3 baseline std
    from the mean, all in the same direction (``comove_sign``, chosen so each stays
    ``COMOVE_MARGIN_Z`` std inside the limits beyond the largest shift): no single value is
    unusual (< 3.5 std), together they are (``SILENT_COA_COMOVEMENT``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

__all__ = [
    "AGREED_OVER_PCT",
    "AGREED_OVER_RANGE",
    "BEHAVIOURS",
    "COMOVE_Z",
    "DEGRADE_END",
    "DEGRADE_START",
    "DRIFT_START",
    "JUMP_FACTOR",
    "LEARNING_BEHAVIOURS",
    "METHOD_CHANGE_AT",
    "METHOD_SHIFT_Z",
    "T_DOF",
    "Material",
    "PropertyProfile",
    "PropertySpec",
    "Supply",
    "Vendor",
    "World",
    "build_world",
]

DEGRADE_START = 0.5
DEGRADE_END = 5.0
NEAR_LIMIT_BAND = (0.03, 0.08)  # distance of a near-limit mean from the limit, fraction of range
T_DOF = 4  # Student-t degrees of freedom of lot-to-lot CoA noise (scaled to the baseline std)
NEAR_LIMIT_Z = 4.5  # a near-limit pair's mean sits at least this many of its std from the limit
CLASSIC_BEHAVIOURS = ("over_ship", "other_unit", "coa_drift", "variance_jump")
LEARNING_BEHAVIOURS = ("agreed_over_ship", "test_method_change", "trend_clean", "coa_comovement")
BEHAVIOURS = CLASSIC_BEHAVIOURS + LEARNING_BEHAVIOURS
DRIFT_START = 0.15  # progress at which the drifting vendor's values start to move
DRIFT_MAX_Z = 9.0  # largest drift, in baseline std, at the end of the run
DRIFT_MARGIN_Z = 3.0  # the drifted mean stays this many std inside the spec
JUMP_AT = (0.4, 0.6)  # progress range of the variance jump
JUMP_FACTOR = 3.0
AGREED_OVER_PCT = 4.0  # the agreement vendor's standing over-delivery allowance
AGREED_OVER_RANGE = (0.023, 0.038)  # what it over-ships on a line (cumulative deviation)
METHOD_CHANGE_AT = (0.25, 0.4)  # progress range of the test-method change
METHOD_SHIFT_Z = (3.0, 4.5)  # the changed property's new mean, baseline std from the old one
METHOD_MARGIN_Z = 4.0  # the new mean stays this many std inside the spec
COMOVE_Z = (2.0, 3.0)  # each co-moved value's distance from the baseline mean, baseline std
COMOVE_MARGIN_Z = 1.0  # room kept beyond the largest co-moved value, baseline std


@dataclass(frozen=True)
class PropertySpec:
    name: str
    unit: str
    min: float
    max: float
    target: float | None = None

    @property
    def span(self) -> float:
        return self.max - self.min

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "min": self.min, "max": self.max,
                "target": self.target}


@dataclass(frozen=True)
class Material:
    material_id: str
    description: str
    base_unit: str  # KG, L or EA
    requires_coa: bool
    quantity_tolerance_pct: float
    properties: tuple[PropertySpec, ...]
    base_price: float  # per base unit

    def spec_record(self, event_time: int) -> dict[str, Any]:
        """The ERP's ``lotflow.erp.MaterialSpec`` for this material."""
        return {
            "material_id": self.material_id,
            "revision": 0,
            "description": self.description,
            "base_unit": self.base_unit,
            "quantity_tolerance_pct": self.quantity_tolerance_pct,
            "requires_coa": self.requires_coa,
            "properties": [p.record() for p in self.properties],
            "event_time": event_time,
        }


@dataclass(frozen=True)
class PropertyProfile:
    mean: float
    std: float


@dataclass(frozen=True)
class Supply:
    """What one vendor's lots of one material look like."""

    vendor_id: str
    material_id: str
    unit_price: float  # per base unit
    profiles: dict[str, PropertyProfile]  # by property name
    near_limit: bool
    drift_prop: str = ""  # the property that drifts (coa_drift vendor only)
    drift_sign: int = 0
    drift_max_z: float = 0.0  # drift at the end of the run, in baseline std
    method_prop: str = ""  # the property whose test method changes (test_method_change vendor only)
    method_shift_z: float = 0.0  # signed shift of its mean after the change, in baseline std
    comove_sign: int = 0  # direction of the co-moved values (coa_comovement vendor only; 0: not this pair)

    def baseline(self, prop: str, method_changed: bool = False) -> PropertyProfile:
        """The pair's baseline for ``prop``; after a test-method change, the new method's."""
        profile = self.profile(prop)
        if method_changed and prop == self.method_prop:
            return PropertyProfile(profile.mean + self.method_shift_z * profile.std, profile.std)
        return profile

    def drift_z(self, progress: float) -> float:
        """Signed drift of ``drift_prop``'s mean at ``progress``, in baseline std."""
        if not self.drift_prop or progress <= DRIFT_START:
            return 0.0
        return self.drift_sign * self.drift_max_z * min((progress - DRIFT_START) / (1.0 - DRIFT_START), 1.0)

    def profile(self, prop: str) -> PropertyProfile:
        try:
            return self.profiles[prop]
        except KeyError:
            raise KeyError(f"{self.vendor_id}/{self.material_id} has no property {prop!r}") from None


@dataclass(frozen=True)
class Vendor:
    vendor_id: str
    name: str
    lot_prefix: str
    reliability: float  # fault-probability multiplier (1 = the mix's rate)
    volume: float  # relative share of deliveries
    degrading: bool
    materials: tuple[str, ...]
    behaviour: str = ""  # one of BEHAVIOURS, or empty
    jump_at: float = 1.0  # progress of the variance jump (variance_jump vendor only)
    change_at: float = 1.0  # progress of the test-method change (test_method_change vendor only)
    agreed_over_pct: float = 0.0  # standing over-delivery agreement (agreed_over_ship vendor only)

    def agreed_over(self, tolerance: float) -> float:
        """Largest over-delivery (fraction) the vendor's agreement allows on a line of
        ``tolerance`` (fraction): ``max(tolerance, agreement)``, 0 without an agreement."""
        return max(tolerance, self.agreed_over_pct / 100.0) if self.agreed_over_pct else 0.0

    def multiplier(self, progress: float) -> float:
        """Fault-probability multiplier at ``progress`` (0..1) through the run."""
        if self.degrading:
            return DEGRADE_START + (DEGRADE_END - DEGRADE_START) * min(max(progress, 0.0), 1.0)
        return self.reliability


@dataclass(frozen=True)
class World:
    vendors: tuple[Vendor, ...]
    materials: dict[str, Material]
    supplies: dict[tuple[str, str], Supply]  # (vendor_id, material_id)
    unknown_material_ids: tuple[str, ...]  # ids with no spec, for unknown_material faults

    def supply(self, vendor_id: str, material_id: str) -> Supply:
        return self.supplies[(vendor_id, material_id)]


_SOLIDS = (
    "Sodium carbonate", "Citric acid", "Titanium dioxide", "Calcium carbonate", "Zinc oxide",
    "Magnesium stearate", "Sodium chloride", "Potassium sorbate", "Fumed silica",
    "Microcrystalline cellulose", "Stearic acid", "Sodium bicarbonate", "Aluminium hydroxide",
    "Talc", "Kaolin", "Polyethylene pellets",
)
_LIQUIDS = (
    "Ethanol 96%", "Isopropyl alcohol", "Glycerol", "Propylene glycol", "Acetone", "Mineral oil",
    "Silicone fluid", "Epoxy resin", "Acrylic emulsion", "Sodium hypochlorite solution",
)
_PARTS = (
    "Hex bolt M8x30", "Hex nut M8", "Flat washer M8", "O-ring 20x2", "Steel bracket",
    "Drum 200 L", "IBC tote 1000 L", "Wood pallet", "Label roll", "Carton box", "Bearing 6204",
    "Gasket DN50", "Hose clamp 40 mm", "Cable tie 200 mm",
)
_VENDORS = (
    ("Acme Chemicals", "ACM"), ("Borealis Supply", "BOR"), ("Cobalt Industrial", "COB"),
    ("Delta Polymers", "DLT"), ("Everest Minerals", "EVR"), ("Fjord Fluids", "FJD"),
    ("Granite Components", "GRN"), ("Helix Specialty", "HLX"), ("Ionic Materials", "ION"),
    ("Juniper Trading", "JUN"), ("Kestrel Fasteners", "KST"), ("Lumen Solvents", "LUM"),
)
_SOLID_PROPS = ("purity", "moisture", "ash", "particle_size_d50")
_LIQUID_PROPS = ("purity", "density", "viscosity", "water_content")


def _property(rng: random.Random, name: str) -> PropertySpec:
    if name == "purity":
        return PropertySpec("purity", "%", rng.choice((95.0, 97.0, 98.0, 98.5, 99.0, 99.5)), 100.0)
    if name in ("moisture", "water_content"):
        return PropertySpec(name, "%", 0.0, round(rng.uniform(0.2, 1.5), 2))
    if name == "ash":
        return PropertySpec("ash", "%", 0.0, round(rng.uniform(0.05, 0.5), 3))
    if name == "particle_size_d50":
        nominal, width = rng.uniform(5, 200), rng.uniform(0.15, 0.30)
        return PropertySpec(name, "um", round(nominal * (1 - width), 1), round(nominal * (1 + width), 1),
                            round(nominal, 1))
    if name == "density":
        nominal, width = rng.uniform(0.78, 1.6), rng.uniform(0.015, 0.04)
        return PropertySpec("density", "g/cm3", round(nominal * (1 - width), 3),
                            round(nominal * (1 + width), 3), round(nominal, 3))
    if name == "viscosity":
        nominal, width = rng.uniform(1.0, 3000.0), rng.uniform(0.10, 0.25)
        return PropertySpec("viscosity", "cP", round(nominal * (1 - width), 2),
                            round(nominal * (1 + width), 2), round(nominal, 2))
    raise ValueError(f"no template for property {name!r}")


def _materials(rng: random.Random) -> dict[str, Material]:
    kinds = [(name, "KG") for name in _SOLIDS] + [(name, "L") for name in _LIQUIDS]
    kinds += [(name, "EA") for name in _PARTS]
    rng.shuffle(kinds)
    materials: dict[str, Material] = {}
    for n, (description, unit) in enumerate(kinds, start=1):
        if unit == "EA":
            props: tuple[PropertySpec, ...] = ()
            price = rng.uniform(0.1, 500.0)
        else:
            names = rng.sample(_SOLID_PROPS if unit == "KG" else _LIQUID_PROPS, rng.randint(1, 3))
            props = tuple(_property(rng, name) for name in names)
            price = rng.uniform(0.5, 50.0)
        material_id = f"MAT-{n:04d}"
        materials[material_id] = Material(
            material_id=material_id,
            description=description,
            base_unit=unit,
            requires_coa=unit != "EA",
            quantity_tolerance_pct=float(rng.randint(1, 5)),
            properties=props,
            base_price=round(price, 2),
        )
    return materials


def _normal_profile(rng: random.Random, prop: PropertySpec) -> PropertyProfile:
    mean = prop.min + prop.span * rng.uniform(0.3, 0.7)
    return PropertyProfile(mean, prop.span * rng.uniform(0.015, 0.04))


def _near_limit_profile(rng: random.Random, prop: PropertySpec) -> PropertyProfile:
    distance = prop.span * rng.uniform(*NEAR_LIMIT_BAND)
    mean = prop.min + distance if rng.random() < 0.5 else prop.max - distance
    std = min(prop.span * rng.uniform(0.005, 0.012), distance / NEAR_LIMIT_Z)
    return PropertyProfile(mean, std)


def _vendor_materials(rng: random.Random, materials: dict[str, Material]) -> tuple[str, ...]:
    solids = [m.material_id for m in materials.values() if m.base_unit == "KG"]
    first = rng.choice(solids)  # every vendor has a KG chemical: every fault kind applies to it
    others = rng.sample([mid for mid in materials if mid != first], rng.randint(3, 5))
    return tuple(sorted([first, *others]))


def build_world(seed: int, near_limit_fraction: float = 0.15) -> World:
    """The vendors, materials and vendor-material profiles of run ``seed``."""
    rng = random.Random(f"lotflow-world:{seed}")
    materials = _materials(rng)

    volumes = [rng.uniform(0.5, 1.5) for _ in _VENDORS]
    raw = [min(max(rng.lognormvariate(0.0, 0.5), 0.3), 3.0) for _ in _VENDORS]
    degrading = rng.randrange(len(_VENDORS))
    # Scale the others so the volume-weighted mean multiplier over the run is 1: the mix's
    # rates are then the run's overall rates. The degrading vendor averages the mean of its
    # ramp over the part of the run that gets faults (progress 0.1..1).
    ramp_mean = DEGRADE_START + (DEGRADE_END - DEGRADE_START) * 0.55
    others = sum(v * r for i, (v, r) in enumerate(zip(volumes, raw, strict=True)) if i != degrading)
    scale = (sum(volumes) - volumes[degrading] * ramp_mean) / others

    vendors: list[Vendor] = []
    for i, (name, prefix) in enumerate(_VENDORS):
        vendors.append(Vendor(
            vendor_id=f"V-{i + 1:03d}",
            name=name,
            lot_prefix=prefix,
            reliability=1.0 if i == degrading else raw[i] * scale,
            volume=volumes[i],
            degrading=i == degrading,
            materials=_vendor_materials(rng, materials),
        ))

    pairs = [(v.vendor_id, mid) for v in vendors for mid in v.materials]
    coa_pairs = [p for p in pairs if materials[p[1]].properties]
    near = set(rng.sample(coa_pairs, round(near_limit_fraction * len(coa_pairs))))
    supplies: dict[tuple[str, str], Supply] = {}
    for vendor_id, material_id in pairs:
        material = materials[material_id]
        is_near = (vendor_id, material_id) in near
        near_prop = rng.randrange(len(material.properties)) if is_near else -1
        profiles = {
            prop.name: _near_limit_profile(rng, prop) if k == near_prop else _normal_profile(rng, prop)
            for k, prop in enumerate(material.properties)
        }
        supplies[(vendor_id, material_id)] = Supply(
            vendor_id=vendor_id,
            material_id=material_id,
            unit_price=round(material.base_price * rng.uniform(0.85, 1.15), 2),
            profiles=profiles,
            near_limit=is_near,
        )
    # Behaviours go to four distinct vendors other than the degrading one (drawn last, so the
    # rest of the world does not depend on them).
    picked = rng.sample([i for i in range(len(vendors)) if i != degrading], len(CLASSIC_BEHAVIOURS))
    for i, behaviour in zip(picked, CLASSIC_BEHAVIOURS, strict=True):
        jump_at = rng.uniform(*JUMP_AT) if behaviour == "variance_jump" else 1.0
        vendors[i] = replace(vendors[i], behaviour=behaviour, jump_at=jump_at)
        if behaviour == "coa_drift":  # one of its materials drifts
            plans = [((vendors[i].vendor_id, m), plan) for m in vendors[i].materials
                     if (plan := _drift_plan(materials[m], supplies[(vendors[i].vendor_id, m)])) is not None]
            key, (prop, sign, z) = rng.choice(plans)
            supplies[key] = replace(supplies[key], drift_prop=prop, drift_sign=sign, drift_max_z=z)
    _learning_behaviours(rng, vendors, materials, supplies, degrading)
    unknown = tuple(f"MAT-{9000 + n:04d}" for n in range(1, 21))
    return World(tuple(vendors), materials, supplies, unknown)


def _drift_plan(material: Material, supply: Supply) -> tuple[str, int, float] | None:
    """(property, direction, largest drift in std) with the most room inside the spec."""
    best: tuple[str, int, float] | None = None
    for prop in material.properties:
        profile = supply.profile(prop.name)
        for sign, room in ((+1, prop.max - profile.mean), (-1, profile.mean - prop.min)):
            z = min(room / profile.std - DRIFT_MARGIN_Z, DRIFT_MAX_Z)
            if best is None or z > best[2]:
                best = (prop.name, sign, z)
    return best if best is not None and best[2] >= 6.0 else None


def _learning_behaviours(rng: random.Random, vendors: list[Vendor], materials: dict[str, Material],
                         supplies: dict[tuple[str, str], Supply], degrading: int) -> None:
    """Give ``LEARNING_BEHAVIOURS`` to four more vendors (in place), the most constrained first.

    Drawn after every other part of the world, so the world is otherwise the same as
    without them."""
    free = [i for i in range(len(vendors)) if i != degrading and not vendors[i].behaviour]

    def take(candidates: list[int]) -> int:
        i = rng.choice(candidates or free)  # no candidate (never seen): the behaviour does nothing
        free.remove(i)
        return i

    # coa_comovement: a material with >= 2 properties and room for every value on one side
    comove = {i: plans for i in free
              if (plans := [(m, sign) for m in vendors[i].materials
                            for sign in _comove_signs(materials[m], supplies[(vendors[i].vendor_id, m)])])}
    i = take(list(comove))
    vendors[i] = replace(vendors[i], behaviour="coa_comovement")
    if i in comove:
        material_id, sign = rng.choice(comove[i])
        key = (vendors[i].vendor_id, material_id)
        supplies[key] = replace(supplies[key], comove_sign=sign)

    # test_method_change: one property of one CoA material with room for the shifted mean
    z = rng.uniform(*METHOD_SHIFT_Z)
    method = {i: options for i in free
              if (options := [(m, prop, sign) for m in vendors[i].materials
                              for prop, sign in _method_plans(materials[m], supplies[(vendors[i].vendor_id, m)], z)])}
    i = take(list(method))
    vendors[i] = replace(vendors[i], behaviour="test_method_change", change_at=rng.uniform(*METHOD_CHANGE_AT))
    if i in method:
        material_id, prop, sign = rng.choice(method[i])
        key = (vendors[i].vendor_id, material_id)
        supplies[key] = replace(supplies[key], method_prop=prop, method_shift_z=sign * z)

    # agreed_over_ship: at least two materials whose tolerance an agreed over-shipment exceeds
    agreed = [i for i in free
              if sum(materials[m].quantity_tolerance_pct / 100.0 < AGREED_OVER_RANGE[1]
                     for m in vendors[i].materials) >= 2]
    i = take(agreed)
    vendors[i] = replace(vendors[i], behaviour="agreed_over_ship", agreed_over_pct=AGREED_OVER_PCT)

    i = take(list(free))
    vendors[i] = replace(vendors[i], behaviour="trend_clean")


def _room(prop: PropertySpec, profile: PropertyProfile, sign: int) -> float:
    """Distance from the mean to the limit on side ``sign``, in the profile's std."""
    return ((prop.max - profile.mean) if sign > 0 else (profile.mean - prop.min)) / profile.std


def _comove_signs(material: Material, supply: Supply) -> list[int]:
    """Directions in which every property of ``material`` has room for a co-moved value."""
    if len(material.properties) < 2:
        return []
    return [sign for sign in (+1, -1)
            if all(_room(p, supply.profile(p.name), sign) >= COMOVE_Z[1] + COMOVE_MARGIN_Z
                   for p in material.properties)]


def _method_plans(material: Material, supply: Supply, z: float) -> list[tuple[str, int]]:
    """(property, direction) a test-method shift of ``z`` std can take: upwards when the
    spec has room there, else downwards."""
    plans = []
    for prop in material.properties:
        profile = supply.profile(prop.name)
        for sign in (+1, -1):
            if _room(prop, profile, sign) >= z + METHOD_MARGIN_Z:
                plans.append((prop.name, sign))
                break
    return plans
