"""QIDO-RS and C-FIND give the same answers to the same questions: they are one query engine.

Hypothesis asks both services the same generated questions about one generated archive and
compares the sets of studies and series they return. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import random
from io import BytesIO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from dicomnode.config import Peer
from dicomnode.core.model import Source
from dicomnode.serve import Node
from tests.conftest import dicomweb_client, start_module_node
from tests.factory import make_ct

NAMES = ["Doe^Jane", "Doe^John", "Park^Jisoo", "Lee^Minho", "doe^jim", "홍^길동"]
MODALITIES = ["CT", "MR", "PT", "SR"]
DATES = ["20230101", "20230615", "20240101", "20240315", "20250704"]
DESCRIPTIONS = ["CT CHEST", "CT ABDOMEN", "MR BRAIN", "PET WB"]
FINDER = Peer("finder", "FINDER", "127.0.0.1", 0, ("find",))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def node(request, tmp_path_factory):
    node = start_module_node(request, tmp_path_factory, "qido-cfind", [FINDER])
    rng = random.Random(20261125)
    for p, name in enumerate(NAMES):
        for _ in range(rng.randint(1, 3)):
            study = {
                "study_uid": generate_uid(),
                "StudyDate": rng.choice(DATES),
                "AccessionNumber": f"A{rng.randint(0, 30):02d}",
                "StudyDescription": rng.choice(DESCRIPTIONS),
            }
            for number in range(1, rng.randint(1, 3) + 1):
                ds = make_ct(
                    f"P{p:02d}",
                    name,
                    series_uid=generate_uid(),
                    size=4,
                    Modality=rng.choice(MODALITIES),
                    SeriesNumber=number,
                    SpecificCharacterSet="ISO_IR 192",
                    **study,
                )
                buffer = BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                node.intake.receive_part10(buffer.getvalue(), Source("cli"))
    yield node
    node.stop()


def cfind(node: Node, level: str, filters: dict[str, str], key: str) -> set[str]:
    ae = AE("FINDER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.dimse.port, ae_title="DICOMNODE")
    assert assoc.is_established
    identifier = Dataset()
    identifier.SpecificCharacterSet = "ISO_IR 192"
    identifier.QueryRetrieveLevel = level
    setattr(identifier, key, "")
    for keyword, value in filters.items():
        setattr(identifier, keyword, value)
    found = set()
    try:
        for status, answer in assoc.send_c_find(
            identifier, StudyRootQueryRetrieveInformationModelFind
        ):
            assert status.Status in (0x0000, 0xFF00), hex(status.Status)
            if status.Status == 0xFF00:
                found.add(str(getattr(answer, key)))
    finally:
        assoc.release()
    return found


def qido(node: Node, level: str, filters: dict[str, str], key: str) -> set[str]:
    client = dicomweb_client(node, ("dicomweb.read",))
    search = client.search_for_studies if level == "STUDY" else client.search_for_series
    tag = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E"}[key]
    return {row[tag]["Value"][0] for row in search(search_filters=filters)}


name_patterns = st.sampled_from(["Doe^*", "*^J*", "DOE^JANE", "홍*", "*o*", "Lee^Minho", "?ark*"])
dates = st.sampled_from(DATES + ["20220101", "20991231"])
date_values = (
    dates
    | st.tuples(dates, dates).map(lambda d: f"{min(d)}-{max(d)}")
    | dates.map(lambda d: f"-{d}")
)
study_filters = st.fixed_dictionaries(
    {},
    optional={
        "PatientName": name_patterns,
        "PatientID": st.sampled_from(["P01", "P0*", "P?3", "*"]),
        "StudyDate": date_values,
        "AccessionNumber": st.integers(0, 30).map(lambda n: f"A{n:02d}") | st.just("A1*"),
        "StudyDescription": st.sampled_from(["CT*", "*BRAIN", "PET WB"]),
        "ModalitiesInStudy": st.sampled_from(MODALITIES),
    },
)
series_filters = st.fixed_dictionaries(
    {},
    optional={
        "Modality": st.sampled_from(MODALITIES + ["C?"]),
        "SeriesNumber": st.sampled_from(["1", "2", "3"]),
        "PatientName": name_patterns,
        "StudyDate": date_values,
    },
)

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(filters=study_filters)
def test_study_level_answers_agree(node, filters):
    assert qido(node, "STUDY", filters, "StudyInstanceUID") == cfind(
        node, "STUDY", filters, "StudyInstanceUID"
    )


@SETTINGS
@given(filters=series_filters)
def test_series_level_answers_agree(node, filters):
    assert qido(node, "SERIES", filters, "SeriesInstanceUID") == cfind(
        node, "SERIES", filters, "SeriesInstanceUID"
    )


def test_the_archive_is_not_trivial(node):
    """The comparison means something only if queries split the archive."""
    everything = cfind(node, "STUDY", {}, "StudyInstanceUID")
    some = cfind(node, "STUDY", {"PatientName": "Doe^*"}, "StudyInstanceUID")
    assert len(everything) >= 8 and 0 < len(some) < len(everything)
