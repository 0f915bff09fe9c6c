"""Governance: pure decisions about what may enter and what may leave the node.

Every function here is pure: ``(request, policy, now) -> Decision``, with no database, clock or
I/O. The policy engine (consent, lawful basis, sharing rules, de-identification) is the
governance issue's work; until it lands, the embedded policy admits every well-formed object
and allows every disclosure to a caller the services already authenticated, and says so in
each decision's rule id, so that the ledger shows which rule made each decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from dicomnode.core.model import Source

EMBEDDED_POLICY_VERSION = "embedded-0"


@dataclass(frozen=True)
class Decision:
    """The answer to one request, with the reason and the rule that gave it."""

    allowed: bool
    reason: str
    rule_id: str
    policy_version: str = EMBEDDED_POLICY_VERSION


@dataclass(frozen=True)
class AdmissionRequest:
    """An object asking to enter: who sent it and whose data it is."""

    source: Source
    patient_id: str
    study_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class DisclosureRequest:
    """Data asking to leave: to whom, by which operation, about which patients and studies."""

    requester: Source
    operation: str  # "find", "move", "get", ...
    destination: str  # AE title or recipient name the data goes to
    patient_ids: tuple[str, ...]
    study_instance_uids: tuple[str, ...]


def admit(request: AdmissionRequest, now: datetime) -> Decision:
    """Whether an arriving object may be processed."""
    return Decision(True, "embedded policy admits every well-formed object", "embedded.admit-all")


def decide(request: DisclosureRequest, now: datetime) -> Decision:
    """Whether data may leave to `request.destination`."""
    return Decision(
        True,
        "embedded policy allows disclosures to authenticated hospital peers",
        "embedded.hospital-peers",
    )
