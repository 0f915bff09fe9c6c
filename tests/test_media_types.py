"""Every Accept and Content-Type a real client sends: one parser, quoted and unquoted parameters
alike (OHIF 3 ships `omitQuotationForMultipartRequest: true`), q-weights, the `accept` and
`charset` query parameters, single part application/dicom for one instance only (PS3.18
10.4.4), XML metadata or 406, and 406 bodies that name what the node can send.

The table runs against a real node on loopback (raw HTTP, so the header goes byte for byte),
and the parser's own table checks what each variant means.
"""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import HTTP
from io import BytesIO
from xml.etree import ElementTree

import numpy as np
import pydicom
import pytest
import requests

from dicomnode.dicomweb import media
from tests.conftest import dicomweb_client, dicomweb_url
from tests.factory import make_ct, part10
from tests.test_dicomweb import get, headers_for

OCTET = "application/octet-stream"
TS_ALL = "transfer-syntax=*"
EXPLICIT = "1.2.840.10008.1.2.1"
RLE = "1.2.840.10008.1.2.5"


# --- the parser ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        # OHIF 3.13.2's shipped header: unquoted, "/" kept
        (
            f"multipart/related; type={OCTET}; {TS_ALL}",
            [("multipart/related", {"type": OCTET, "transfer-syntax": "*"}, 1.0)],
        ),
        (
            f'multipart/related; type="{OCTET}"; transfer-syntax="*"',
            [("multipart/related", {"type": OCTET, "transfer-syntax": "*"}, 1.0)],
        ),
        (
            f"Multipart/Related; TYPE=Application/Octet-Stream; Transfer-Syntax={EXPLICIT}",
            [
                (
                    "multipart/related",
                    {"type": "Application/Octet-Stream", "transfer-syntax": EXPLICIT},
                    1.0,
                )
            ],  # noqa: E501
        ),
        (
            f'multipart/related;type="image/jls";q=0.5, multipart/related; type={OCTET}',
            [
                ("multipart/related", {"type": OCTET}, 1.0),
                ("multipart/related", {"type": "image/jls"}, 0.5),
            ],
        ),
        ("application/json;q=0, */*", [("*/*", {}, 1.0)]),  # q=0: not acceptable
        ('a/b; x="1,2", c/d', [("a/b", {"x": "1,2"}, 1.0), ("c/d", {}, 1.0)]),
        ('a/b; x="say \\"hi\\""', [("a/b", {"x": 'say "hi"'}, 1.0)]),
        ("a/b; q=abc", [("a/b", {}, 1.0)]),
        ("", [("*/*", {}, 1.0)]),
        ("garbage", []),
    ],
)
def test_accept_header_parsing(header, expected):
    got = [(r.media_type, r.params, r.q) for r in media.parse_accept(header)]
    assert got == expected


def test_the_accept_query_parameter_comes_before_the_header():
    ranges = media.parse_accept("application/dicom+xml", "application/dicom+json")
    assert [r.media_type for r in ranges] == ["application/dicom+xml", "application/dicom+json"]


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/related; type=application/dicom; boundary=abc",
        'multipart/related; type="application/dicom"; boundary="abc"',
        "Multipart/Related; Type=Application/DICOM; Boundary=abc",
        "multipart/related; boundary=abc",
    ],
)
def test_stow_content_type_variants(content_type):
    assert media.stow_content_type(content_type) == ("abc", "application/dicom")
    assert media.options_header(content_type)[1]["boundary"] == "abc"


# --- against a node ----------------------------------------------------------------------


@pytest.fixture
def node(start_node):
    return start_node()


@pytest.fixture
def stored(node):
    """One study: an uncompressed multi-frame CT-like image and an RLE one (3 frames each)."""
    client = dicomweb_client(node)
    study = pydicom.uid.generate_uid()
    plain = make_ct(study_uid=study, size=16)
    plain.NumberOfFrames = 3
    frames = np.random.default_rng(7).integers(0, 4096, (3, 16, 16), dtype=np.uint16)
    plain.PixelData = frames.tobytes()
    rle = make_ct(study_uid=study, series_uid=plain.SeriesInstanceUID, size=16)
    rle.NumberOfFrames = 3
    rle.PixelData = frames.tobytes()
    rle.compress(RLE)
    for ds in (plain, rle):
        client.store_instances([pydicom.dcmread(BytesIO(part10(ds)))])
    return {"plain": plain, "rle": rle, "frames": frames}


def path_of(ds, suffix: str = "") -> str:
    return (
        f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}{suffix}"
    )


def parts_of(response: requests.Response) -> list[tuple[str, bytes]]:
    """The (Content-Type, body) of each part of a multipart answer, read as a client would."""
    head = f"Content-Type: {response.headers['Content-Type']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + response.content)
    assert message.is_multipart(), response.headers["Content-Type"]
    return [(p["Content-Type"], p.get_payload(decode=True)) for p in message.iter_parts()]


