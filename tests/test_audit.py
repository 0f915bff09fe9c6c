"""DICOM audit messages (PS3.15 A.5) and their delivery by syslog (PS3.15 A.6).

The builders' XML is validated against the shipped RELAX NG schema with lxml and its values are
read back; the spool delivers to real syslog receivers on 127.0.0.1 (plain TCP and TLS with
certificates made here), which go down and come back while messages are emitted.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from lxml import etree
from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomnode.archive.auditlog import AuditLog, tls_context
from dicomnode.config import AuditSettings, read_settings
from dicomnode.governance import audit
from tests.conftest import free_port, wait_until

WHEN = datetime(2025, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)
SOURCE = audit.AuditSource("DICOMNODE", "SEOUL-HOSPITAL")
NODE = audit.dicom_application("DICOMNODE", "10.1.1.5", user_id="dicomnode")
MODALITY = audit.dicom_application("CT01", "10.1.1.20", is_requestor=True)
PATIENT = audit.Patient("PID-7", "Hong^Gildong")
CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY = audit.Study.from_instances(
    "1.2.410.200.1.1",
    [(CT, "1.2.410.200.1.1.1.1"), (CT, "1.2.410.200.1.1.1.2"), (SEG, "1.2.410.200.1.1.2.1")],
    accession_numbers=["ACC-1"],
)


# --- reading messages back ----------------------------------------------------------------


@pytest.fixture(scope="module")
def schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(audit.schema_path())))


def parse(xml: bytes, schema: etree.RelaxNG) -> etree._Element:
    assert xml.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
    document = etree.fromstring(xml)
    assert schema.validate(document), schema.error_log
    return document


def code(element: etree._Element) -> tuple[str, str, str]:
    return (element.get("csd-code"), element.get("codeSystemName"), element.get("originalText"))


def event(document: etree._Element) -> tuple[tuple[str, str, str], str, str, str]:
    e = document.find("EventIdentification")
    return (
        code(e.find("EventID")),
        e.get("EventActionCode"),
        e.get("EventDateTime"),
        e.get("EventOutcomeIndicator"),
    )


def event_types(document: etree._Element) -> list[str]:
    return [c.get("csd-code") for c in document.findall("EventIdentification/EventTypeCode")]


def participants(document: etree._Element) -> list[dict]:
    return [
        {**p.attrib, "roles": [r.get("csd-code") for r in p.findall("RoleIDCode")]}
        for p in document.findall("ActiveParticipant")
    ]


def objects(document: etree._Element) -> list[etree._Element]:
    return document.findall("ParticipantObjectIdentification")


def detail(obj: etree._Element, kind: str) -> bytes:
    (found,) = [d for d in obj.findall("ParticipantObjectDetail") if d.get("type") == kind]
    return base64.b64decode(found.get("value"))


def assert_study_and_patient(document: etree._Element, life_cycle: str | None = None) -> None:
    study, patient = objects(document)
    assert study.get("ParticipantObjectID") == "1.2.410.200.1.1"
    assert (study.get("ParticipantObjectTypeCode"), study.get("ParticipantObjectTypeCodeRole")) == (
        "2",
        "3",
    )
    assert code(study.find("ParticipantObjectIDTypeCode")) == (
        "110180",
        "DCM",
        "Study Instance UID",
    )
    assert study.get("ParticipantObjectDataLifeCycle") == life_cycle
    description = study.find("ParticipantObjectDescription")
    assert [a.get("Number") for a in description.findall("Accession")] == ["ACC-1"]
    assert {s.get("UID"): s.get("NumberOfInstances") for s in description.findall("SOPClass")} == {
        CT: "2",
        SEG: "1",
    }
    assert description.findall("SOPClass/Instance") == []  # counts only unless asked
    assert patient.get("ParticipantObjectID") == "PID-7"
    assert (
        patient.get("ParticipantObjectTypeCode"),
        patient.get("ParticipantObjectTypeCodeRole"),
    ) == (
        "1",
        "1",
    )
    assert code(patient.find("ParticipantObjectIDTypeCode")) == ("2", "RFC-3881", "Patient Number")
    assert patient.findtext("ParticipantObjectName") == "Hong^Gildong"


# --- the builders -------------------------------------------------------------------------


def test_application_activity_start_and_stop(schema):
    operator = audit.person("admin@hospital", "10.1.1.99", name="Admin")
    started = parse(
        audit.application_activity(
            started=True, application=NODE, launchers=[operator], time=WHEN, source=SOURCE
        ),
        schema,
    )
    assert event(started) == (
        ("110100", "DCM", "Application Activity"),
        "E",
        "2025-03-04T05:06:07.890Z",
        "0",
    )
    assert event_types(started) == ["110120"]
    app, launcher = participants(started)
    assert app["UserID"] == "dicomnode" and app["AlternativeUserID"] == "AETITLES=DICOMNODE"
    assert app["roles"] == ["110150"] and app["UserIsRequestor"] == "false"
    assert (app["NetworkAccessPointID"], app["NetworkAccessPointTypeCode"]) == ("10.1.1.5", "2")
    assert launcher["UserID"] == "admin@hospital" and launcher["roles"] == ["110151"]
    assert launcher["UserIsRequestor"] == "true"
    assert objects(started) == []
    source = started.find("AuditSourceIdentification")
    assert source.attrib == {
        "AuditEnterpriseSiteID": "SEOUL-HOSPITAL",
        "AuditSourceID": "DICOMNODE",
    }
    assert [c.get("csd-code") for c in source.findall("AuditSourceTypeCode")] == ["4"]

    stopped = parse(
        audit.application_activity(started=False, application=NODE, time=WHEN, source=SOURCE),
        schema,
    )
    assert event_types(stopped) == ["110121"] and len(participants(stopped)) == 1


def test_audit_log_used(schema):
    dpo = audit.person("dpo@hospital", "10.1.1.30", name="Kim^DPO")
    document = parse(
        audit.audit_log_used(
            accessors=[dpo, NODE],
            log_uri="https://node.hospital/governance/ledger",
            time=WHEN,
            source=SOURCE,
        ),
        schema,
    )
    assert event(document)[:2] == (("110101", "DCM", "Audit Log Used"), "R")
    assert [p["UserID"] for p in participants(document)] == ["dpo@hospital", "dicomnode"]
    (log,) = objects(document)
    assert log.get("ParticipantObjectID") == "https://node.hospital/governance/ledger"
    assert (log.get("ParticipantObjectTypeCode"), log.get("ParticipantObjectTypeCodeRole")) == (
        "2",
        "13",
    )
    assert code(log.find("ParticipantObjectIDTypeCode")) == ("12", "RFC-3881", "URI")
    assert log.findtext("ParticipantObjectName") == "Security Audit Log"
    with pytest.raises(ValueError, match="accessors: 1..2"):
        audit.audit_log_used(accessors=[], log_uri="x", time=WHEN, source=SOURCE)


def test_begin_transferring_instances(schema):
    pacs = audit.dicom_application("PACS", "pacs.hospital")
    document = parse(
        audit.begin_transferring_instances(
            sender=NODE,
            receiver=pacs,
            others=[audit.dicom_application("VIEWER", "10.1.1.40", is_requestor=True)],
            patient=PATIENT,
            studies=[STUDY],
            time=WHEN,
            source=SOURCE,
        ),
        schema,
    )
    assert event(document)[:2] == (("110102", "DCM", "Begin Transferring DICOM Instances"), "E")
    sender, receiver, mover = participants(document)
    assert (sender["UserID"], sender["roles"]) == ("dicomnode", ["110153"])
    assert (receiver["UserID"], receiver["roles"]) == ("PACS", ["110152"])
    assert receiver["NetworkAccessPointTypeCode"] == "1"  # a host name
    assert (mover["UserID"], mover["roles"], mover["UserIsRequestor"]) == ("VIEWER", [], "true")
    assert_study_and_patient(document)


def test_instances_accessed(schema):
    analyzer = audit.Participant("analysis:ct-lung", user_name="ct-lung analyzer")
    document = parse(
        audit.instances_accessed(
            action="R",
            accessors=[analyzer],
            patient=PATIENT,
            studies=[STUDY],
            time=WHEN,
            source=SOURCE,
        ),
        schema,
    )
    assert event(document)[:2] == (("110103", "DCM", "DICOM Instances Accessed"), "R")
    assert participants(document)[0]["UserName"] == "ct-lung analyzer"
    assert_study_and_patient(document)
    with pytest.raises(ValueError, match="C, R, U or D"):
        audit.instances_accessed(
            action="E",
            accessors=[analyzer],
            patient=PATIENT,
            studies=[STUDY],
            time=WHEN,
            source=SOURCE,
        )
    with pytest.raises(ValueError, match="studies: at least 1"):
        audit.instances_accessed(
            action="R", accessors=[analyzer], patient=PATIENT, studies=[], time=WHEN, source=SOURCE
        )


def test_instances_transferred_received_and_sent(schema):
    received = parse(
        audit.instances_transferred(
            action="C",
            sender=MODALITY,
            receiver=NODE,
            patient=PATIENT,
            studies=[STUDY],
            time=WHEN,
            source=SOURCE,
        ),
        schema,
    )
    assert event(received)[:2] == (("110104", "DCM", "DICOM Instances Transferred"), "C")
    sender, receiver = participants(received)
    assert (sender["UserID"], sender["roles"], sender["UserIsRequestor"]) == (
        "CT01",
        ["110153"],
        "true",
    )
    assert (receiver["UserID"], receiver["roles"]) == ("dicomnode", ["110152"])
    assert_study_and_patient(received)

    pacs = audit.dicom_application("PACS", "10.1.1.2", is_requestor=True)
    sent = parse(
        audit.instances_transferred(
            action="R",
            sender=NODE,
            receiver=pacs,
            patient=PATIENT,
            studies=[STUDY],
            time=WHEN,
            source=SOURCE,
        ),
        schema,
    )
    assert event(sent)[1] == "R"
    assert [p["roles"] for p in participants(sent)] == [["110153"], ["110152"]]
    with pytest.raises(ValueError, match="C, R or U"):
        audit.instances_transferred(
            action="D",
            sender=NODE,
            receiver=pacs,
            patient=PATIENT,
            studies=[STUDY],
            time=WHEN,
            source=SOURCE,
        )


@pytest.mark.parametrize(("permanent", "life_cycle"), [(True, "15"), (False, "14")])
def test_study_deleted(schema, permanent, life_cycle):
    sweep = audit.Participant("dicomnode:retention-sweep", is_requestor=True)
    document = parse(
        audit.study_deleted(
            deleters=[sweep],
            patient=PATIENT,
            studies=[STUDY],
            permanent=permanent,
            time=WHEN,
            source=SOURCE,
        ),
        schema,
    )
    assert event(document)[:2] == (("110105", "DCM", "DICOM Study Deleted"), "D")
    assert participants(document)[0]["UserID"] == "dicomnode:retention-sweep"
    assert_study_and_patient(document, life_cycle)
    patient = objects(document)[1]
    assert patient.get("ParticipantObjectDataLifeCycle") is None  # the patient is not deleted


def test_export_to_a_third_party(schema):
    officer = audit.person("researcher@hospital", "10.1.1.77")
    recipient = audit.Participant("partner-lab", network_access_point="lab.partner.example")
    media = audit.destination_media("https://lab.partner.example/stow", host="lab.partner.example")
    anonymized = replace(STUDY, anonymized=True)
    document = parse(
        audit.export(
            exporters=[officer, NODE],
            recipients=[recipient],
            media=media,
            patients=[PATIENT, audit.Patient("PID-8")],
            studies=[anonymized],
            life_cycle=audit.DataLifeCycle.DISCLOSURE,
            time=WHEN,
            source=SOURCE,
        ),
        schema,
    )
    assert event(document)[:2] == (("110106", "DCM", "Export"), "R")
    people = participants(document)
    assert [(p["UserID"], p["roles"]) for p in people] == [
        ("researcher@hospital", ["110153"]),
        ("dicomnode", ["110153"]),
        ("partner-lab", ["110152"]),
        ("https://lab.partner.example/stow", ["110154"]),
    ]
    assert [p["UserIsRequestor"] for p in people] == ["true", "false", "false", "false"]
    medium = document.findall("ActiveParticipant")[3]
    assert code(medium.find("MediaIdentifier/MediaType")) == ("110037", "DCM", "URI")
    assert medium.get("NetworkAccessPointTypeCode") == "1"
    study, first, second = objects(document)
    assert study.get("ParticipantObjectDataLifeCycle") == "11"
    assert study.findtext("ParticipantObjectDescription/Anonymized") == "true"
    assert [first.get("ParticipantObjectID"), second.get("ParticipantObjectID")] == [
        "PID-7",
        "PID-8",
    ]

    nobody_asked = replace(officer, is_requestor=False)
    with pytest.raises(ValueError, match="exactly one"):
        audit.export(
            exporters=[nobody_asked], media=media, patients=[PATIENT], time=WHEN, source=SOURCE
        )
    with pytest.raises(ValueError, match="patients: at least 1"):
        audit.export(exporters=[officer], media=media, patients=[], time=WHEN, source=SOURCE)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_dicom_query_carries_the_identifier(schema, syntax):
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientID = "PID-7"
    identifier.StudyInstanceUID = ""
    document = parse(
        audit.query(
            requester=MODALITY,
            responder=NODE,
            query=audit.dicom_query(STUDY_ROOT_FIND, identifier, syntax),
            time=WHEN,
            source=SOURCE,
        ),
        schema,
    )
    assert event(document)[:2] == (("110112", "DCM", "Query"), "E")
    assert [p["roles"] for p in participants(document)] == [["110153"], ["110152"]]
    (asked,) = objects(document)
    assert asked.get("ParticipantObjectID") == STUDY_ROOT_FIND
    assert (asked.get("ParticipantObjectTypeCode"), asked.get("ParticipantObjectTypeCodeRole")) == (
        "2",
        "3",
    )
    assert code(asked.find("ParticipantObjectIDTypeCode")) == ("110181", "DCM", "SOP Class UID")
    assert detail(asked, "TransferSyntax") == syntax.encode()
    encoded = base64.b64decode(asked.findtext("ParticipantObjectQuery"))
    implicit = syntax == ImplicitVRLittleEndian
    back = read_dataset(io.BytesIO(encoded), implicit, True)
    assert (back.QueryRetrieveLevel, back.PatientID, back.StudyInstanceUID) == (
        "STUDY",
        "PID-7",
        "",
    )


def test_web_query(schema):
    url = "/dicomweb/studies?PatientID=PID-7&includefield=all"
    viewer = audit.person("ohif", "10.1.1.50")
    document = parse(
        audit.query(
            requester=viewer, responder=NODE, query=audit.web_query(url), time=WHEN, source=SOURCE
        ),
        schema,
    )
    (asked,) = objects(document)
    assert asked.get("ParticipantObjectID") == "/dicomweb/studies"
    assert code(asked.find("ParticipantObjectIDTypeCode")) == ("12", "RFC-3881", "URI")
    assert base64.b64decode(asked.findtext("ParticipantObjectQuery")) == url.encode()
    assert asked.findall("ParticipantObjectDetail") == []
    with pytest.raises(ValueError, match="uncompressed"):
        audit.dicom_query(STUDY_ROOT_FIND, b"", "1.2.840.10008.1.2.4.50")


def test_security_alert(schema):
    document = parse(
        audit.security_alert(
            alert_type=audit.NODE_AUTHENTICATION,
            reporters=[NODE],
            performers=[audit.dicom_application("ROGUE", "10.9.9.9")],
            subjects=[audit.AlertSubject("10.9.9.9", "TLS handshake failed: unknown CA")],
            outcome=audit.Outcome.MINOR_FAILURE,
            outcome_description="association refused",
            time=WHEN,
            source=SOURCE,
        ),
        schema,
    )
    assert event(document) == (
        ("110113", "DCM", "Security Alert"),
        "E",
        "2025-03-04T05:06:07.890Z",
        "4",
    )
    assert event_types(document) == ["110126"]
    assert document.findtext("EventIdentification/EventOutcomeDescription") == "association refused"
    assert [p["UserIsRequestor"] for p in participants(document)] == ["false", "false"]
    (subject,) = objects(document)
    assert subject.get("ParticipantObjectID") == "10.9.9.9"
    assert code(subject.find("ParticipantObjectIDTypeCode")) == ("110182", "DCM", "Node ID")
    assert detail(subject, "Alert Description") == b"TLS handshake failed: unknown CA"

    policy = parse(
        audit.security_alert(
            alert_type=audit.SECURITY_CONFIGURATION,
            reporters=[audit.person("dpo@hospital", "10.1.1.30")],
            subjects=[
                audit.AlertSubject(
                    "file:///etc/dicomnode/policy.toml",
                    "sharing rule research-2 added",
                    audit.ID_URI,
                    audit.ROLE_MASTER_FILE,
                )
            ],
            time=WHEN,
            source=SOURCE,
        ),
        schema,
    )
    assert event_types(policy) == ["110129"] and event(policy)[3] == "0"
    assert objects(policy)[0].get("ParticipantObjectTypeCodeRole") == "5"
    with pytest.raises(ValueError, match="performers"):
        audit.security_alert(
            alert_type=audit.USE_OF_RESTRICTED_FUNCTION,
            reporters=[NODE],
            performers=[audit.person("mallory", "10.9.9.9")],
            time=WHEN,
            source=SOURCE,
        )


def test_user_authentication(schema):
    user = audit.person("kim@hospital", "10.1.1.60")
    login = parse(
        audit.user_authentication(
            login=True,
            user=user,
            authenticator=NODE,
            outcome=audit.Outcome.MINOR_FAILURE,
            time=WHEN,
            source=SOURCE,
        ),
        schema,
    )
    assert event(login)[0:2] == (("110114", "DCM", "User Authentication"), "E")
    assert event(login)[3] == "4" and event_types(login) == ["110122"]
    person, node = participants(login)
    assert (person["UserID"], person["NetworkAccessPointID"]) == ("kim@hospital", "10.1.1.60")
    assert objects(login) == []
    logout = parse(
        audit.user_authentication(login=False, user=user, time=WHEN, source=SOURCE), schema
    )
    assert event_types(logout) == ["110123"]
    with pytest.raises(ValueError, match="network_access_point"):
        audit.user_authentication(
            login=True, user=audit.person("kim@hospital"), time=WHEN, source=SOURCE
        )


def test_large_study_lists_every_instance(schema):
    uids = [(CT, f"1.2.410.200.1.1.1.{n}") for n in range(3000)]
    study = audit.Study.from_instances("1.2.410.200.1.1", uids, list_instances=True)
    xml = audit.instances_transferred(
        action="C",
        sender=MODALITY,
        receiver=NODE,
        patient=PATIENT,
        studies=[study],
        time=WHEN,
        source=SOURCE,
    )
    document = parse(xml, schema)
    (sop_class,) = document.findall(".//SOPClass")
    assert sop_class.get("NumberOfInstances") == "3000"
    assert [i.get("UID") for i in sop_class.findall("Instance")] == [u for _, u in uids]
    assert len(xml) > 64 * 1024


def test_times_values_and_the_model_are_checked(schema):
    seoul = datetime(2025, 3, 4, 14, 6, 7, tzinfo=timezone(timedelta(hours=9)))
    xml = audit.application_activity(started=True, application=NODE, time=seoul, source=SOURCE)
    assert event(parse(xml, schema))[2] == "2025-03-04T05:06:07.000Z"
    with pytest.raises(ValueError, match="time zone"):
        audit.application_activity(
            started=True, application=NODE, time=datetime(2025, 3, 4), source=SOURCE
        )
    with pytest.raises(ValueError, match="only one participant may be the requestor"):
        audit.instances_transferred(
            action="C",
            sender=MODALITY,
            receiver=replace(NODE, is_requestor=True),
            patient=PATIENT,
            studies=[STUDY],
            time=WHEN,
            source=SOURCE,
        )
    with pytest.raises(ValueError, match="sop_classes are required"):
        audit.Study("1.2.3", accession_numbers=("A",))
    with pytest.raises(ValueError, match="Patient.patient_id"):
        audit.Patient("")
    with pytest.raises(ValueError, match="2 instance UIDs"):
        audit.SopClass(CT, 3, ("1.1", "1.2"))

    # Korean names travel as UTF-8; control characters cannot be carried by XML 1.0
    odd = audit.Patient("PID\x00-9", "홍길동\x07")
    xml = audit.instances_accessed(
        action="R", accessors=[NODE], patient=odd, studies=[STUDY], time=WHEN, source=SOURCE
    )
    patient = objects(parse(xml, schema))[1]
    assert patient.get("ParticipantObjectID") == "PID\ufffd-9"
    assert patient.findtext("ParticipantObjectName") == "홍길동\ufffd"


def test_the_schema_rejects_what_the_standard_does_not_allow(schema):
    xml = audit.instances_transferred(
        action="C",
        sender=MODALITY,
        receiver=NODE,
        patient=PATIENT,
        studies=[STUDY],
        time=WHEN,
        source=SOURCE,
    )
    breakers = [
        lambda d: d.find("EventIdentification").set("EventOutcomeIndicator", "3"),
        lambda d: d.find("EventIdentification").set("EventDateTime", "yesterday"),
        lambda d: d.find("EventIdentification").set("EventActionCode", "X"),
        lambda d: d.remove(d.find("AuditSourceIdentification")),
        lambda d: [d.remove(p) for p in d.findall("ActiveParticipant")],
        lambda d: d.find("ActiveParticipant").attrib.pop("UserIsRequestor"),
        lambda d: objects(d)[1].remove(objects(d)[1].find("ParticipantObjectName")),
        lambda d: objects(d)[0].set("ParticipantObjectDataLifeCycle", "16"),
        lambda d: d.find(".//SOPClass").set("NumberOfInstances", "two"),
        lambda d: d.append(etree.Element("Unexpected")),
    ]
    for number, breaker in enumerate(breakers):
        document = etree.fromstring(xml)
        breaker(document)
        assert not schema.validate(document), f"breaker {number} was accepted"


# --- syslog receivers ---------------------------------------------------------------------


class SyslogReceiver:
    """A syslog server for RFC 6587/5425 octet-counted frames on 127.0.0.1, TCP or TLS; it can
    be stopped and started again on the same port."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.context = context
        self.port = 0
        self.frames: list[tuple[int, bytes]] = []  # (declared length, message)
        self.tls_versions: list[str] = []
        self.client_certificates: list[dict] = []
        self.handshake_failures: list[str] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._connections: list[socket.socket] = []
        self._running = threading.Event()

    @property
    def messages(self) -> list[bytes]:
        with self._lock:
            return [message for _, message in self.frames]

    def start(self) -> SyslogReceiver:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen()
        self.port = self._listener.getsockname()[1]
        self._running.set()
        self._spawn(self._accept)
        return self

    def stop(self) -> None:
        self._running.clear()
        for thread in self._threads:
            thread.join()
        self._threads = []
        self._listener.close()

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            while self._running.is_set():
                if selector.select(0.05):
                    connection, _ = self._listener.accept()
                    self._spawn(self._serve, connection)

    def _serve(self, connection: socket.socket) -> None:
        try:
            if self.context is not None:
                connection.settimeout(5)
                try:
                    connection = self.context.wrap_socket(connection, server_side=True)
                except (ssl.SSLError, OSError) as error:
                    with self._lock:
                        self.handshake_failures.append(str(error))
                    return
                with self._lock:
                    self.tls_versions.append(connection.version())
                    self.client_certificates.append(connection.getpeercert() or {})
            connection.settimeout(0.05)
            buffer = b""
            while self._running.is_set():
                try:
                    chunk = connection.recv(65536)
                except (TimeoutError, ssl.SSLWantReadError):
                    continue
                if not chunk:
                    return
                buffer += chunk
                while b" " in buffer[:12]:
                    length, _, rest = buffer.partition(b" ")
                    if len(rest) < int(length):
                        break
                    with self._lock:
                        self.frames.append((int(length), rest[: int(length)]))
                    buffer = rest[int(length) :]
        finally:
            connection.close()


