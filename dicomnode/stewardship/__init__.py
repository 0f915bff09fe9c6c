"""The DPO's and the data subjects' operations: publishing policy versions, recording consent,
restricting processing, signing ledger checkpoints.

Each operation asks governance what it means (which version takes effect when, which queued
work a withdrawal cancels) and has the archive record it with its ledger entry in one
transaction. The CLI and the /governance API both call these, so there is one way to do each.
"""

from __future__ import annotations

from dicomnode.stewardship.base import SubjectOutcome
from dicomnode.stewardship.checkpoints import CheckpointOps, checkpoint_signed_by
from dicomnode.stewardship.consent import CONSENT_STATES, ConsentOps
from dicomnode.stewardship.erasure import ErasureOps
from dicomnode.stewardship.policy import PolicyOps, PolicyStatus
from dicomnode.stewardship.retention import SweepReport

__all__ = [
    "CONSENT_STATES",
    "PolicyStatus",
    "Stewardship",
    "SubjectOutcome",
    "SweepReport",
    "checkpoint_signed_by",
]


class Stewardship(PolicyOps, ConsentOps, ErasureOps, CheckpointOps):
    """The DPO's and the data subjects' operations, one room: policy (policy.py), consent,
    restriction and holds (consent.py), retention (retention.py), erasure and deletion on
    request (erasure.py), ledger checkpoints (checkpoints.py)."""
