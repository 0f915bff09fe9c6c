"""Recipients' copies (checklist item 29): which recipients hold copies of which studies (the
ledger's one rule, `LedgerViews.copies_by_study`), what each promised (the policy's
``recipients[].retention``), destruction confirmations the DPO records, overdue copies; and the
notices an erasure or a consent withdrawal owes each recipient holding copies, queued from the
ledger entry that caused them (`sync_notices`, run when the DPO's page or command reads them)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from dicomnode.archive.ledger_views import LedgerViews
from dicomnode.archive.recipient_copies import RecipientCopyStore
from dicomnode.core.errors import InvalidInput
from dicomnode.governance import recipient_copies as rules

COPY_KINDS = ("transfer", "disclosure")


class RecipientCopies:
    def __init__(self, stewardship: Any) -> None:
        self.stewardship = stewardship
        self.archive = stewardship.archive
        self.store = RecipientCopyStore(self.archive.index, self.archive.ledger)
        self.views = LedgerViews(self.archive.index)

    def _copies(self, studies: set[str]) -> dict[str, list[dict[str, Any]]]:
        return self.views.copies_by_study(studies)

    def status(self) -> list[rules.CopyStatus]:
        """Every copy a recipient holds, with its promised retention and state."""
        studies = {
            s
            for e in self.archive.ledger.entries()
            if e.kind in COPY_KINDS
            for s in e.data.get("study_instance_uids") or ()
        }
        copies = [
            (c["recipient"], study, datetime.fromisoformat(str(c["last_at"])))
            for study, held in self._copies(studies).items()
            for c in held
        ]
        policy = self.stewardship.policy_status().in_force
        promised = {r.id: r.retention for r in policy.recipients if r.retention}
        now = self.stewardship.clock()
        return rules.copy_status(copies, promised, self.store.confirmations(), now)

    def confirm(
        self, recipient: str, study_uid: str, confirmed_at: datetime | None, evidence: str, by: str
    ) -> None:
        if not recipient.strip() or not study_uid.strip():
            raise InvalidInput("a confirmation names the recipient and the study")
        now = self.stewardship.clock()
        self.store.confirm(
            recipient.strip(), study_uid.strip(), confirmed_at or now, evidence, by, now
        )

    def sync_notices(self) -> int:
        """Queue the notices owed by erasures and withdrawals recorded since the last one
        queued; how many were queued."""
        queued, now = 0, self.stewardship.clock()
        for entry in self.archive.ledger.entries(after=self.store.last_source()):
            for notice in self._owed(entry):
                queued += self.store.queue(entry.seq, notice, now)
        return queued

    def _owed(self, entry: Any) -> list[dict[str, object]]:
        data = entry.data
        if data.get("operation") == "erase" and data.get("recipients_with_copies"):
            held: dict[str, list[str]] = {}
            for copy in data.get("recipients_with_copies") or ():
                held.setdefault(str(copy.get("recipient", "")), []).extend(
                    data.get("study_instance_uids") or ()
                )
            patient = (data.get("patient_ids") or [""])[0]
            return rules.notices_owed("erasure", patient, held)
        if entry.kind == "consent" and entry.outcome == "withdrawn":
            patient = str(data.get("patient_id", ""))
            mine = {
                i.study_instance_uid
                for i in self.archive.find_instances_exactly(
                    (("PatientID", patient),), include_retained=True
                )
            }
            held = {}
            for study, copies in self._copies(mine).items():
                for copy in copies:
                    held.setdefault(copy["recipient"], []).append(study)
            return rules.notices_owed("withdrawal", patient, held)
        return []

    def notices(self) -> list[dict[str, Any]]:
        self.sync_notices()
        return self.store.notices()

    def notice_sent(self, notice_id: int, by: str) -> None:
        self.store.sent(notice_id, by, self.stewardship.clock())
