"""The legal-access way out (PIPA 21(3), checklist item 33): the one way to read a study
retained by law; governance (`retained_access.legal_access`) decides, the ledger records."""

from __future__ import annotations

import uuid

from dicomnode.archive.retained import RetainedStore, RetainedStudy
from dicomnode.core.model import Source, StoredInstance
from dicomnode.egress.gate import Gate, _party
from dicomnode.governance import retained_access


class RetainedAccess(Gate):
    """Reading what only a law keeps: by the ``governance.legal`` role (checked by the caller),
    with a stated reason, each read a ledger entry."""

    def retained_studies(self) -> list[RetainedStudy]:
        """The studies retained by law (what, why, until when)."""
        return RetainedStore(self.archive).studies()

    def retrieve_retained(
        self, study_uid: str, requester: Source, reason: str, sop_uid: str = ""
    ) -> list[StoredInstance]:
        """The instances of a retained study (or its one instance `sop_uid`) once governance
        allows the legal access; the decision, with the reason, is in the ledger before any
        byte moves (NotPermitted when refused, NotFound when the study is not retained)."""
        store = RetainedStore(self.archive)
        study = store.get(study_uid)
        instances = store.instances(study_uid, sop_uid)
        now = self.clock()
        policy = self.policy(now)
        decision = retained_access.legal_access(
            study.legal_basis, study.retained_until, reason, policy.version, now
        )
        request = self._request(
            requester, retained_access.LEGAL_ACCESS, _party(requester), {study.patient_id},
            {study_uid},
        )  # fmt: skip
        disclosure_id = uuid.uuid4().hex
        self._record(
            requester,
            request,
            decision,
            len(instances),
            {
                "service": "retained",
                "sop_instance_uids": [i.sop_instance_uid for i in instances],
                "disclosure_id": disclosure_id,
            },
        )
        self._refuse(decision)
        self._audit_retrieval(
            requester, retained_access.LEGAL_ACCESS, None, instances, decision, disclosure_id
        )
        return instances
