"""The DICOM audit message model (PS3.15 A.5): codes, participants, objects and their XML.

Pure: no clock, no I/O. `AuditMessage.to_xml` writes UTF-8 XML that validates against the
DICOM Audit Message Schema shipped in ``data/audit-message.rng`` (see `schema_path`). The
builders of the messages the node emits are in `dicomnode.governance.audit`.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from xml.etree import ElementTree as ET

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian


@dataclass(frozen=True)
class Code:
    """A coded value: code, coding scheme (``codeSystemName``) and meaning (``originalText``)."""

    code: str
    scheme: str
    meaning: str


# Event IDs (PS3.16 CID 400)
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
AUDIT_LOG_USED = Code("110101", "DCM", "Audit Log Used")
BEGIN_TRANSFERRING_INSTANCES = Code("110102", "DCM", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED = Code("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
STUDY_DELETED = Code("110105", "DCM", "DICOM Study Deleted")
EXPORT = Code("110106", "DCM", "Export")
QUERY = Code("110112", "DCM", "Query")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")

# Event type codes of Application Activity and User Authentication
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
LOGIN = Code("110122", "DCM", "Login")
LOGOUT = Code("110123", "DCM", "Logout")

# Security alert types (PS3.16 CID 403 "Security Alert Type Code")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
EMERGENCY_OVERRIDE_STARTED = Code("110127", "DCM", "Emergency Override Started")
NETWORK_CONFIGURATION = Code("110128", "DCM", "Network Configuration")
SECURITY_CONFIGURATION = Code("110129", "DCM", "Security Configuration")
SOFTWARE_CONFIGURATION = Code("110131", "DCM", "Software Configuration")
USE_OF_RESTRICTED_FUNCTION = Code("110132", "DCM", "Use of Restricted Function")
AUDIT_RECORDING_STOPPED = Code("110133", "DCM", "Audit Recording Stopped")
AUDIT_RECORDING_STARTED = Code("110134", "DCM", "Audit Recording Started")
OBJECT_SECURITY_ATTRIBUTES_CHANGED = Code("110135", "DCM", "Object Security Attributes Changed")
SECURITY_ROLES_CHANGED = Code("110136", "DCM", "Security Roles Changed")
USER_SECURITY_ATTRIBUTES_CHANGED = Code("110137", "DCM", "User Security Attributes Changed")
EMERGENCY_OVERRIDE_STOPPED = Code("110138", "DCM", "Emergency Override Stopped")
AUTHORIZATION_DECISION = Code("110144", "DCM", "Authorization Decision")
ACCESS_CONTROL_DECISION = Code("110147", "DCM", "Access Control Decision")

# Active participant roles (PS3.16 CID 402)
ROLE_APPLICATION = Code("110150", "DCM", "Application")
ROLE_APPLICATION_LAUNCHER = Code("110151", "DCM", "Application Launcher")
ROLE_DESTINATION = Code("110152", "DCM", "Destination Role ID")
ROLE_SOURCE = Code("110153", "DCM", "Source Role ID")
ROLE_DESTINATION_MEDIA = Code("110154", "DCM", "Destination Media")

# Media types (PS3.16 CID 405)
MEDIA_URI = Code("110037", "DCM", "URI")
MEDIA_EMAIL = Code("110157", "DCM", "Email Message")
MEDIA_USB = Code("110030", "DCM", "USB Disk Emulation")
MEDIA_CD = Code("110032", "DCM", "CD")
MEDIA_DVD = Code("110033", "DCM", "DVD")
MEDIA_PAPER = Code("110038", "DCM", "Paper Document")

# Participant object ID types (PS3.15 A.5.1.2.4 and CID 404)
ID_PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
ID_URI = Code("12", "RFC-3881", "URI")
ID_STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
ID_SOP_CLASS_UID = Code("110181", "DCM", "SOP Class UID")
ID_NODE = Code("110182", "DCM", "Node ID")

# ParticipantObjectTypeCode and ParticipantObjectTypeCodeRole values used here (A.5.1.2.2)
TYPE_PERSON = 1
TYPE_SYSTEM_OBJECT = 2
ROLE_PATIENT = 1
ROLE_REPORT = 3
ROLE_MASTER_FILE = 5
ROLE_SECURITY_RESOURCE = 13

# AuditSourceTypeCode values (A.5.1.2.1)
SOURCE_WEB_SERVER = "3"
SOURCE_APPLICATION_SERVER = "4"

ACTIONS = ("C", "R", "U", "D", "E")


class Outcome(IntEnum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4  # action restarted, e.g. a wrong password on the first try
    SERIOUS_FAILURE = 8  # action terminated
    MAJOR_FAILURE = 12  # the function is now unavailable


class DataLifeCycle(IntEnum):
    """ParticipantObjectDataLifeCycle (A.5.1.2.3)."""

    ORIGINATION = 1
    IMPORT = 2
    AMENDMENT = 3
    VERIFICATION = 4
    TRANSLATION = 5
    ACCESS = 6
    DEIDENTIFICATION = 7
    AGGREGATION = 8
    REPORT = 9
    EXPORT = 10
    DISCLOSURE = 11
    RECEIPT_OF_DISCLOSURE = 12
    ARCHIVING = 13
    LOGICAL_DELETION = 14
    PERMANENT_ERASURE = 15


def schema_path() -> Path:
    """The DICOM Audit Message Schema (RELAX NG, XML syntax) shipped with the package."""
    return Path(__file__).with_name("data") / "audit-message.rng"


# --- the model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditSource:
    """AuditSourceIdentification: who reports. `source_id` defaults to the node's AE title in
    the settings (``audit.audit_source_id``)."""

    source_id: str
    enterprise_site_id: str = ""
    type_codes: tuple[str, ...] = (SOURCE_APPLICATION_SERVER,)

    def __post_init__(self) -> None:
        _require(self.source_id, "AuditSource.source_id")


@dataclass(frozen=True)
class Participant:
    """ActiveParticipant: a person, process or medium taking part in the event.

    `network_access_point` is a host name, an IP address or a URI; its type code (1, 2 or 5) is
    derived from its form. The builders add the role codes their event requires to `roles`.
    """

    user_id: str
    is_requestor: bool = False
    alternative_user_id: str = ""
    user_name: str = ""
    network_access_point: str = ""
    roles: tuple[Code, ...] = ()
    media_type: Code | None = None  # MediaIdentifier/MediaType, for media participants

    def __post_init__(self) -> None:
        _require(self.user_id, "Participant.user_id")

    @property
    def network_access_point_type(self) -> str:
        """NetworkAccessPointTypeCode: 2 for an IP address, 5 for a URI, else 1 (machine name)."""
        point = self.network_access_point
        if "://" in point:
            return "5"
        try:
            ipaddress.ip_address(point.strip("[]"))
        except ValueError:
            return "1"
        return "2"


def dicom_application(
    ae_title: str, host: str = "", *, user_id: str = "", is_requestor: bool = False
) -> Participant:
    """A DICOM application: UserID is `user_id` (the process, as in the node's own logs) or
    else the AE title; AlternativeUserID lists the AE title as A.5.2.2 prescribes."""
    _require(ae_title, "ae_title")
    return Participant(
        user_id=user_id or ae_title,
        alternative_user_id=f"AETITLES={ae_title}",
        is_requestor=is_requestor,
        network_access_point=host,
    )


def person(
    user_id: str, host: str = "", *, name: str = "", is_requestor: bool = True
) -> Participant:
    """A person, identified as on this system (e.g. a token subject, login@domain)."""
    return Participant(
        user_id=user_id, user_name=name, is_requestor=is_requestor, network_access_point=host
    )


def destination_media(uri: str, media_type: Code = MEDIA_URI, host: str = "") -> Participant:
    """Where exported data goes: a URI (the preferred form), a mailto: address or a medium."""
    return Participant(
        user_id=uri,
        is_requestor=False,
        network_access_point=host,
        roles=(ROLE_DESTINATION_MEDIA,),
        media_type=media_type,
    )


@dataclass(frozen=True)
class Patient:
    """The patient whose data the event touched (ParticipantObjectID is the Patient ID)."""

    patient_id: str
    name: str = ""
    # ParticipantObjectDetail type-value pairs: the ledger entry this message shares an
    # identifier with ("DisclosureID"), the consent versions a decision rested on ("ConsentRef")
    details: tuple[tuple[str, bytes], ...] = ()

    def __post_init__(self) -> None:
        _require(self.patient_id, "Patient.patient_id")


@dataclass(frozen=True)
class SopClass:
    """The instances of one SOP class in a study: a count and, optionally, their UIDs."""

    uid: str
    number_of_instances: int
    instance_uids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(self.uid, "SopClass.uid")
        if self.number_of_instances < 0:
            raise ValueError(f"SopClass.number_of_instances must be 0 or more for {self.uid}")
        if self.instance_uids and len(self.instance_uids) != self.number_of_instances:
            raise ValueError(
                f"SopClass {self.uid}: number_of_instances is {self.number_of_instances} but "
                f"{len(self.instance_uids)} instance UIDs are listed"
            )


@dataclass(frozen=True)
class Study:
    """A study and what of it the event touched, for the ParticipantObjectDescription."""

    study_uid: str
    sop_classes: tuple[SopClass, ...] = ()
    accession_numbers: tuple[str, ...] = ()
    anonymized: bool | None = None
    encrypted: bool | None = None

    def __post_init__(self) -> None:
        _require(self.study_uid, "Study.study_uid")
        extra = self.accession_numbers or self.anonymized is not None or self.encrypted is not None
        if extra and not self.sop_classes:  # A.5.2: SOPClass is then required
            raise ValueError(
                f"Study {self.study_uid}: sop_classes are required when accession numbers, "
                "anonymized or encrypted are given"
            )

    @classmethod
    def from_instances(
        cls,
        study_uid: str,
        instances: Iterable[tuple[str, str]],
        *,
        list_instances: bool = False,
        accession_numbers: Sequence[str] = (),
        anonymized: bool | None = None,
        encrypted: bool | None = None,
    ) -> Study:
        """A study from (SOP Class UID, SOP Instance UID) pairs, counted per SOP class; the
        instance UIDs themselves are listed only with `list_instances`."""
        by_class: dict[str, list[str]] = {}
        for sop_class_uid, sop_instance_uid in instances:
            by_class.setdefault(sop_class_uid, []).append(sop_instance_uid)
        return cls(
            study_uid,
            tuple(
                SopClass(uid, len(uids), tuple(uids) if list_instances else ())
                for uid, uids in sorted(by_class.items())
            ),
            tuple(accession_numbers),
            anonymized,
            encrypted,
        )


@dataclass(frozen=True)
class Query:
    """What was asked: a DICOM query (SOP class + identifier) or another protocol's query."""

    object_id: str
    id_type: Code
    query: bytes
    transfer_syntax_uid: str = ""  # set for DICOM queries


def dicom_query(
    sop_class_uid: str,
    identifier: Dataset | bytes,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
) -> Query:
    """A DIMSE query (C-FIND, also the identifier of a C-MOVE/C-GET) of `sop_class_uid`.

    A Dataset is encoded in `transfer_syntax_uid` (an uncompressed syntax); bytes are taken as
    already encoded in it.
    """
    _require(sop_class_uid, "sop_class_uid")
    syntax = UID(transfer_syntax_uid)
    if not syntax.is_transfer_syntax or syntax.is_compressed or syntax.is_deflated:
        raise ValueError(f"transfer_syntax_uid must be an uncompressed syntax, got {syntax!r}")
    if isinstance(identifier, Dataset):
        fp = DicomBytesIO()
        fp.is_little_endian = syntax.is_little_endian
        fp.is_implicit_VR = syntax.is_implicit_VR
        write_dataset(fp, identifier)
        identifier = fp.getvalue()
    return Query(sop_class_uid, ID_SOP_CLASS_UID, bytes(identifier), str(syntax))


def web_query(url: str) -> Query:
    """A query in another protocol (QIDO-RS): the ID is the URL without its query string, and
    the query is the whole URL as received."""
    _require(url, "url")
    return Query(url.split("?", 1)[0], ID_URI, url.encode("utf-8"))


@dataclass(frozen=True)
class AlertSubject:
    """What a security alert is about: a node (host name or IP), or a resource by URI."""

    object_id: str
    description: str
    id_type: Code = ID_NODE
    role: int | None = None  # ROLE_MASTER_FILE or ROLE_SECURITY_RESOURCE

    def __post_init__(self) -> None:
        _require(self.object_id, "AlertSubject.object_id")
        _require(self.description, "AlertSubject.description")


@dataclass(frozen=True)
class ObjectDescription:
    """ParticipantObjectDescription."""

    sop_classes: tuple[SopClass, ...] = ()
    accession_numbers: tuple[str, ...] = ()
    anonymized: bool | None = None
    encrypted: bool | None = None


@dataclass(frozen=True)
class ParticipantObject:
    """ParticipantObjectIdentification: data the event touched."""

    object_id: str
    id_type: Code
    type_code: int
    role: int | None = None
    life_cycle: DataLifeCycle | None = None
    name: str = ""
    query: bytes | None = None  # written instead of the name when present
    details: tuple[tuple[str, bytes], ...] = ()
    description: ObjectDescription | None = None

    def __post_init__(self) -> None:
        _require(self.object_id, "ParticipantObject.object_id")


@dataclass(frozen=True)
class Event:
    """EventIdentification."""

    event_id: Code
    action: str
    time: datetime
    outcome: Outcome = Outcome.SUCCESS
    type_codes: tuple[Code, ...] = ()
    outcome_description: str = ""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"Event.action must be one of {', '.join(ACTIONS)}: {self.action!r}")
        if self.time.tzinfo is None or self.time.utcoffset() is None:
            raise ValueError("Event.time must carry a time zone (PS3.15 A.5.2.5)")
        Outcome(self.outcome)  # raises ValueError for anything but 0, 4, 8, 12


