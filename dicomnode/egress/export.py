"""A data subject's copy of their data (PIPA 35, GDPR 15/20): every object as stored and a
summary of every disclosure, asked of the gate like any other way out."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from dicomnode.archive.blobstore import blob_key
from dicomnode.archive.jobs import JobStore
from dicomnode.archive.ledger_views import LedgerViews
from dicomnode.core.ledger import LedgerFilter
from dicomnode.core.ledger_events import SubjectExported
from dicomnode.core.model import LedgerKind, Source
from dicomnode.egress.gate import Gate
from dicomnode.governance import (
    Party,
)


class SubjectExport(Gate):
    """The data-subject export of the way out."""

    # --- data-subject access (PIPA 35, GDPR 15/20) ------------------------------------------

    def export_subject(
        self,
        patient_id: str,
        requester: Source,
        out_dir: Path,
        context: dict[str, Any],
        issuer: str | None = None,
    ) -> dict[str, Any]:
        """Write every object of a patient (as stored) under `out_dir/DICOM/`, and a summary of
        what was done with the data and every disclosure of it (`summary.json`, and the same as
        readable text in `summary.txt`). `context` adds consents, restrictions and retention.
        The patient is one exact identity (Patient ID and issuer, never a pattern).
        The export is a decision (subject access) recorded like any other; returns the summary.
        Its purpose is the data subject's request (the subject-access activity's), whatever
        purpose the token of the account handing it over states."""
        requester = dataclasses.replace(requester, purpose=None)
        identity = self.archive.identify(patient_id, issuer)
        patient_id = identity.patient_id
        instances = self.archive.instances_of(identity)
        decision = self.decide(
            requester,
            "export",
            Party("cli"),
            {patient_id},
            {i.study_instance_uid for i in instances},
            len(instances),
            {
                "sop_instance_uids": [i.sop_instance_uid for i in instances],
                "recipient": f"data subject {patient_id}, handed over by {requester.caller}",
            },
        )
        self._refuse(decision)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = []
        for instance in instances:
            relative = Path("DICOM") / blob_key(
                instance.study_instance_uid,
                instance.series_instance_uid,
                instance.sop_instance_uid,
            )
            (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            with self.archive.open_blob(instance) as blob, (out_dir / relative).open("wb") as out:
                shutil.copyfileobj(blob, out, 1 << 20)
            files.append(str(relative))
        disclosures, processing = [], []
        everything = LedgerFilter(kinds=tuple(k.value for k in LedgerKind), patient_id=patient_id)
        for entry in LedgerViews(self.archive.index).iter(everything, newest_first=False):
            data = entry.data
            row = {
                "seq": entry.seq,
                "at": entry.recorded_at,
                "kind": entry.kind,
                "outcome": entry.outcome,
                "operation": data.get("operation") or data.get("request", ""),
                "recipient": data.get("recipient", ""),
                "purpose": data.get("purpose", ""),
                "basis": data.get("basis", ""),
                "reason": data.get("reason", ""),
            }
            if entry.kind in ("disclosure", "transfer", "denial"):
                disclosures.append(row)
            else:
                processing.append(row)
        others = self.archive.studies_of_others(identity)  # same ID, another issuer
        jobs = [
            job.as_dict()
            for job in JobStore(self.archive.index).list(patient_id=patient_id, limit=None)
            if job.study_instance_uid not in others
        ]
        summary = {
            "patient_id": patient_id,
            "issuer_of_patient_id": identity.issuer or "",
            "exported_at": self.clock().isoformat(),
            "policy_version": decision.policy_version,
            "studies": sorted({i.study_instance_uid for i in instances}),
            "files": files,
            "analyses": [
                {k: j[k] for k in ("id", "analyzer", "analyzer_version", "state", "finished_at")}
                for j in jobs
            ],
            "disclosures": disclosures,
            "processing_records": processing,
            **context,
        }
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        (out_dir / "summary.txt").write_text(_readable_summary(summary), encoding="utf-8")
        exported = SubjectExported(
            patient_ids=(patient_id,),
            study_instance_uids=tuple(summary["studies"]),
            files=len(files),
            disclosures_listed=len(disclosures),
        )
        self.archive.ledger.record(
            exported.kind, requester.caller, "exported", exported.as_details()
        )
        return summary


def _readable_summary(summary: dict[str, Any]) -> str:
    """The export summary as plain text a patient (or the hospital's staff) can read."""
    lines = [
        f"Data held about patient {summary['patient_id']}, exported {summary['exported_at']}",
        f"Policy in force: {summary['policy_version']}",
        "",
        f"Studies ({len(summary['studies'])}), {len(summary['files'])} DICOM files under DICOM/:",
        *(f"  {uid}" for uid in summary["studies"]),
        "",
        "Analyses run on the data:",
        *(
            f"  {a['finished_at'] or '-'}  {a['analyzer']} {a['analyzer_version']}: {a['state']}"
            for a in summary["analyses"]
        ),
        "",
        "Every disclosure of the data (and every refusal), from the ledger:",
        *(
            f"  {d['at']}  {d['kind']:<10} {d['operation']:<8} to {d['recipient'] or '-'} "
            f"for {d['purpose'] or '-'} on {d['basis'] or '-'}: {d['outcome']}"
            for d in summary["disclosures"]
        ),
        "",
        "Consent records:",
        *(
            f"  {c['recorded_at']}  {c['purpose']}: {c['state']} (v{c['version']})"
            for c in summary.get("consents", [])
        ),
        "",
        "Retention:",
        *(
            f"  {r['study_instance_uid']} {r['category']}: {r['reason']}"
            for r in summary.get("retention", [])
        ),
    ]
    return "\n".join(lines) + "\n"
