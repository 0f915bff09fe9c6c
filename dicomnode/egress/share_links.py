"""Share links for a second opinion (item 42) on the way out: the DPO creates a link to one
study for a recipient of the policy; whoever holds it retrieves that study's instances while it
is open. Every retrieval asks governance for the link's recipient (consent, lawful basis, as for
any disclosure), so the gate's ledger entry records each use; the link's last use is kept."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import datetime
from typing import Any

from dicomnode.archive.share_links import ShareLink, ShareLinkStore
from dicomnode.core.errors import InvalidInput, NotFound, NotPermitted
from dicomnode.core.model import Level, Source, StoredInstance
from dicomnode.core.uids import validate_uid
from dicomnode.governance import Party
from dicomnode.governance import share_links as rules

OPERATION = "wado"


class ShareLinks:
    """Create, open and revoke share links over the node's egress."""

    def __init__(self, egress: Any, clock: Callable[[], datetime]) -> None:
        self.egress = egress
        self.store = ShareLinkStore(egress.archive.index, egress.archive.ledger)
        self.clock = clock

    def create(
        self, study_uid: str, recipient: str, by: str, days: int = rules.DEFAULT_DAYS
    ) -> tuple[str, ShareLink]:
        """A new link; the token is returned once and never stored."""
        study_uid = validate_uid(study_uid.strip(), "StudyInstanceUID")
        policy = self.egress.policy()
        if not recipient.strip() or not any(part.recipient(recipient) for part in policy.parts):
            raise InvalidInput(f"{recipient!r} is not a recipient of the policy in force")
        instances = self.egress.archive.find_instances_exactly((("StudyInstanceUID", study_uid),))
        if not instances:
            raise NotFound(f"no study {study_uid}")
        now = self.clock()
        try:
            expires = rules.expiry(now, days)
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        token = secrets.token_urlsafe(rules.TOKEN_BYTES)
        link = self.store.create(
            rules.token_hash(token),
            study_uid,
            recipient.strip(),
            by,
            now,
            expires,
            sorted({i.patient_id for i in instances}),
        )
        return token, link

    def open(
        self, token: str, study_uid: str, sop_uid: str = "", address: str = ""
    ) -> list[StoredInstance]:
        """The study's instances (or its one instance `sop_uid`) for the link's holder, once
        the link is open and governance allows the disclosure to the link's recipient
        (NotPermitted otherwise: unknown, expired, revoked, another study, or refused)."""
        link = self.store.by_hash(rules.token_hash(token)) if rules.well_formed(token) else None
        if link is None:
            raise NotPermitted("no such share link")
        closed = rules.why_closed(
            link.expires_at, link.revoked_at, link.study_instance_uid, study_uid, self.clock()
        )
        if closed:
            raise NotPermitted(closed)
        requester = Source("share-link", link.ref, address)
        keys: tuple[tuple[str, str], ...] = (("StudyInstanceUID", link.study_instance_uid),)
        if sop_uid:
            keys += (("SOPInstanceUID", validate_uid(sop_uid, "SOPInstanceUID")),)
        instances = self.egress.retrieve(
            Level.IMAGE if sop_uid else Level.STUDY,
            keys,
            requester,
            OPERATION,
            recipient=Party("share-link", recipient_id=link.recipient),
            service="share link",
        )
        self.store.used(link.id, self.clock())
        return instances

    def revoke(self, link_id: int, by: str) -> ShareLink:
        return self.store.revoke(link_id, by, self.clock())

    def links(self) -> list[ShareLink]:
        return self.store.links()
