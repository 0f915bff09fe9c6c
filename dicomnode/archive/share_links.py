"""Share links in the index: only each token's SHA-256, the study, the recipient, expiry,
revocation and the last use. Creation and revocation are written with their ledger entry (kind
``share_link``) in one transaction; each use is counted here (the disclosure it makes is the
gate's ledger entry)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from dicomnode.archive.index import Index
from dicomnode.archive.ledger import Ledger
from dicomnode.archive.oversight_schema import share_links
from dicomnode.core.errors import NotFound

SHARE_LINK_KIND = "share_link"


@dataclass(frozen=True)
class ShareLink:
    id: int
    study_instance_uid: str
    recipient: str
    created_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    revoked_by: str | None
    last_used_at: datetime | None
    uses: int

    @property
    def ref(self) -> str:
        return f"share-link-{self.id}"


def _link(row: Any) -> ShareLink:
    return ShareLink(
        row.id,
        row.study_instance_uid,
        row.recipient,
        row.created_by,
        row.created_at,
        row.expires_at,
        row.revoked_at,
        row.revoked_by,
        row.last_used_at,
        row.uses,
    )


class ShareLinkStore:
    def __init__(self, index: Index, ledger: Ledger) -> None:
        self.index = index
        self.ledger = ledger

    def create(
        self,
        token_sha256: str,
        study_uid: str,
        recipient: str,
        by: str,
        now: datetime,
        expires_at: datetime,
        patient_ids: list[str],
    ) -> ShareLink:
        t = share_links
        with self.index.write() as conn:
            new_id = conn.execute(
                t.insert().values(
                    token_sha256=token_sha256,
                    study_instance_uid=study_uid,
                    recipient=recipient,
                    created_by=by,
                    created_at=now,
                    expires_at=expires_at,
                )
            ).inserted_primary_key[0]
            self.ledger.append(
                conn,
                SHARE_LINK_KIND,
                by,
                "created",
                {
                    "link": f"share-link-{new_id}",
                    "recipient": recipient,
                    "patient_ids": patient_ids,
                    "study_instance_uids": [study_uid],
                    "expires_at": expires_at.isoformat(),
                },
            )
        return self.get(int(new_id))

    def get(self, link_id: int) -> ShareLink:
        with self.index.read() as conn:
            row = conn.execute(select(share_links).where(share_links.c.id == link_id)).first()
        if row is None:
            raise NotFound(f"no share link {link_id}")
        return _link(row)

    def by_hash(self, token_sha256: str) -> ShareLink | None:
        with self.index.read() as conn:
            row = conn.execute(
                select(share_links).where(share_links.c.token_sha256 == token_sha256)
            ).first()
        return _link(row) if row else None

    def links(self, limit: int = 500) -> list[ShareLink]:
        with self.index.read() as conn:
            rows = conn.execute(select(share_links).order_by(share_links.c.id.desc()).limit(limit))
            return [_link(r) for r in rows]

    def used(self, link_id: int, now: datetime) -> None:
        t = share_links
        with self.index.write() as conn:
            conn.execute(
                update(t).where(t.c.id == link_id).values(last_used_at=now, uses=t.c.uses + 1)
            )

    def revoke(self, link_id: int, by: str, now: datetime) -> ShareLink:
        t = share_links
        with self.index.write() as conn:
            changed = conn.execute(
                update(t)
                .where(t.c.id == link_id, t.c.revoked_at.is_(None))
                .values(revoked_at=now, revoked_by=by)
            ).rowcount
            if changed:
                self.ledger.append(
                    conn, SHARE_LINK_KIND, by, "revoked", {"link": f"share-link-{link_id}"}
                )
        return self.get(link_id)