def split_syslog(message: bytes) -> dict:
    """The RFC 5424 fields of one message with its MSG (BOM + XML)."""
    pri_version, stamp, host, app, procid, msgid, structured, msg = message.split(b" ", 7)
    return {
        "pri_version": pri_version,
        "timestamp": stamp,
        "hostname": host,
        "app": app,
        "procid": procid,
        "msgid": msgid,
        "structured_data": structured,
        "msg": msg,
    }


def xml_of(message: bytes) -> bytes:
    msg = split_syslog(message)["msg"]
    assert msg.startswith(b"\xef\xbb\xbf")
    return msg[3:]


def numbered(n: int) -> bytes:
    """A real audit message told apart by its patient ID."""
    return audit.instances_transferred(
        action="C",
        sender=MODALITY,
        receiver=NODE,
        patient=audit.Patient(f"PID-{n}"),
        studies=[STUDY],
        time=WHEN,
        source=SOURCE,
    )


def settings_for(port: int, protocol: str = "tcp", **more) -> AuditSettings:
    return AuditSettings(
        syslog_host="127.0.0.1",
        syslog_port=port,
        syslog_protocol=protocol,
        retry_interval=0.05,
        send_timeout=5,
        **more,
    )


def spooled_files(spool: Path) -> list[str]:
    return sorted(p.name for p in spool.glob("*.xml"))


