"""Consents as HL7 FHIR R4 Consent (checklist items 4, 5): a bulk file (a Bundle) is imported
through the command line, each Consent becoming consent versions that decisions use; a
withdrawal is a new version, the old one stays; the export gives the versions back with the
provision's actor, action, purpose, period and data period, and names the implicit policy of
each activity (OPTIN: no consent, no processing; OPTOUT)."""

from __future__ import annotations

import json

import pytest

from dicomnode.governance import codes
from dicomnode.governance import fhir_consent as fhir
from tests.test_governance_node import governance_api
from tests.test_oversight_cli import as_user, node, run  # noqa: F401 (fixture)

STUDY_1 = "1.2.826.0.1.1"
ACTION = [
    {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "disclose"}
        ]
    }
]
DATA_PERIOD = {"start": "2020-01-01T00:00:00+09:00", "end": "2026-12-31T00:00:00+09:00"}


def consent(fhir_id: str, patient: str, purposes: list[str], **changes) -> dict:
    resource = {
        "resourceType": "Consent",
        "id": fhir_id,
        "status": "active",
        "scope": {"coding": [{"system": fhir.CONSENT_SCOPE, "code": "research"}]},
        "category": [{"coding": [{"system": fhir.LOINC, "code": "59284-0"}]}],
        "patient": {"identifier": {"value": patient}},
        "sourceReference": {"reference": "DocumentReference/form-7"},
        "provision": {
            "type": "permit",
            "period": {"start": "2026-01-01T00:00:00Z"},
            "actor": [
                {
                    "role": {"coding": [{"system": fhir.PARTICIPATION, "code": "IRCP"}]},
                    "reference": {"identifier": {"value": "lab"}, "display": "lab"},
                }
            ],
            "action": ACTION,
            "purpose": [{"system": fhir.ACT_REASON, "code": p} for p in purposes],
            "dataPeriod": DATA_PERIOD,
        },
    }
    return resource | changes


def test_reading_a_fhir_consent():
    known = frozenset(codes.PURPOSES)
    research, treatment = fhir.from_fhir(consent("c1", "P1", ["HRESCH", "TREAT"]), known)
    assert (research.purpose, treatment.purpose) == ("HRESCH", "TREAT")
    assert research.state == "granted" and research.recipients == ("lab",)
    assert research.evidence_ref == "DocumentReference/form-7"
    assert research.provision["action"] == ACTION
    assert research.provision["dataPeriod"] == DATA_PERIOD
    withdrawn = consent("c2", "P1", ["HRESCH"], status="inactive")
    assert fhir.from_fhir(withdrawn, known)[0].state == "withdrawn"
    denied = consent("c3", "P1", ["HRESCH"])
    denied["provision"] = denied["provision"] | {"type": "deny"}
    assert fhir.from_fhir(denied, known)[0].state == "refused"

    for broken, words in (
        (consent("c4", "", ["HRESCH"]), "patient.identifier.value"),
        (consent("c5", "P1", ["NOPE"]), "unknown purpose of use NOPE"),
        (consent("c6", "P1", ["HRESCH"], status="draft"), "status 'draft'"),
        ({"resourceType": "Patient"}, "resourceType must be Consent"),
    ):
        with pytest.raises(fhir.ConsentFormatError, match=words):
            fhir.from_fhir(broken, known)


def test_bulk_import_then_export(node, tmp_path):  # noqa: F811
    assert (
        governance_api(
            node, "POST", "/shares", json={"recipient": "lab", "study": STUDY_1}
        ).status_code
        == 403
    )  # no research consent yet
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": consent("c1", "P1", ["HRESCH"])},
            {"resource": consent("c2", "P2", ["HRESCH", "TREAT"])},
            {"resource": consent("bad", "P3", ["NOPE"])},
        ],
    }
    path = tmp_path / "consents.json"
    path.write_text(json.dumps(bundle))
    imported = as_user(node, "dpo1", "fhir-consent", "import", str(path))
    assert imported.returncode == 1  # one resource refused, the others recorded
    assert imported.stdout.count("recorded consent:") == 3, imported.stdout + imported.stderr
    assert "resource 3 refused" in imported.stderr and "NOPE" in imported.stderr
    in_force = node.stewardship.consent_in_force("P1")
    assert in_force["HRESCH"]["in_force"] and tuple(in_force["HRESCH"]["recipients"]) == ("lab",)
    assert in_force["HRESCH"]["recorded_by"] == "account:dpo1"
    # the import ran in another process: on SQLite the node sees it within its 5 s cache
    # (PostgreSQL wakes it at once); the test does not wait for that
    node.archive.registry.forget_cached()
    share = governance_api(node, "POST", "/shares", json={"recipient": "lab", "study": STUDY_1})
    assert share.status_code in (200, 202), share.text  # allowed (queued: no peer here)
    allowed = [
        e
        for e in node.archive.ledger.entries()
        if e.kind == "disclosure" and e.data["operation"] == "share"
    ]
    assert allowed and "consent:P1:HRESCH:v1" in allowed[-1].data["consent_refs"]

    ndjson = tmp_path / "withdrawal.ndjson"
    ndjson.write_text(json.dumps(consent("c1w", "P1", ["HRESCH"], status="inactive")) + "\n")
    assert as_user(node, "dpo1", "fhir-consent", "import", str(ndjson)).returncode == 0

    out = tmp_path / "export.json"
    exported = run(node, "fhir-consent", "export", "--patient-id", "P1", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    document = json.loads(out.read_text())
    assert document["resourceType"] == "Bundle"
    versions = [e["resource"] for e in document["entry"]]
    assert [(r["meta"]["versionId"], r["status"]) for r in versions] == [
        ("1", "active"),
        ("2", "inactive"),
    ]  # the old version stays retrievable
    first = versions[0]
    assert first["patient"]["identifier"]["value"] == "P1"
    assert first["provision"]["purpose"] == [{"system": fhir.ACT_REASON, "code": "HRESCH"}]
    assert first["provision"]["action"] == ACTION
    assert first["provision"]["dataPeriod"] == DATA_PERIOD
    assert first["provision"]["period"]["start"].startswith("2026-01-01T00:00:00")
    assert [a["reference"]["identifier"]["value"] for a in first["provision"]["actor"]] == ["lab"]
    assert first["scope"]["coding"][0]["code"] == "research"
    implicit = {t["display"].split()[-1]: t["code"] for t in document["meta"]["tag"]}
    assert implicit["research-sharing"] == "OPTIN"  # needs consent: none, no sharing
    assert implicit["hospital-access"] == "OPTOUT"

    again = fhir.from_fhir(first, frozenset(codes.PURPOSES))[0]  # what it exports reads back
    assert (again.patient_id, again.purpose, again.recipients) == ("P1", "HRESCH", ("lab",))