@dataclass(frozen=True)
class AuditMessage:
    """One audit message: the event, who took part, who reports, and the objects involved."""

    event: Event
    participants: tuple[Participant, ...]
    source: AuditSource
    objects: tuple[ParticipantObject, ...] = ()

    def __post_init__(self) -> None:
        if not self.participants:
            raise ValueError("an audit message needs at least one active participant")
        requestors = [p.user_id for p in self.participants if p.is_requestor]
        if len(requestors) > 1:  # A.5.2: only one participant may be the requestor
            raise ValueError(f"only one participant may be the requestor, got {requestors}")

    def to_xml(self) -> bytes:
        """The message as UTF-8 XML per the DICOM Audit Message Schema."""
        root = ET.Element("AuditMessage")
        _event_element(root, self.event)
        for participant in self.participants:
            _participant_element(root, participant)
        source = ET.SubElement(root, "AuditSourceIdentification")
        if self.source.enterprise_site_id:
            source.set("AuditEnterpriseSiteID", _text(self.source.enterprise_site_id))
        source.set("AuditSourceID", _text(self.source.source_id))
        for code in self.source.type_codes:
            ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": _text(code)})
        for obj in self.objects:
            _object_element(root, obj)
        body = ET.tostring(root, encoding="unicode")
        return b'<?xml version="1.0" encoding="UTF-8"?>\n' + body.encode("utf-8")


