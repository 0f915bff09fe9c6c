"""The only way data leaves the node: load, ask governance, record, then hand it out.

Three parts: `gate` (the decision point every disclosure asks, with its ledger entry before any
data moves), `deliveries` (the outbox of forwards and shares, with retries) and `export` (a data
subject's copy). `Egress` is the one object the services hold.
"""

from __future__ import annotations

from dicomnode.egress.deliveries import DELIVERY_LEASE, Deliveries
from dicomnode.egress.export import SubjectExport
from dicomnode.egress.gate import Gate, refusal_message
from dicomnode.egress.retained import RetainedAccess
from dicomnode.egress.transport import SendItem, SendReport, Target, Transport


class Egress(Deliveries, SubjectExport, RetainedAccess):
    """The way out: the gate, the delivery worker, the data-subject export and the legal
    access to data retained by law."""


__all__ = [
    "DELIVERY_LEASE",
    "Egress",
    "Gate",
    "SendItem",
    "SendReport",
    "Target",
    "Transport",
    "refusal_message",
]