@pytest.fixture
def receiver():
    server = SyslogReceiver().start()
    yield server
    server.stop()


@pytest.fixture
def audit_log(tmp_path):
    logs: list[AuditLog] = []

    def make(settings: AuditSettings, spool: Path | None = None) -> AuditLog:
        log = AuditLog(spool or tmp_path / "spool", settings)
        logs.append(log)
        return log

    yield make
    for log in logs:
        log.stop()


# --- certificates made here -----------------------------------------------------------------


def make_certificate(folder: Path, name: str, hosts: list[str]) -> tuple[Path, Path]:
    """A self-signed certificate (usable as its own CA) for `hosts` (DNS names or IPs)."""
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    alt_names = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(client_ca))
    return context


# --- delivery -------------------------------------------------------------------------------


def test_messages_arrive_as_rfc5424_over_tcp(receiver, audit_log, tmp_path):
    log = audit_log(settings_for(receiver.port))
    log.start()
    sent = [numbered(n) for n in range(3)]
    for xml in sent:
        log.emit(xml)
    wait_until(lambda: len(receiver.messages) == 3, what="three messages")
    for (length, message), xml in zip(receiver.frames, sent, strict=True):
        assert length == len(message)
        fields = split_syslog(message)
        assert fields["pri_version"] == b"<85>1"
        assert fields["app"] == b"dicomnode"
        assert fields["msgid"] == b"DICOM+RFC3881"
        assert fields["structured_data"] == b"-"
        assert fields["hostname"] == socket.gethostname().encode()
        stamp = datetime.strptime(fields["timestamp"].decode(), "%Y-%m-%dT%H:%M:%S.%fZ")
        assert abs(stamp.replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(minutes=5)
        assert xml_of(message) == xml
    assert wait_until(lambda: log.pending() == [], what="an empty spool")
    assert spooled_files(tmp_path / "spool") == []


def test_tls_with_hostname_check_and_tls_1_2_or_later(audit_log, tmp_path, schema):
    cert, key = make_certificate(tmp_path, "repository", ["localhost", "127.0.0.1"])
    receiver = SyslogReceiver(server_context(cert, key)).start()
    try:
        settings = settings_for(receiver.port, "tls", ca_file=cert)
        assert tls_context(settings).minimum_version == ssl.TLSVersion.TLSv1_2
        log = audit_log(settings)
        log.start()
        log.emit(numbered(1))
        wait_until(lambda: receiver.messages, what="a message over TLS")
        assert receiver.tls_versions[0] in ("TLSv1.2", "TLSv1.3")
        parse(xml_of(receiver.messages[0]), schema)
        assert wait_until(lambda: log.pending() == [], what="an empty spool")
    finally:
        receiver.stop()


def test_tls_refuses_a_certificate_for_another_host_unless_told(audit_log, tmp_path, caplog):
    caplog.set_level(logging.WARNING, "dicomnode.archive.auditlog")
    cert, key = make_certificate(tmp_path, "elsewhere", ["elsewhere.example"])
    receiver = SyslogReceiver(server_context(cert, key)).start()
    try:
        checking = audit_log(settings_for(receiver.port, "tls", ca_file=cert))
        checking.start()
        checking.emit(numbered(1))
        wait_until(lambda: receiver.handshake_failures, what="a refused handshake")
        wait_until(
            lambda: any(getattr(r, "event", "") == "audit_delivery_failed" for r in caplog.records),
            what="the delivery failure logged",
        )
        checking.stop()
        assert receiver.messages == [] and len(checking.pending()) == 1

        trusting = audit_log(settings_for(receiver.port, "tls", ca_file=cert, check_hostname=False))
        trusting.start()
        wait_until(lambda: len(receiver.messages) == 1, what="the message with check_hostname off")
        assert xml_of(receiver.messages[0]) == numbered(1)
    finally:
        receiver.stop()


def test_mutual_tls_sends_the_client_certificate(audit_log, tmp_path):
    server_cert, server_key = make_certificate(tmp_path, "repository", ["127.0.0.1"])
    client_cert, client_key = make_certificate(tmp_path, "dicomnode-client", ["node.hospital"])
    receiver = SyslogReceiver(
        server_context(server_cert, server_key, client_ca=client_cert)
    ).start()
    try:
        anonymous = audit_log(settings_for(receiver.port, "tls", ca_file=server_cert))
        anonymous.start()
        anonymous.emit(numbered(1))
        wait_until(lambda: receiver.handshake_failures, what="a handshake without a client cert")
        anonymous.stop()
        assert receiver.messages == [] and len(anonymous.pending()) == 1  # kept for a retry

        identified = audit_log(
            settings_for(
                receiver.port,
                "tls",
                ca_file=server_cert,
                cert_file=client_cert,
                key_file=client_key,
            )
        )
        identified.start()
        wait_until(lambda: receiver.messages, what="the message over mutual TLS")
        subject = dict(item[0] for item in receiver.client_certificates[-1]["subject"])
        assert subject["commonName"] == "dicomnode-client"
    finally:
        receiver.stop()


def test_an_outage_loses_and_reorders_nothing(receiver, audit_log, tmp_path, caplog):
    caplog.set_level(logging.INFO, "dicomnode.archive.auditlog")
    log = audit_log(settings_for(receiver.port))
    log.start()
    sent = [numbered(n) for n in range(45)]
    for xml in sent[:5]:
        log.emit(xml)
    wait_until(lambda: len(receiver.messages) == 5, what="the first five")

    receiver.stop()
    for xml in sent[5:25]:
        log.emit(xml)
    wait_until(
        lambda: any(getattr(r, "event", "") == "audit_delivery_failed" for r in caplog.records),
        what="a failed delivery",
    )
    assert len(receiver.messages) == 5
    assert len(log.pending()) == 20 and len(spooled_files(tmp_path / "spool")) == 20

    receiver.start()  # the same port again
    for xml in sent[25:]:
        log.emit(xml)
    wait_until(lambda: len(receiver.messages) >= 45, what="all 45 messages")
    assert [xml_of(m) for m in receiver.messages] == sent  # each once, in order
    assert wait_until(lambda: log.pending() == [], what="an empty spool")
    assert spooled_files(tmp_path / "spool") == []
    assert any(getattr(r, "event", "") == "audit_delivery_resumed" for r in caplog.records)


def test_a_server_that_does_not_read_does_not_swallow_messages(audit_log, caplog):
    """Written to the socket is not yet received: a message leaves the spool only once the
    server's TCP stack acknowledged it, so one that never reads cannot make it vanish."""
    caplog.set_level(logging.WARNING, "dicomnode.archive.auditlog")
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # a tiny receive window
    stalled.bind(("127.0.0.1", 0))
    stalled.listen()
    port = stalled.getsockname()[1]
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(stalled.accept()[0]), daemon=True).start()
    big = b"<AuditMessage>" + b"x" * 200_000 + b"</AuditMessage>"
    log = audit_log(replace(settings_for(port), send_timeout=1))
    log.start()
    log.emit(big)
    wait_until(
        lambda: any(getattr(r, "event", "") == "audit_delivery_failed" for r in caplog.records),
        what="the unacknowledged batch noticed",
    )
    assert len(log.pending()) == 1
    for connection in accepted:
        connection.close()  # what it had buffered is gone with it
    stalled.close()

    receiver = SyslogReceiver()
    receiver.port = port
    receiver.start()
    try:
        wait_until(lambda: receiver.messages, what="the message resent to a working server")
        assert xml_of(receiver.messages[0]) == big
        assert wait_until(lambda: log.pending() == [], what="an empty spool")
    finally:
        receiver.stop()


