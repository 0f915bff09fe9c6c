"""Consent interchange (checklist items 4, 5): import consents from HL7 FHIR R4 Consent
resources (a Bundle, one Consent, or NDJSON, in bulk from a file) through stewardship's one way
of recording a consent, and export them again with what their provisions said and the policy's
implicit policy per activity."""

from __future__ import annotations

import json
import logging
from typing import Any

from dicomnode.archive.consent_provisions import ProvisionStore
from dicomnode.core.errors import DicomnodeError, InvalidInput
from dicomnode.governance import codes
from dicomnode.governance import fhir_consent as fhir

log = logging.getLogger("dicomnode.consents")


def parse_document(text: str) -> list[Any]:
    """The resources of a bulk file: JSON (a Bundle, a Consent, a list) or NDJSON."""
    try:
        return fhir.resources(json.loads(text))
    except json.JSONDecodeError:
        pass
    try:
        return fhir.resources([json.loads(line) for line in text.splitlines() if line.strip()])
    except json.JSONDecodeError as e:
        raise InvalidInput(f"neither JSON nor NDJSON: line {e.lineno}: {e.msg}") from None


class ConsentInterchange:
    """Import and export consents as FHIR R4 Consent over the node's stewardship."""

    def __init__(self, stewardship: Any) -> None:
        self.stewardship = stewardship
        self.provisions = ProvisionStore(stewardship.archive.index)

    def import_text(self, text: str, by: str) -> dict[str, Any]:
        """Record every consent version the document's Consents say (in order); a resource
        that cannot be used is reported and skipped, the others are recorded."""
        recorded, problems = [], []
        for number, resource in enumerate(parse_document(text), start=1):
            try:
                versions = fhir.from_fhir(resource, frozenset(codes.PURPOSES))
                for item in versions:
                    stored, _ = self.stewardship.record_consent(
                        item.patient_id,
                        item.purpose,
                        item.state,
                        by,
                        issuer=item.issuer or None,
                        valid_from=item.valid_from,
                        valid_until=item.valid_until,
                        evidence_ref=item.evidence_ref,
                        note=f"imported from FHIR Consent/{item.fhir_id}",
                        recipients=item.recipients,
                    )
                    key = (stored.patient_id, stored.issuer_of_patient_id, stored.purpose)
                    if item.provision:
                        self.provisions.keep(
                            (*key, stored.version),
                            item.fhir_id,
                            item.provision,
                            self.stewardship.clock(),
                        )
                    recorded.append(stored.ref)
            except (fhir.ConsentFormatError, DicomnodeError) as e:
                problems.append({"resource": number, "problem": str(e)})
        log.info(
            "FHIR consents imported: %d recorded, %d refused",
            len(recorded),
            len(problems),
            extra={"event": "consent_import", "recorded": len(recorded)},
        )
        return {"recorded": recorded, "problems": problems}

    def export(self, patient_id: str | None = None) -> dict[str, Any]:
        """Every consent version (or one patient's) as a Bundle of R4 Consents."""
        registry = self.stewardship.archive.registry
        records = registry.consents(patient_id) if patient_id else registry.consents()
        kept = self.provisions.all()
        entries = [
            fhir.to_fhir(r, kept.get((r.patient_id, r.issuer_of_patient_id, r.purpose, r.version)))
            for r in records
        ]
        implicit = fhir.implicit_policies(self.stewardship.policy_status().in_force)
        return fhir.bundle(entries, implicit)
