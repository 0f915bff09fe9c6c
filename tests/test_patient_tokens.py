"""Tokens bound to one patient (checklist item 40): a ``patient/*.read`` token with a patient
claim sees only that patient in QIDO (matched exactly, never as a pattern) and is refused
(403) a WADO retrieval of another patient's study. Real node, real HTTP, dicomweb-client.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from joserfc import jwt
from pydicom.uid import generate_uid

from dicomnode.core.model import PatientIdentity
from tests.conftest import dicomweb_client, dicomweb_url
from tests.factory import make_ct


def _patient_token(node, claims: dict, scope: str = "patient/*.read") -> str:
    """A token signed by the node's key with `scope` and extra `claims` (as an EHR would ask)."""
    from dicomnode.archive.keys import shared_signing_key

    key = shared_signing_key(node.settings.database_url)
    payload = {
        "iss": node.settings.auth.local_issuer,
        "aud": node.settings.auth.local_audience,
        "sub": "patient-portal",
        "scope": scope,
        "exp": int(time.time()) + 600,
        "purpose_of_use": "TREAT",
        **claims,
    }
    return jwt.encode({"alg": "RS256", "kid": key.thumbprint()}, payload, key)


def _client(node, token: str) -> DICOMwebClient:
    return DICOMwebClient(dicomweb_url(node), headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def node_with_three_patients(start_node):
    """A node holding patients 'A*', 'AB' and 'A*' of another issuer, one study each."""
    node = start_node()
    studies = {}
    for key, patient_id, issuer in (
        ("star", "A*", "HOSP-A"),
        ("ab", "AB", "HOSP-A"),
        ("other-issuer", "A*", "HOSP-B"),
    ):
        study = generate_uid()
        ds = make_ct(patient_id=patient_id, study_uid=study, IssuerOfPatientID=issuer)
        dicomweb_client(node).store_instances([ds])
        studies[key] = study
    return node, studies


def _study_uids(answers: list[dict]) -> set[str]:
    return {a["0020000D"]["Value"][0] for a in answers}


def test_item_40_a_patient_token_sees_only_its_patient_and_is_refused_another(
    node_with_three_patients,
):
    node, studies = node_with_three_patients
    bound = _client(node, _patient_token(node, {"patient": {"id": "A*", "issuer": "HOSP-A"}}))

    # QIDO: the claim 'A*' is the patient 'A*' of HOSP-A, not a pattern over 'AB'
    assert _study_uids(bound.search_for_studies()) == {studies["star"]}
    assert _study_uids(bound.search_for_series()) == {studies["star"]}
    assert _study_uids(bound.search_for_instances()) == {studies["star"]}
    # asking for another patient by its keys finds nothing
    assert bound.search_for_studies(search_filters={"PatientID": "AB"}) == []
    assert bound.search_for_studies(search_filters={"StudyInstanceUID": studies["ab"]}) == []
    assert bound.search_for_series(study_instance_uid=studies["other-issuer"]) == []

    # WADO: its own study is served, another patient's is 403 (every WADO service)
    own = bound.retrieve_study(studies["star"])
    assert [ds.PatientID for ds in own] == ["A*"]
    for other in ("ab", "other-issuer"):
        with pytest.raises(requests.HTTPError) as refused:
            bound.retrieve_study(studies[other])
        assert refused.value.response.status_code == 403
        with pytest.raises(requests.HTTPError) as refused:
            bound.retrieve_study_metadata(studies[other])
        assert refused.value.response.status_code == 403
    # an unknown study is refused alike: no oracle for which studies exist
    with pytest.raises(requests.HTTPError) as refused:
        bound.retrieve_study(generate_uid())
    assert refused.value.response.status_code == 403

    # the hospital's own read token still sees all three
    assert _study_uids(dicomweb_client(node).search_for_studies()) == set(studies.values())


def test_item_40_a_patient_token_grants_nothing_else(node_with_three_patients):
    node, studies = node_with_three_patients
    # a patient claim with dicomweb.* scopes: bound anyway, and the other scopes dropped
    widened = _patient_token(
        node, {"patient": "AB", "patient_issuer": "HOSP-A"}, "dicomweb.read dicomweb.delete"
    )
    client = _client(node, widened)
    assert _study_uids(client.search_for_studies()) == {studies["ab"]}
    response = requests.delete(
        f"{dicomweb_url(node)}/studies/{studies['ab']}",
        headers={"Authorization": f"Bearer {widened}"},
        timeout=30,
    )
    assert response.status_code == 403
    # patient/ scopes without a patient claim are no token at all
    unbound = _patient_token(node, {})
    response = requests.get(
        f"{dicomweb_url(node)}/studies",
        headers={"Authorization": f"Bearer {unbound}"},
        timeout=30,
    )
    assert response.status_code == 401
    assert "patient claim" in response.json()["detail"]


def test_issue_token_binds_a_patient(node_with_three_patients):
    from dicomnode.archive.keys import shared_signing_key
    from dicomnode.dicomweb.auth import issue_token

    node, studies = node_with_three_patients
    key = shared_signing_key(node.settings.database_url)
    token = issue_token(
        key, node.settings.auth, "portal", [], 600, patient=PatientIdentity("A*", "HOSP-B")
    )
    assert _study_uids(_client(node, token).search_for_studies()) == {studies["other-issuer"]}


def test_token_create_binds_a_patient(node_with_three_patients):
    node, studies = node_with_three_patients
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicomnode.cli",
            "token",
            "create",
            "--config",
            str(node.settings.source),
            "--scope",
            "patient/*.read",
            "--subject",
            "second-opinion",
            "--patient-id",
            "AB",
            "--issuer",
            "HOSP-A",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    client = _client(node, result.stdout.strip())
    assert _study_uids(client.search_for_studies()) == {studies["ab"]}
    with pytest.raises(requests.HTTPError) as refused:
        client.retrieve_study(studies["star"])
    assert refused.value.response.status_code == 403


def test_a_bound_query_keeps_the_claim_exact():
    from dicomnode.core.model import Level, Query
    from dicomnode.governance.patient_scope import admits, bound_query

    patient = PatientIdentity("A*", None)
    query = Query.build(Level.STUDY, {"PatientID": "A?"}, ["StudyDate"])
    bound = bound_query(query, patient)
    assert bound is not None and dict(bound.filters)["PatientID"] == "A*"
    assert {"PatientID", "IssuerOfPatientID"} <= set(bound.return_keys)
    assert bound_query(Query.build(Level.STUDY, {"PatientID": "B*"}), patient) is None
    assert bound_query(Query.build(Level.STUDY, {"IssuerOfPatientID": "X"}), patient) is None
    assert admits(patient, "A*", "") and not admits(patient, "AB", "")
    assert not admits(patient, "A*", "HOSP-A")  # a claim without issuer: records without one
