"""Study access tags (checklist item 41): studies are tagged at intake by the sending peer's
rule ([[peers]] intake_tags) and by [[access_tag_rules]] on the sender and the arriving object's
attribute values (exact, never patterns), and a client with tags (a peer's access_tags, a token's
access_tags claim) sees only studies carrying one of them: a study tagged hospital-a is
invisible to a hospital-b client on C-FIND, C-MOVE (dcmtk), QIDO and WADO (dicomweb-client).
"""

from __future__ import annotations

import io
import time

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from joserfc import jwt
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicomnode.config import check_settings, read_settings
from dicomnode.core.model import Source
from dicomnode.governance.access_tags import rule_tags
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


# [[access_tag_rules]]: one CT (AE title CT1) sends for two hospitals; the institution decides.
RULES = """
[[access_tag_rules]]
tag = "hospital-a"
sender = "CT1"
match = { InstitutionName = "Hospital A" }

[[access_tag_rules]]
tag = "hospital-b"
sender = "CT1"
match = { InstitutionName = "Hospital B", IssuerOfPatientID = ["HOSP-B", "HOSPITAL-B"] }

[[access_tag_rules]]
tag = "literal"
match = { InstitutionName = "Hospital*" }
"""


def test_rules_tag_one_senders_studies_by_institution(start_node, tmp_path):
    node = start_node(extra=RULES)
    sent = {  # name -> (calling AE, InstitutionName, IssuerOfPatientID)
        "other-sender": ("CT2", "Hospital A", "HOSP-A"),
        "a": ("CT1", "Hospital A", "HOSP-A"),
        "b": ("CT1", "Hospital B", "HOSPITAL-B"),
        "star": ("CT1", "Hospital*", "HOSP-A"),
    }
    studies = {}
    for name, (ae_title, institution, issuer) in sent.items():
        studies[name] = generate_uid()
        path = tmp_path / f"{name}.dcm"
        make_ct(
            patient_id=f"P-{name}",
            study_uid=studies[name],
            InstitutionName=institution,
            IssuerOfPatientID=issuer,
        ).save_as(path, enforce_file_format=True)
        assert storescu(node, path, aet=ae_title).final_status == SUCCESS

    def client(tag: str) -> DICOMwebClient:
        token = _tagged_token(node, [tag])
        return DICOMwebClient(dicomweb_url(node), headers={"Authorization": f"Bearer {token}"})

    def seen_by(tag: str) -> set[str]:
        return _study_uids(client(tag).search_for_studies())

    # "Hospital*" is a value, not a pattern: only the study whose institution is that text
    wait_until(lambda: seen_by("literal") == {studies["star"]}, 30, "the literal rule's tag")
    # CT2 is not the rules' sender: its Hospital A study gets no tag
    assert seen_by("hospital-a") == {studies["a"]}
    assert seen_by("hospital-b") == {studies["b"]}

    hospital_b = client("hospital-b")
    assert _study_uids(hospital_b.search_for_instances()) == {studies["b"]}
    assert [ds.StudyInstanceUID for ds in hospital_b.retrieve_study(studies["b"])] == [studies["b"]]
    for retrieve in (hospital_b.retrieve_study, hospital_b.retrieve_study_metadata):
        with pytest.raises(requests.HTTPError) as hidden:
            retrieve(studies["a"])
        assert hidden.value.response.status_code in (403, 404)


def _parsed(**attributes: object):
    """A CT object as intake parses it (raw elements, values padded to even length)."""
    buffer = io.BytesIO()
    make_ct(**attributes).save_as(buffer, enforce_file_format=True)
    return dcmread(io.BytesIO(buffer.getvalue()), stop_before_pixels=True)


def test_rule_values_are_exact_text_never_patterns(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(
        RULES
        + """
[[access_tag_rules]]
tag = "by-peer"
sender = "modality-1"
match = { Modality = "CT", IssuerOfPatientID = "HOSP-A" }
"""
    )
    rules = read_settings(path).access_tag_rules
    ct1 = Source("dimse", "CT1", "127.0.0.1")

    def tags(source: Source = ct1, **attributes: object) -> set[str]:
        return rule_tags(rules, _parsed(**attributes), source)

    assert tags(InstitutionName="Hospital*") == {"literal"}
    for near in ("Hospital A*", "Hospital?", "Hospital", "hospital*", "Hospital%"):
        assert "literal" not in tags(InstitutionName=near), near
    assert tags(InstitutionName="Hospital A") == {"hospital-a"}
    assert tags(InstitutionName="Hospital A ") == {"hospital-a"}  # DICOM padding is not a value
    assert tags(InstitutionName="Hospital B", IssuerOfPatientID="HOSP-B") == {"hospital-b"}
    assert tags(InstitutionName="Hospital B", IssuerOfPatientID="HOSP-C") == set()
    assert tags(InstitutionName="Hospital B") == set()  # an absent attribute never matches
    assert tags(Source("dimse", "CT2", "127.0.0.1"), InstitutionName="Hospital A") == set()
    # sender: a DIMSE calling AE title or a configured peer's name, never a web user's name
    assert tags(Source("dicomweb", "CT1", "127.0.0.1"), InstitutionName="Hospital A") == set()
    peer = Source("dimse", "MOD1", "127.0.0.1", "modality-1")
    assert tags(peer, IssuerOfPatientID="HOSP-A") == {"by-peer"}


@pytest.mark.parametrize(
    ("rule", "key", "words"),
    [
        ('tag = "t"\nmatch = { InstitutionNme = "A" }', "match", "'InstitutionNme'"),
        ('tag = "t"\nmatch = { ReferencedStudySequence = "A" }', "match", "ReferencedStudySeq"),
        ('tag = "t"\nmatch = { InstitutionName = [] }', "match", "InstitutionName must be"),
        ('tag = "t"\nmatch = { InstitutionName = 7 }', "match", "InstitutionName must be"),
        ('tag = "has space"\nsender = "CT1"', "tag", "letters, digits"),
        ('sender = "CT1"', "tag", "required"),
        ('tag = "t"', "", "neither sender nor match"),
    ],
)
def test_a_bad_rule_is_a_config_error_naming_it(tmp_path, rule, key, words):
    path = tmp_path / "bad.toml"
    path.write_text(f"[[access_tag_rules]]\n{rule}\n")
    problems = check_settings(path)
    expected = "access_tag_rules[0]" + (f".{key}" if key else "")
    assert [p.key for p in problems] == [expected], problems
    assert words in str(problems[0])