def syntax_of(content_type: str) -> str | None:
    return media.parse_media_type(content_type).transfer_syntax


# (Accept header, expected status, expected part type, "decoded" or "stored")
FRAME_VARIANTS = [
    (f"multipart/related; type={OCTET}; {TS_ALL}", 200, OCTET, "stored"),  # OHIF shipped
    (f'multipart/related; type="{OCTET}"; transfer-syntax=*', 200, OCTET, "stored"),
    (f'multipart/related; type="{OCTET}"; transfer-syntax="*"', 200, OCTET, "stored"),
    (f"MULTIPART/RELATED; TYPE={OCTET.upper()}", 200, OCTET, "decoded"),
    (f"multipart/related; type={OCTET}; transfer-syntax={EXPLICIT}", 200, OCTET, "decoded"),
    (f"multipart/related; type={OCTET}", 200, OCTET, "decoded"),
    ("multipart/related", 200, OCTET, "decoded"),  # no type=: the default, octet-stream
    ("*/*", 200, OCTET, "decoded"),
    ("multipart/related; type=image/dicom-rle", 200, "image/dicom-rle", "stored"),
    (
        f'multipart/related; type="image/dicom-rle"; transfer-syntax={RLE}',
        200,
        "image/dicom-rle",
        "stored",
    ),  # noqa: E501
    # q-weights: the preferred range wins, a range the node cannot serve is skipped
    (
        f"multipart/related; type={OCTET};q=0.4, multipart/related; type=image/dicom-rle",
        200,
        "image/dicom-rle",
        "stored",
    ),  # noqa: E501
    (
        f"multipart/related; type=image/jpeg, multipart/related; type={OCTET};q=0.1",
        200,
        OCTET,
        "decoded",
    ),  # noqa: E501
    ("multipart/related; type=image/jpeg", 406, None, None),
    (f"multipart/related; type=image/dicom-rle; transfer-syntax={EXPLICIT}", 406, None, None),
    ("text/html", 406, None, None),
    (f"multipart/related; type={OCTET};q=0", 406, None, None),
]


@pytest.mark.parametrize(("accept", "status", "part_type", "form"), FRAME_VARIANTS)
def test_frames_for_every_accept_variant(node, stored, accept, status, part_type, form):
    rle, frames = stored["rle"], stored["frames"]
    response = get(node, path_of(rle, "/frames/2,3"), Accept=accept)
    assert response.status_code == status, response.text
    if status == 406:
        body = response.json()
        assert body["status"] == 406
        assert OCTET in body["detail"] and "image/dicom-rle" in body["detail"]  # what it can send
        return
    assert response.headers["Content-Type"].startswith(f'multipart/related; type="{part_type}"')
    parts = parts_of(response)
    assert len(parts) == 2
    if form == "decoded":
        assert [body for _, body in parts] == [frames[1].tobytes(), frames[2].tobytes()]
        assert all(syntax_of(ct) == EXPLICIT for ct, _ in parts)
    else:
        assert all(syntax_of(ct) == RLE for ct, _ in parts)
        # the stored RLE bitstream of each frame: a header naming 2 segments (16-bit samples)
        assert all(body[:4] == b"\x02\x00\x00\x00" for _, body in parts)


def test_frames_of_an_uncompressed_image_for_the_ohif_header(node, stored):
    plain, frames = stored["plain"], stored["frames"]
    accept = f"multipart/related; type={OCTET}; {TS_ALL}"
    response = get(node, path_of(plain, "/frames/1"), Accept=accept)
    assert response.status_code == 200, response.text
    ((content_type, body),) = parts_of(response)
    assert body == frames[0].tobytes()
    assert syntax_of(content_type) == EXPLICIT


