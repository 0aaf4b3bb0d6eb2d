"""Every topic lotflow reads or writes, declared once.

Topics that a node joins share ``settings.partitions`` (co-partitioned) and are keyed by
the node's join key; `lotflow topics create` creates all of them idempotently.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from lotflow.settings import Settings

__all__ = ["TOPICS", "Cleanup", "TopicSpec", "topic_by_name"]

DAY_MS = 24 * 3600 * 1000


class Cleanup(StrEnum):
    DELETE = "delete"
    COMPACT = "compact"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    key: str
    schema: str  # full Avro name of the value, file schemas/avro/<schema>.avsc
    cleanup: Cleanup = Cleanup.DELETE
    retention_ms: int = 7 * DAY_MS
    co_partitioned: bool = True  # False: a single partition (ground truth, reference data)

    def full_name(self, settings: Settings) -> str:
        return settings.topic(self.name)

    def partitions(self, settings: Settings) -> int:
        return settings.partitions if self.co_partitioned else 1

    def config(self) -> dict[str, str]:
        cfg = {"cleanup.policy": self.cleanup.value}
        if self.cleanup is Cleanup.DELETE:
            cfg["retention.ms"] = str(self.retention_ms)
        return cfg


PURCHASE_ORDERS = TopicSpec("erp.purchase-orders", "po_number", "lotflow.erp.PurchaseOrder", Cleanup.COMPACT)
MATERIAL_SPECS = TopicSpec("erp.material-specs", "material_id", "lotflow.erp.MaterialSpec", Cleanup.COMPACT)
SUPPLIER_INVOICES = TopicSpec("erp.supplier-invoices", "po_number", "lotflow.erp.SupplierInvoice")
BOMS = TopicSpec("erp.boms", "product_id", "lotflow.erp.BillOfMaterials", Cleanup.COMPACT)
RECEIPTS = TopicSpec("plant.receipts", "po_number", "lotflow.plant.Receipt")
CERTIFICATES = TopicSpec("plant.certificates-of-analysis", "po_number", "lotflow.plant.CertificateOfAnalysis")
QC_RESULTS = TopicSpec("plant.qc-results", "lot_id", "lotflow.plant.QcResult")
PRODUCTION_RECORDS = TopicSpec("plant.production-records", "work_order", "lotflow.plant.ProductionRecord")
LABOR_CLOCK = TopicSpec("plant.labor-clock", "work_order", "lotflow.plant.LaborClockEvent")
SHIPMENTS = TopicSpec("plant.shipments", "shipment_id", "lotflow.plant.Shipment")
ASSET_STATUS = TopicSpec("plant.asset-status", "asset_id", "lotflow.plant.AssetStatus", Cleanup.COMPACT)

VERIFIED = TopicSpec("lotflow.verified", "subject_key", "lotflow.verification.VerifiedRecord", retention_ms=30 * DAY_MS)
EXCEPTIONS = TopicSpec(
    "lotflow.exceptions", "subject_key", "lotflow.verification.ExceptionRecord", retention_ms=30 * DAY_MS
)
AUDIT = TopicSpec("lotflow.audit", "subject_key", "lotflow.verification.AuditRecord", retention_ms=365 * DAY_MS)
LOT_EVENTS = TopicSpec("lotflow.lot-events", "lot_id", "lotflow.verification.LotEvent", retention_ms=365 * DAY_MS)
DECISIONS = TopicSpec(
    "lotflow.decisions", "subject_key", "lotflow.verification.HumanDecision", retention_ms=365 * DAY_MS
)
DEAD_LETTERS = TopicSpec(
    "lotflow.dead-letters", "original key", "lotflow.verification.DeadLetter", retention_ms=30 * DAY_MS
)

# What the confidence models learn from (see lotflow.verification.Label): one partition, so every
# worker replica applies the same labels in the same order; kept forever, because a restarted
# worker replays the labels after its last checkpoint (retention.ms=-1: no time limit).
LABELS = TopicSpec("lotflow.labels", "node", "lotflow.verification.Label", retention_ms=-1, co_partitioned=False)
# A node's learnt state after the labels up to an offset; compacted: the latest per node.
MODEL_CHECKPOINTS = TopicSpec(
    "lotflow.model-checkpoints", "node", "lotflow.verification.ModelCheckpoint", Cleanup.COMPACT, co_partitioned=False
)

GROUND_TRUTH = TopicSpec("sim.ground-truth", "subject_id", "lotflow.sim.GroundTruth", co_partitioned=False)

INPUTS = (
    PURCHASE_ORDERS,
    MATERIAL_SPECS,
    SUPPLIER_INVOICES,
    BOMS,
    RECEIPTS,
    CERTIFICATES,
    QC_RESULTS,
    PRODUCTION_RECORDS,
    LABOR_CLOCK,
    SHIPMENTS,
    ASSET_STATUS,
)
OUTPUTS = (VERIFIED, EXCEPTIONS, AUDIT, LOT_EVENTS, DEAD_LETTERS)
LEARNING = (LABELS, MODEL_CHECKPOINTS)  # the models' labels and checkpoints (not decision outputs)
TOPICS: tuple[TopicSpec, ...] = (*INPUTS, *OUTPUTS, DECISIONS, *LEARNING, GROUND_TRUTH)


def topic_by_name(name: str) -> TopicSpec:
    for spec in TOPICS:
        if spec.name == name:
            return spec
    raise KeyError(f"no topic declared as {name!r}")
