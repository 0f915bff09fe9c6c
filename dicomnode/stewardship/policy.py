"""Publishing policy versions and reporting which one is in force."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime

from dicomnode import governance
from dicomnode.core.model import (
    PublishedPolicy,
)
from dicomnode.governance import approvals, audit_events, notice
from dicomnode.stewardship.base import StewardshipBase

log = logging.getLogger("dicomnode.stewardship")


@dataclass(frozen=True)
class PolicyStatus:
    """The version in force and the ones scheduled, as the DPO sees them."""

    in_force: governance.Policy
    in_force_since: datetime | None  # None: the embedded policy
    scheduled: list[PublishedPolicy]
    published: list[PublishedPolicy]


class PolicyOps(StewardshipBase):
    """Policy publication (notice periods, four-eyes, ledgered classification)."""

    def publish_policy(
        self, source: str, by: str, reason: str = ""
    ) -> tuple[PublishedPolicy, bool]:
        """Publish the policy in `source` now. A narrowing of the policy in force takes effect
        at once; the first version replacing the embedded one, published with the reason
        "initial-deployment", at its effective_from (at once when that has passed); any other
        at its effective_from, but not before its notice period (7 days, 30 when material) has
        run. The classification and the reason are ledgered. Returns the published version and
        whether it is new (publishing the same version again changes nothing). Raises
        PolicyError for a policy that cannot be used, ValueError for a misused reason."""
        policy = governance.parse_policy(source)
        now = self.clock()
        self.archive.registry.forget_cached()
        already = self.archive.registry.published_policies()
        same = next((p for p in already if p.version == policy.version), None)
        if same is not None and same.source == source:
            return same, False
        schedule = notice.schedule_publication(already, policy, now, reason)
        self._four_eyes(
            approvals.PUBLISH_POLICY,
            {"source": source, "reason": reason},
            f"publish policy {policy.version} ({schedule.change.kind})",
            schedule.change.kind,
        )
        published = PublishedPolicy(
            version=policy.version,
            source=source,
            sha256=hashlib.sha256(source.encode()).hexdigest(),
            published_at=now,
            effective_at=schedule.effective_at,
            material=policy.material,
            published_by=by,
        )
        detail = {
            "version": policy.version,
            "sha256": published.sha256,
            "material": policy.material,
            "change": schedule.change.kind,
            "widens": list(schedule.change.widens),
            "compared_with": governance.policy_in_force(already, now).version,
            "notice_days": (published.effective_at - now).days,
            "reason": schedule.reason,
            "initial_deployment": schedule.initial_deployment,
            "effective_from": policy.effective_from.isoformat(),
            "effective_at": published.effective_at.isoformat(),
            "published_at": now.isoformat(),
        }
        new = self.archive.registry.publish_policy(published, detail)
        if not new:
            existing = next(
                p for p in self.archive.registry.published_policies() if p.version == policy.version
            )
            return existing, False
        if self.audit is not None and self.audit.source is not None:
            what = (
                f"governance policy {policy.version} published; in force from "
                f"{published.effective_at.isoformat()}"
            )
            self.audit.submit(
                lambda: audit_events.configuration_changed(by, what, now, self.audit.source)
            )
        log.info(
            "policy %s published; in force from %s",
            policy.version,
            published.effective_at.isoformat(),
            extra={"event": "policy", **detail},
        )
        return published, True

    def policy_status(self) -> PolicyStatus:
        now = self.clock()
        published = self.archive.registry.published_policies()
        in_force = governance.policy_in_force(published, now)
        since = max(
            (p.effective_at for p in published if p.version in in_force.versions), default=None
        )
        return PolicyStatus(in_force, since, governance.scheduled(published, now), published)
