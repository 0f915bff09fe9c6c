"""What the way out hands a transport (DIMSE C-STORE to a peer, STOW-RS to a URL) and what the
transport reports back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom.dataset import Dataset

from dicomnode.core.enums import TransportKind, coerce


@dataclass(frozen=True)
class SendReport:
    """What a transport did with the files it was handed."""

    sent: list[str] = field(default_factory=list)  # SOP Instance UIDs the recipient accepted
    failed: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> reason

    @property
    def complete(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class Target:
    """Where a delivery goes: a configured DIMSE peer, or a DICOMweb STOW-RS endpoint."""

    transport: TransportKind  # dimse or stow; a string is coerced
    name: str
    peer: Any = None  # config.Peer for "dimse"
    url: str = ""  # for "stow"

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "transport", coerce(TransportKind, self.transport, "Target.transport")
        )


@dataclass(frozen=True)
class SendItem:
    """One object to send: what it is (for negotiation) and how to load it when its turn
    comes (so that a large study never sits in memory)."""

    sop_instance_uid: str  # as stored; reports name objects by it
    sop_class_uid: str
    transfer_syntax_uid: str
    load: Callable[[], Dataset]


class Transport(Protocol):
    def send(self, target: Target, items: Sequence[SendItem]) -> SendReport:
        """Send every item to `target`; report each by its stored SOP Instance UID."""
