"""The closed vocabularies that were bare strings: who asks, how a delivery travels, the states
of jobs and deliveries, what a duplicate does.

Each is a StrEnum, so a member compares equal to its string and is written to the index, the
ledger and JSON exactly as the string was. `coerce` turns a value into a member or raises a
ValueError that names the field (a constructor returns a valid object or says which field is
wrong).
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

E = TypeVar("E", bound=StrEnum)


def coerce(kind: type[E], value: object, field: str) -> E:
    """`value` as a member of `kind`, or ValueError naming `field` and the allowed values."""
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(member.value for member in kind)
        raise ValueError(f"{field}: must be one of {allowed}; got {value!r}") from None


class Protocol(StrEnum):
    """How a request or an object reached the node (`Source.protocol`)."""

    DIMSE = "dimse"
    DICOMWEB = "dicomweb"
    ANALYSIS = "analysis"  # the node's own analysis results
    CLI = "cli"  # the dicomnode command (shares, imports)
    DPO_PAGES = "dpo-pages"  # the DPO's web pages
    RECOVERY = "recovery"  # filed again at start from what a crash left
    APPROVAL = "approval"  # a change carried out once a second person approved it
    SHARE_LINK = "share-link"  # a second opinion's link (its reads are retrievals)


class TransportKind(StrEnum):
    """How a delivery reaches its target (`Target.transport`)."""

    DIMSE = "dimse"  # C-STORE to a configured peer
    STOW = "stow"  # DICOMweb STOW-RS


class JobState(StrEnum):
    """An analysis job's state."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    # awaiting governance: not allowed now (consent missing, processing restricted); runs again
    # when that changes (stored and shown as "held"; neither quarantine nor a legal hold)
    AWAITING_GOVERNANCE = "held"
    CANCELLED = "cancelled"  # consent withdrawn or refused
    NOT_APPLICABLE = "not-applicable"  # the unit does not fit the analyzer clinically


class DeliveryState(StrEnum):
    """A queued delivery's state (a forward of results, a share)."""

    QUEUED = "queued"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    DENIED = "denied"
    CANCELLED = "cancelled"


class DuplicatePolicy(StrEnum):
    """What a DIFFERENT object under a stored SOP Instance UID does (an identical re-send
    always succeeds and stores nothing new)."""

    REJECT = "reject"  # refused (0x0111), the stored object kept
    REPLACE = "replace"  # the new object replaces the stored one
