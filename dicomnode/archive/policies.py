"""Published policy versions and when each came into force (a part of `Registry`)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from dicomnode.archive import schema
from dicomnode.archive.index import Index
from dicomnode.archive.ledger import Ledger
from dicomnode.archive.values import (
    CACHE_SECONDS,
)
from dicomnode.core.errors import InvalidInput
from dicomnode.core.model import (
    LedgerKind,
    PublishedPolicy,
)
from dicomnode.core.times import as_utc


class PolicyRecords:
    """Policy versions: published, cached for every decision, noted in force."""

    index: Index
    ledger: Ledger

    # --- policy versions --------------------------------------------------------------------

    def published_policies(self) -> list[PublishedPolicy]:
        """Every published version (cached for a few seconds: read for every decision)."""
        with self._lock:
            cached, generation = self._policies, self._generation
        if cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS:
            return cached[1]
        self._wakeups.start()  # listening before reading: no change slips in between
        t = schema.policy_versions
        with self.index.read() as conn:
            rows = conn.execute(select(t).order_by(t.c.published_at, t.c.id)).all()
        policies = [
            PublishedPolicy(
                version=r.version,
                source=r.source,
                sha256=r.sha256,
                published_at=as_utc(r.published_at),
                effective_at=as_utc(r.effective_at),
                material=r.material,
                published_by=r.published_by,
            )
            for r in rows
        ]
        with self._lock:
            if generation == self._generation:
                self._policies = (time.monotonic(), policies)
        return policies

    def publish_policy(self, published: PublishedPolicy, detail: dict[str, Any]) -> bool:
        """Record a new version (and its ledger entry); False when that exact version is
        already published. A different text under a published version number is refused."""
        t = schema.policy_versions
        with self.index.write() as conn:
            existing = conn.execute(select(t).where(t.c.version == published.version)).first()
            if existing is not None:
                if existing.sha256 != published.sha256:
                    raise InvalidInput(
                        f"policy version {published.version} is already published with other "
                        "content; published versions are immutable, give the change a new version"
                    )
                return False
            conn.execute(
                t.insert().values(
                    version=published.version,
                    sha256=published.sha256,
                    source=published.source,
                    material=published.material,
                    published_at=published.published_at,
                    effective_at=published.effective_at,
                    published_by=published.published_by,
                )
            )
            self.ledger.append(conn, LedgerKind.POLICY, published.published_by, "published", detail)
        self.forget_cached()
        return True

    def note_in_force(self, version: str, now: datetime, detail: dict[str, Any]) -> bool:
        """Record, once, that `version` came into force (ledger entry); True the first time."""
        t = schema.policy_versions
        with self.index.write() as conn:
            changed = conn.execute(
                update(t)
                .where(t.c.version == version, t.c.activated_at.is_(None))
                .values(activated_at=now)
            ).rowcount
            if changed:
                self.ledger.append(conn, LedgerKind.POLICY, "dicomnode", "in-force", detail)
        return bool(changed)

    def activations(self) -> dict[str, datetime | None]:
        t = schema.policy_versions
        with self.index.read() as conn:
            return {r.version: as_utc(r.activated_at) for r in conn.execute(select(t))}