def _require(value: str, name: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def _count(items: Sequence[object], low: int, high: int | None, name: str) -> None:
    if len(items) < low or (high is not None and len(items) > high):
        wanted = f"{low}..{high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name}: {wanted} expected, got {len(items)}")


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(value: str) -> str:
    """`value` with the characters XML 1.0 cannot carry (control characters) replaced."""
    return _NOT_XML.sub("\ufffd", value)


def _coded(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(
        parent,
        tag,
        {
            "csd-code": _text(code.code),
            "codeSystemName": _text(code.scheme),
            "originalText": _text(code.meaning),
        },
    )


def _event_element(root: ET.Element, event: Event) -> None:
    when = event.time.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    element = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": event.action,
            "EventDateTime": when,
            "EventOutcomeIndicator": str(int(event.outcome)),
        },
    )
    _coded(element, "EventID", event.event_id)
    for code in event.type_codes:
        _coded(element, "EventTypeCode", code)
    if event.outcome_description:
        ET.SubElement(element, "EventOutcomeDescription").text = _text(event.outcome_description)


def _participant_element(root: ET.Element, participant: Participant) -> None:
    attributes = {"UserID": _text(participant.user_id)}
    if participant.alternative_user_id:
        attributes["AlternativeUserID"] = _text(participant.alternative_user_id)
    if participant.user_name:
        attributes["UserName"] = _text(participant.user_name)
    attributes["UserIsRequestor"] = "true" if participant.is_requestor else "false"
    if participant.network_access_point:
        attributes["NetworkAccessPointID"] = _text(participant.network_access_point)
        attributes["NetworkAccessPointTypeCode"] = participant.network_access_point_type
    element = ET.SubElement(root, "ActiveParticipant", attributes)
    for role in participant.roles:
        _coded(element, "RoleIDCode", role)
    if participant.media_type is not None:
        _coded(ET.SubElement(element, "MediaIdentifier"), "MediaType", participant.media_type)