def test_a_message_over_64_kib_arrives_whole(receiver, audit_log, schema):
    uids = [(CT, f"1.2.410.200.1.1.1.{n}") for n in range(4000)]
    study = audit.Study.from_instances("1.2.410.200.1.1", uids, list_instances=True)
    big = audit.instances_transferred(
        action="C",
        sender=MODALITY,
        receiver=NODE,
        patient=PATIENT,
        studies=[study],
        time=WHEN,
        source=SOURCE,
    )
    assert len(big) > 64 * 1024
    log = audit_log(settings_for(receiver.port))
    log.start()
    log.emit(big)
    log.emit(numbered(1))
    wait_until(lambda: len(receiver.messages) == 2, what="the big message and the next")
    assert receiver.frames[0][0] == len(receiver.messages[0])
    assert xml_of(receiver.messages[0]) == big
    assert len(parse(big, schema).findall(".//Instance")) == 4000
    assert xml_of(receiver.messages[1]) == numbered(1)


def test_a_crash_leaves_messages_that_the_next_run_sends(receiver, audit_log, tmp_path):
    spool = tmp_path / "spool"
    down = audit_log(settings_for(free_port()), spool)  # nothing listens there
    down.start()
    sent = [numbered(n) for n in range(4)]
    for xml in sent[:3]:
        down.emit(xml)
    down.stop()  # as if the process died: nothing was delivered
    crashed = spool / "tmp" / "half-written.part"
    crashed.write_bytes(b"<AuditMes")  # died mid-emit, an hour and more ago
    os.utime(crashed, (time.time() - 7200, time.time() - 7200))
    writing = spool / "tmp" / "being-written.part"
    writing.write_bytes(b"<AuditMes")  # another process (a CLI command) writing right now
    assert len(spooled_files(spool)) == 3

    again = audit_log(settings_for(receiver.port), spool)
    assert not crashed.exists() and writing.exists()
    again.emit(sent[3])
    names = spooled_files(spool)
    assert [int(n.split("-")[0]) for n in names] == [1, 2, 3, 4]
    again.start()
    wait_until(lambda: len(receiver.messages) == 4, what="the spooled messages")
    assert [xml_of(m) for m in receiver.messages] == sent
    assert wait_until(lambda: again.pending() == [], what="an empty spool")


