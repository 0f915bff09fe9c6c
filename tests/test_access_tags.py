"""Study access tags (checklist item 41): studies are tagged at intake by the sending peer's
rule ([[peers]] intake_tags) and a client with tags (a peer's access_tags, a token's
access_tags claim) sees only studies carrying one of them: a study tagged hospital-a is
invisible to a hospital-b client on C-FIND, C-MOVE (dcmtk), QIDO and WADO (dicomweb-client).
"""

from __future__ import annotations

import time

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from joserfc import jwt
from pydicom.uid import generate_uid

from tests.conftest import dicomweb_client, dicomweb_url, wait_until
from tests.factory import make_ct
from tests.test_dimse_dcmtk import SUCCESS, findscu, movescu, storescu


def _peer(name: str, ae_title: str, port: int, tag: str | None) -> str:
    lines = [
        "[[peers]]",
        f'name = "{name}"',
        f'ae_title = "{ae_title}"',
        'host = "127.0.0.1"',
        f"port = {port}",
    ]
    if tag:
        lines += [f'intake_tags = ["{tag}"]', f'access_tags = ["{tag}"]']
    return "\n".join(lines)


def _tagged_token(node, tags: list[str]) -> str:
    from dicomnode.archive.keys import shared_signing_key

    key = shared_signing_key(node.settings.database_url)
    claims = {
        "iss": node.settings.auth.local_issuer,
        "aud": node.settings.auth.local_audience,
        "sub": "hospital-b-viewer",
        "scope": "dicomweb.read",
        "exp": int(time.time()) + 600,
        "purpose_of_use": "TREAT",
        "access_tags": tags,
    }
    return jwt.encode({"alg": "RS256", "kid": key.thumbprint()}, claims, key)


def _study_uids(answers: list[dict]) -> set[str]:
    return {a["0020000D"]["Value"][0] for a in answers}


def test_item_41_a_study_tagged_hospital_a_is_invisible_to_hospital_b(
    start_node, storescp, tmp_path
):
    destination = storescp()
    extra = "\n".join(
        [
            _peer("partner-a", "PARTNERA", 104, "hospital-a"),
            _peer("partner-b", "PARTNERB", 104, "hospital-b"),
            _peer("viewer", destination.ae_title, destination.port, None),
        ]
    )
    node = start_node(extra=extra)
    studies = {}
    for ae_title, tag in (("PARTNERA", "a"), ("PARTNERB", "b")):
        studies[tag] = generate_uid()
        path = tmp_path / f"{tag}.dcm"
        make_ct(patient_id=f"P-{tag}", study_uid=studies[tag]).save_as(
            path, enforce_file_format=True
        )
        assert storescu(node, path, aet=ae_title).final_status == SUCCESS

    def found_by(ae_title: str) -> set[str]:
        result = findscu(
            node, tmp_path / f"find-{ae_title}-{time.monotonic_ns()}", "-S", "STUDY",
            "StudyInstanceUID", aet=ae_title,
        )  # fmt: skip
        assert result.final_status == SUCCESS, result.output
        return set(result.values("StudyInstanceUID"))

    # C-FIND: each partner sees its own study only (tags are given just after filing)
    wait_until(lambda: found_by("PARTNERB") == {studies["b"]}, 30, "hospital-b's study tagged")
    assert found_by("PARTNERA") == {studies["a"]}

    # C-MOVE: hospital-b cannot move hospital-a's study; its own moves
    refused = movescu(
        node, "-S", "STUDY", f"StudyInstanceUID={studies['a']}", "PatientID",
        to=destination.ae_title, aet="PARTNERB",
    )  # fmt: skip
    assert refused.suboperations("Completed") == 0, refused.output
    own = movescu(
        node, "-S", "STUDY", f"StudyInstanceUID={studies['b']}", "PatientID",
        to=destination.ae_title, aet="PARTNERB",
    )  # fmt: skip
    assert own.final_status == SUCCESS, own.output
    assert own.suboperations("Completed") == 1
    assert {ds.StudyInstanceUID for ds in destination.received()} == {studies["b"]}

    # DICOMweb: a token with the access_tags claim hospital-b
    client = DICOMwebClient(
        dicomweb_url(node),
        headers={"Authorization": f"Bearer {_tagged_token(node, ['hospital-b'])}"},
    )
    assert _study_uids(client.search_for_studies()) == {studies["b"]}
    assert _study_uids(client.search_for_instances()) == {studies["b"]}
    assert [ds.StudyInstanceUID for ds in client.retrieve_study(studies["b"])] == [studies["b"]]
    with pytest.raises(requests.HTTPError) as hidden:
        client.retrieve_study(studies["a"])
    assert hidden.value.response.status_code == 404
    with pytest.raises(requests.HTTPError) as hidden:
        client.retrieve_study_metadata(studies["a"])
    assert hidden.value.response.status_code == 404

    # the hospital's own token (no tags) sees both
    assert _study_uids(dicomweb_client(node).search_for_studies()) == set(studies.values())


def test_a_bad_access_tags_claim_is_no_token(start_node):
    node = start_node()
    for bad in ([], ["has space"], 7):
        response = requests.get(
            f"{dicomweb_url(node)}/studies",
            headers={"Authorization": f"Bearer {_tagged_token(node, bad)}"},
            timeout=30,
        )
        assert response.status_code == 401, bad
        assert (
            "access_tags" in response.json()["detail"] or "access tag" in response.json()["detail"]
        )
