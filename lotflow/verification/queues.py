"""Who looks at an exception: reason classes and the specialist queue (role) of each.

Every node routes by the class of its exception's most severe reason, so one plant-wide table
decides which specialist sees what, whatever node raised it: material and spec problems go to
Supplier Quality, documents and PO problems to Receiving, measurements to a QC technician, cost
and price to an Operations analyst, process problems to Manufacturing Engineering.
"""

from __future__ import annotations

from enum import StrEnum

from lotflow.verification.node import Route

__all__ = ["QUEUE_OF_CLASS", "Queue", "ReasonClass", "route"]


class Queue(StrEnum):
    RECEIVING = "receiving"
    SUPPLIER_QUALITY = "supplier_quality"
    QC_TECHNICIAN = "qc_technician"
    OPERATIONS_ANALYST = "operations_analyst"
    MANUFACTURING_ENGINEERING = "manufacturing_engineering"

    @property
    def title(self) -> str:  # type: ignore[override]
        return _TITLES[self]


_TITLES = {
    Queue.RECEIVING: "Receiving",
    Queue.SUPPLIER_QUALITY: "Supplier Quality",
    Queue.QC_TECHNICIAN: "QC technician",
    Queue.OPERATIONS_ANALYST: "Operations analyst",
    Queue.MANUFACTURING_ENGINEERING: "Manufacturing Engineering",
}


class ReasonClass(StrEnum):
    MATERIAL = "material"
    SPEC = "spec"
    DOCUMENTS = "documents"
    PURCHASE_ORDER = "po"
    MEASUREMENT = "measurement"
    COST = "cost"
    PROCESS = "process"


QUEUE_OF_CLASS: dict[ReasonClass, Queue] = {
    ReasonClass.MATERIAL: Queue.SUPPLIER_QUALITY,
    ReasonClass.SPEC: Queue.SUPPLIER_QUALITY,
    ReasonClass.DOCUMENTS: Queue.RECEIVING,
    ReasonClass.PURCHASE_ORDER: Queue.RECEIVING,
    ReasonClass.MEASUREMENT: Queue.QC_TECHNICIAN,
    ReasonClass.COST: Queue.OPERATIONS_ANALYST,
    ReasonClass.PROCESS: Queue.MANUFACTURING_ENGINEERING,
}


def route(reason_class: ReasonClass, action: str) -> Route:
    """The route of a reason of this class: its class's queue, with the default next step."""
    return Route(QUEUE_OF_CLASS[reason_class].value, action)
