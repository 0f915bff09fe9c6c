"""What an imported FHIR Consent's provision said beyond the consent version (actors, actions,
data period), kept per consent version to be exported again as it came."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import select

from dicomnode.archive.index import Index
from dicomnode.archive.oversight_schema import consent_provisions


class ProvisionStore:
    def __init__(self, index: Index) -> None:
        self.index = index

    def keep(
        self,
        key: tuple[str, str, str, int],
        fhir_id: str,
        provision: dict[str, Any],
        now: datetime,
    ) -> None:
        """Keep `provision` for the consent version `key` (Patient ID, issuer, purpose,
        version); a version has one."""
        patient_id, issuer, purpose, version = key
        with self.index.write() as conn:
            conn.execute(
                consent_provisions.insert().values(
                    patient_id=patient_id,
                    issuer_of_patient_id=issuer,
                    purpose=purpose,
                    version=version,
                    fhir_id=fhir_id,
                    provision=json.dumps(provision, sort_keys=True),
                    imported_at=now,
                )
            )

    def all(self) -> dict[tuple[str, str, str, int], dict[str, Any]]:
        """Every kept provision by consent version."""
        t = consent_provisions
        with self.index.read() as conn:
            rows = conn.execute(select(t)).all()
        return {
            (r.patient_id, r.issuer_of_patient_id, r.purpose, r.version): json.loads(r.provision)
            for r in rows
        }