def _object_element(root: ET.Element, obj: ParticipantObject) -> None:
    attributes = {
        "ParticipantObjectID": _text(obj.object_id),
        "ParticipantObjectTypeCode": str(obj.type_code),
    }
    if obj.role is not None:
        attributes["ParticipantObjectTypeCodeRole"] = str(obj.role)
    if obj.life_cycle is not None:
        attributes["ParticipantObjectDataLifeCycle"] = str(int(DataLifeCycle(obj.life_cycle)))
    element = ET.SubElement(root, "ParticipantObjectIdentification", attributes)
    _coded(element, "ParticipantObjectIDTypeCode", obj.id_type)
    # The schema wants exactly one of name and query in every object; the name may be empty.
    if obj.query is not None:
        ET.SubElement(element, "ParticipantObjectQuery").text = _base64(obj.query)
    else:
        ET.SubElement(element, "ParticipantObjectName").text = _text(obj.name)
    for kind, value in obj.details:
        ET.SubElement(
            element, "ParticipantObjectDetail", {"type": _text(kind), "value": _base64(value)}
        )
    if obj.description is not None:
        _description_element(element, obj.description)


def _description_element(parent: ET.Element, description: ObjectDescription) -> None:
    element = ET.SubElement(parent, "ParticipantObjectDescription")
    for number in description.accession_numbers:
        ET.SubElement(element, "Accession", {"Number": _text(number)})
    for sop_class in description.sop_classes:
        item = ET.SubElement(
            element,
            "SOPClass",
            {"UID": _text(sop_class.uid), "NumberOfInstances": str(sop_class.number_of_instances)},
        )
        for uid in sop_class.instance_uids:
            ET.SubElement(item, "Instance", {"UID": _text(uid)})
    if description.encrypted is not None:
        ET.SubElement(element, "Encrypted").text = "true" if description.encrypted else "false"
    if description.anonymized is not None:
        ET.SubElement(element, "Anonymized").text = "true" if description.anonymized else "false"


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
