"""Which transport an association may come over, and which certificate an AE title must show
(governance checklist item 43; DICOM PS3.15 B.1, the TLS secure transport profile).

- Plain TCP is accepted only from ``[dimse] plain_networks`` (by default every network
  without ``[dimse.tls]`` and none with it), judged by the client's real address (after a
  balancer's PROXY v2 header); from elsewhere an association must come over TLS.
- A ``[[peers]]`` entry with ``certificate_name`` and/or ``certificate_fingerprint`` binds its AE
  title to a client certificate: that AE title is accepted only over TLS with a certificate
  that matches (a verified subject CN or subjectAltName value, the SHA-256 fingerprint of the
  certificate itself), and a certificate bound to other AE titles is accepted only with one
  of theirs.

A refusal is an A-ASSOCIATE-RJ (rejected-permanent, source DICOM UL service-user; reason
calling-AE-title-not-recognized for a binding, no-reason-given for plain TCP), which the
node logs and audits as a 110113 Security Alert (Node Authentication).
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dicomnode.config import DimseSettings, Peer
from dicomnode.core.addresses import AddressSet

NO_REASON_GIVEN = 0x01  # A-ASSOCIATE-RJ reasons, source 1: DICOM UL service-user (PS3.8 9.3.4)
CALLING_AE_NOT_RECOGNIZED = 0x03


@dataclass(frozen=True)
class ClientCertificate:
    """The certificate a TLS client presented: its verified subject CNs and subjectAltName
    values (compared case-insensitively), and its SHA-256 fingerprint (lower-case hex)."""

    names: frozenset[str]
    sha256: str

    @classmethod
    def of(cls, connection: Any) -> ClientCertificate | None:
        """The client certificate of `connection` (None: plain TCP, or TLS without one)."""
        if not isinstance(connection, ssl.SSLSocket):
            return None
        der = connection.getpeercert(binary_form=True)
        if not der:
            return None
        info = connection.getpeercert() or {}  # filled only for a certificate verified by CA
        subject = [pair for rdn in info.get("subject", ()) for pair in rdn]
        names = [value for key, value in subject if key == "commonName"]
        names += [value for _kind, value in info.get("subjectAltName", ())]
        return cls(frozenset(n.strip().casefold() for n in names), hashlib.sha256(der).hexdigest())


@dataclass(frozen=True)
class Refusal:
    """Why an association is refused: its `kind` (security alerts are aggregated per source
    and kind), the `reason` logged and audited, and the A-ASSOCIATE-RJ `diagnostic`."""

    kind: str
    reason: str
    diagnostic: int


def _matches(peer: Peer, certificate: ClientCertificate) -> bool:
    """Whether `certificate` is the one `peer`'s AE title is bound to (every bound part)."""
    if peer.certificate_name and peer.certificate_name.casefold() not in certificate.names:
        return False
    return not peer.certificate_fingerprint or peer.certificate_fingerprint == certificate.sha256


class Admission:
    """Decides, when an A-ASSOCIATE-RQ arrives, whether its transport and certificate fit."""

    def __init__(self, dimse: DimseSettings, peers: Iterable[Peer]) -> None:
        self.plain_from = AddressSet(dimse.plain_tcp_from)
        self.bound = tuple(p for p in peers if p.certificate_bound)

    @property
    def asks_for_certificates(self) -> bool:
        """Whether the TLS listener must ask clients for their certificate."""
        return bool(self.bound)

    def check(
        self, calling: str, address: str, tls: bool, certificate: ClientCertificate | None
    ) -> Refusal | None:
        """None when `calling` (the calling AE title) at `address` may associate over this
        transport with this certificate, else why not."""
        if not tls and address not in self.plain_from:
            return Refusal(
                "plain-tcp",
                f"plain TCP from {address}, outside dimse.plain_networks: TLS is required",
                NO_REASON_GIVEN,
            )
        peer = next((p for p in self.bound if p.ae_title == calling), None)
        if peer is not None:
            if certificate is None:
                how = "over TLS without a client certificate" if tls else "over plain TCP"
                return Refusal(
                    "certificate-missing",
                    f"{calling} is bound to a client certificate and came {how}",
                    CALLING_AE_NOT_RECOGNIZED,
                )
            if not _matches(peer, certificate):
                return Refusal(
                    "certificate-mismatch",
                    f"{calling} is bound to another client certificate "
                    f"(presented SHA-256 {certificate.sha256})",
                    CALLING_AE_NOT_RECOGNIZED,
                )
            return None
        if certificate is not None:
            owners = sorted(p.ae_title for p in self.bound if _matches(p, certificate))
            if owners:
                return Refusal(
                    "certificate-bound-elsewhere",
                    f"the client certificate is bound to {', '.join(owners)}, not {calling}",
                    CALLING_AE_NOT_RECOGNIZED,
                )
        return None