def test_without_syslog_the_spool_keeps_messages_within_its_limits(audit_log, tmp_path, caplog):
    spool = tmp_path / "spool"
    one = numbered(1)
    log = audit_log(AuditSettings(spool_max_bytes=len(one) * 3), spool)
    log.start()  # no syslog_host: nothing to start
    assert not any(t.name == "audit-sender" for t in threading.enumerate())
    for n in range(5):
        log.emit(numbered(n))
    kept = [p.read_bytes() for p in log.pending()]
    assert kept == [numbered(n) for n in (2, 3, 4)]  # the oldest went first
    assert [p.name for p in log.pending()] == spooled_files(spool)
    assert any(getattr(r, "event", "") == "audit_spool_pruned" for r in caplog.records)

    aged = tmp_path / "aged"
    aged.mkdir()
    (aged / "0000000000000001-20200101T000000000000Z.xml").write_bytes(one)
    fresh = audit_log(AuditSettings(spool_max_age_days=30), aged)
    fresh.emit(numbered(2))
    assert [p.read_bytes() for p in fresh.pending()] == [numbered(2)]
    assert spooled_files(aged) == ["0000000000000002-" + spooled_files(aged)[0][17:]]


def test_emit_never_raises_and_disabled_writes_nothing(audit_log, tmp_path, caplog):
    log = audit_log(AuditSettings())
    log.emit("not bytes")  # type: ignore[arg-type]
    log.emit(b"")
    (tmp_path / "spool" / "tmp").rmdir()  # the disk goes away under the node
    log.emit(numbered(1))
    failures = [r for r in caplog.records if getattr(r, "event", "") == "audit_spool_failed"]
    assert len(failures) == 3
    assert log.pending() == []

    off = audit_log(AuditSettings(enabled=False), tmp_path / "off")
    off.emit(numbered(1))
    off.start()
    assert not (tmp_path / "off").exists() and off.pending() == []