def test_the_accept_query_parameter_is_used(node, stored):
    rle = stored["rle"]
    response = get(
        node, path_of(rle, "/frames/1?accept=multipart/related;type=image/dicom-rle"), Accept=OCTET
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith('multipart/related; type="image/dicom-rle"')


# (Accept, study-level status, instance-level status, instance single part?)
INSTANCE_VARIANTS = [
    ("multipart/related; type=application/dicom", 200, 200, False),
    ('multipart/related; type="application/dicom"; transfer-syntax=*', 200, 200, False),
    (f"multipart/related; type=application/dicom; transfer-syntax={EXPLICIT}", 200, 200, False),
    ("application/dicom", 406, 200, True),
    ("application/dicom; transfer-syntax=*", 406, 200, True),
    ("application/dicom, multipart/related; type=application/dicom;q=0.5", 200, 200, True),
    ("*/*", 200, 200, False),
    (
        "multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2",
        406,
        406,
        None,
    ),
    (
        "multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2.4.50",
        406,
        406,
        None,
    ),  # noqa: E501
    ("application/dicom+json", 406, 406, None),
]


@pytest.mark.parametrize(("accept", "study_status", "instance_status", "single"), INSTANCE_VARIANTS)
def test_instances_for_every_accept_variant(
    node, stored, accept, study_status, instance_status, single
):
    plain = stored["plain"]
    study = get(node, f"/studies/{plain.StudyInstanceUID}", Accept=accept)
    assert study.status_code == study_status, study.text
    if study_status == 200:
        assert len(parts_of(study)) == 2
    else:
        assert "multipart/related" in study.json()["detail"]
    instance = get(node, path_of(plain), Accept=accept)
    assert instance.status_code == instance_status, instance.text
    if instance_status != 200:
        assert instance.json()["status"] == 406
        return
    if single:
        assert instance.headers["Content-Type"].startswith("application/dicom")
        body = instance.content
    else:
        ((_, body),) = parts_of(instance)
    received = pydicom.dcmread(BytesIO(body))
    assert received.SOPInstanceUID == plain.SOPInstanceUID


def test_metadata_as_json_xml_or_406(node, stored):
    plain = stored["plain"]
    path = path_of(plain, "/metadata")
    for accept in ("application/dicom+json", "*/*", "application/json", ""):
        response = get(node, path, Accept=accept)
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("application/dicom+json")
        assert response.json()[0]["00080018"]["Value"] == [plain.SOPInstanceUID]

    for accept in ("multipart/related; type=application/dicom+xml", "application/dicom+xml"):
        response = get(node, path, Accept=accept)
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith(
            'multipart/related; type="application/dicom+xml"'
        )
        ((content_type, body),) = parts_of(response)
        assert content_type.startswith("application/dicom+xml")
        root = ElementTree.fromstring(body)
        ns = "{http://dicom.nema.org/PS3.19/models/NativeDICOM}"
        uid = root.find(f"{ns}DicomAttribute[@keyword='SOPInstanceUID']/{ns}Value")
        assert uid is not None and uid.text == plain.SOPInstanceUID
        name = root.find(f"{ns}DicomAttribute[@tag='00100010']/{ns}PersonName/{ns}Alphabetic")
        assert name.find(f"{ns}FamilyName").text == "Doe"

    refused = get(node, path, Accept="text/html")
    assert refused.status_code == 406
    assert "application/dicom+json" in refused.json()["detail"]
    latin = get(node, path + "?charset=iso-8859-1", Accept="application/dicom+json")
    assert latin.status_code == 406
    assert get(node, path + "?charset=utf-8", Accept="application/dicom+json").status_code == 200


def test_stow_with_an_unquoted_type_parameter(node):
    ds = make_ct(size=8)
    boundary = "b0undary"
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + part10(ds)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    for content_type in (
        f"multipart/related; type=application/dicom; boundary={boundary}",
        f'multipart/related; type="application/dicom"; boundary="{boundary}"',
    ):
        response = requests.post(
            dicomweb_url(node) + "/studies",
            data=body,
            headers=headers_for(node, **{"Content-Type": content_type}),
            timeout=30,
        )
        assert response.status_code == 200, (content_type, response.text)
    wrong = requests.post(
        dicomweb_url(node) + "/studies",
        data=body,
        headers=headers_for(
            node, **{"Content-Type": f"multipart/related; type=image/jpeg; boundary={boundary}"}
        ),  # noqa: E501
        timeout=30,
    )
    assert wrong.status_code == 415
    assert wrong.json()["status"] == 415


def test_dicomweb_client_retrieves_frames_and_single_instances(node, stored):
    client = dicomweb_client(node)
    rle, frames = stored["rle"], stored["frames"]
    where = (rle.StudyInstanceUID, rle.SeriesInstanceUID, rle.SOPInstanceUID)
    assert client.retrieve_instance_frames(
        *where, frame_numbers=[3], media_types=((OCTET, EXPLICIT),)
    ) == [frames[2].tobytes()]
    (as_stored,) = client.retrieve_instance_frames(
        *where, frame_numbers=[1], media_types=(("image/dicom-rle", RLE),)
    )
    assert as_stored[:4] == b"\x02\x00\x00\x00"
    instance = client.retrieve_instance(*where, media_types=(("application/dicom", "*"),))
    assert instance.file_meta.TransferSyntaxUID == RLE


def test_single_part_frames_for_one_frame_only(node, stored):
    rle, frames = stored["rle"], stored["frames"]
    one = get(node, path_of(rle, "/frames/2"), Accept=OCTET)
    assert one.status_code == 200, one.text
    assert media.parse_media_type(one.headers["Content-Type"]).media_type == OCTET
    assert one.content == frames[1].tobytes()
    bitstream = get(node, path_of(rle, "/frames/2"), Accept="image/dicom-rle")
    assert bitstream.status_code == 200
    assert syntax_of(bitstream.headers["Content-Type"]) == RLE
    assert bitstream.content[:4] == b"\x02\x00\x00\x00"
    several = get(node, path_of(rle, "/frames/1,2"), Accept=OCTET)
    assert several.status_code == 406
    assert "only for one frame" in several.json()["detail"]