def test_start_and_stop_are_idempotent(receiver, audit_log, tmp_path):
    log = audit_log(settings_for(receiver.port))
    log.stop()  # never started
    log.start()
    log.start()
    assert sum(t.name == "audit-sender" for t in threading.enumerate()) == 1
    log.stop()
    log.stop()
    assert not any(t.name == "audit-sender" for t in threading.enumerate())
    log.start()
    log.emit(numbered(1))
    assert log.flush(10)  # acknowledged by the server's TCP stack; its reader follows
    wait_until(lambda: receiver.messages, what="the message read by the receiver")
    assert [xml_of(m) for m in receiver.messages] == [numbered(1)]


def test_from_settings_spools_under_data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "node.toml"
    config.write_text('[node]\nae_title = "NODE7"\ndata_dir = "data"\n')
    settings = read_settings(config)
    log = AuditLog.from_settings(settings)
    assert log.spool_dir == tmp_path / "data" / "audit-spool" and log.spool_dir.is_dir()
    assert settings.audit.audit_source_id == "NODE7"


def test_messages_another_process_spools_are_sent_by_the_node(receiver, audit_log, tmp_path):
    spool = tmp_path / "spool"
    node = audit_log(settings_for(receiver.port), spool)
    node.start()
    node.emit(numbered(1))
    wait_until(lambda: len(receiver.messages) == 1, what="the node's own message")
    cli = audit_log(AuditSettings(), spool)  # a CLI command: spools, never sends
    cli.emit(numbered(2))
    cli.emit(numbered(3))
    # names never collide across processes: had the CLI's second message taken its first's
    # name, only two messages would arrive (the node may already have sent the first of them,
    # so the spool itself is not counted)
    wait_until(lambda: len(receiver.messages) == 3, what="the CLI's messages, sent by the node")
    assert [xml_of(m) for m in receiver.messages] == [numbered(n) for n in (1, 2, 3)]
    assert wait_until(lambda: not spooled_files(spool), what="an empty spool")
