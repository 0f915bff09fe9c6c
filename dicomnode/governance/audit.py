"""DICOM audit trail messages (PS3.15 A.5): one builder per event the node emits.

Pure: no clock, no I/O. The caller passes the event time and plain values (AE titles, addresses,
patient IDs, UIDs), so intake, egress and the services can all call the same builders. Each
builder checks what PS3.15 A.5.3 requires of its event (participants, role codes, participant
objects), raises ValueError naming the field when something is missing, and returns the message as
UTF-8 XML bytes that validate against the DICOM Audit Message Schema shipped in
``data/audit-message.rng`` (see `schema_path`). `archive.auditlog` spools and sends the bytes.
The model (codes, participants, objects, their XML) is `audit_model`; the names callers use
are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

# Callers reach the model's names as `audit.NAME`: this import re-exports them too.
from dicomnode.governance.audit_model import (  # noqa: F401
    APPLICATION_ACTIVITY,
    APPLICATION_START,
    APPLICATION_STOP,
    AUDIT_LOG_USED,
    BEGIN_TRANSFERRING_INSTANCES,
    EXPORT,
    ID_PATIENT_NUMBER,
    ID_STUDY_INSTANCE_UID,
    ID_URI,
    INSTANCES_ACCESSED,
    INSTANCES_TRANSFERRED,
    LOGIN,
    LOGOUT,
    NODE_AUTHENTICATION,
    QUERY,
    ROLE_APPLICATION,
    ROLE_APPLICATION_LAUNCHER,
    ROLE_DESTINATION,
    ROLE_DESTINATION_MEDIA,
    ROLE_MASTER_FILE,
    ROLE_PATIENT,
    ROLE_REPORT,
    ROLE_SECURITY_RESOURCE,
    ROLE_SOURCE,
    SECURITY_ALERT,
    SECURITY_CONFIGURATION,
    STUDY_DELETED,
    TYPE_PERSON,
    TYPE_SYSTEM_OBJECT,
    USE_OF_RESTRICTED_FUNCTION,
    USER_AUTHENTICATION,
    AlertSubject,
    AuditMessage,
    AuditSource,
    Code,
    DataLifeCycle,
    Event,
    ObjectDescription,
    Outcome,
    Participant,
    ParticipantObject,
    Patient,
    Query,
    SopClass,
    Study,
    _count,
    _require,
    destination_media,
    dicom_application,
    dicom_query,
    person,
    schema_path,
    web_query,
)


def application_activity(
    *,
    started: bool,
    application: Participant,
    time: datetime,
    source: AuditSource,
    launchers: Sequence[Participant] = (),
    outcome: Outcome = Outcome.SUCCESS,
    outcome_description: str = "",
) -> bytes:
    """110100: the node (`application`) started or stopped, by `launchers` if known (A.5.3.1)."""
    event = Event(
        APPLICATION_ACTIVITY,
        "E",
        time,
        outcome,
        (APPLICATION_START if started else APPLICATION_STOP,),
        outcome_description,
    )
    participants = (_with_role(application, ROLE_APPLICATION),) + tuple(
        _with_role(p, ROLE_APPLICATION_LAUNCHER) for p in launchers
    )
    return AuditMessage(event, participants, source).to_xml()


def audit_log_used(
    *,
    accessors: Sequence[Participant],
    log_uri: str,
    time: datetime,
    source: AuditSource,
    outcome: Outcome = Outcome.SUCCESS,
    outcome_description: str = "",
) -> bytes:
    """110101: a person and/or process read the audit log (or the sharing ledger) at `log_uri`
    (A.5.3.2)."""
    _count(accessors, 1, 2, "accessors")
    _require(log_uri, "log_uri")
    log = ParticipantObject(
        log_uri, ID_URI, TYPE_SYSTEM_OBJECT, ROLE_SECURITY_RESOURCE, name="Security Audit Log"
    )
    event = Event(AUDIT_LOG_USED, "R", time, outcome, (), outcome_description)
    return AuditMessage(event, tuple(accessors), source, (log,)).to_xml()


def begin_transferring_instances(
    *,
    sender: Participant,
    receiver: Participant,
    patient: Patient,
    studies: Sequence[Study],
    time: datetime,
    source: AuditSource,
    others: Sequence[Participant] = (),
    outcome: Outcome = Outcome.SUCCESS,
    outcome_description: str = "",
) -> bytes:
    """110102: a C-MOVE/C-GET or forward of one patient's `studies` begins (A.5.3.3)."""
    event = Event(BEGIN_TRANSFERRING_INSTANCES, "E", time, outcome, (), outcome_description)
    return AuditMessage(
        event,
        _transfer_participants(sender, receiver, others),
        source,
        _studies_and_patient(studies, patient),
    ).to_xml()


def instances_accessed(
    *,
    action: str,
    accessors: Sequence[Participant],
    patient: Patient,
    studies: Sequence[Study],
    time: datetime,
    source: AuditSource,
    outcome: Outcome = Outcome.SUCCESS,
    outcome_description: str = "",
) -> bytes:
    """110103: instances of one patient's `studies` were created (C), read (R), updated (U) or
    deleted (D) in place, e.g. an analysis job read a study or wrote results (A.5.3.6). Deleting
    whole studies is `study_deleted`."""
    if action not in ("C", "R", "U", "D"):
        raise ValueError(f"action must be C, R, U or D for Instances Accessed, got {action!r}")
    _count(accessors, 1, 2, "accessors")
    event = Event(INSTANCES_ACCESSED, action, time, outcome, (), outcome_description)
    return AuditMessage(
        event, tuple(accessors), source, _studies_and_patient(studies, patient)
    ).to_xml()


def instances_transferred(
    *,
    action: str,
    sender: Participant,
    receiver: Participant,
    patient: Patient,
    studies: Sequence[Study],
    time: datetime,
    source: AuditSource,
    others: Sequence[Participant] = (),
    outcome: Outcome = Outcome.SUCCESS,
    outcome_description: str = "",
) -> bytes:
    """110104: a transfer of one patient's instances completed (A.5.3.7).

    `action` is "C" when the node received instances it did not hold, "U" when it replaced held
    copies, and "R" when it sent them (or the receiver already held them unchanged).
    """
    if action not in ("C", "R", "U"):
        raise ValueError(f"action must be C, R or U for Instances Transferred, got {action!r}")
    event = Event(INSTANCES_TRANSFERRED, action, time, outcome, (), outcome_description)
    return AuditMessage(
        event,
        _transfer_participants(sender, receiver, others),
        source,
        _studies_and_patient(studies, patient),
    ).to_xml()


def study_deleted(
    *,
    deleters: Sequence[Participant],
    patient: Patient,
    studies: Sequence[Study],
    time: datetime,
    source: AuditSource,
    permanent: bool = True,
    outcome: Outcome = Outcome.SUCCESS,
    outcome_description: str = "",
) -> bytes:
    """110105: whole studies of one patient were deleted, e.g. by the retention sweep or an
    erasure request (A.5.3.8). `permanent` marks them erased (DataLifeCycle 15), else logically
    deleted (14)."""
    _count(deleters, 1, 2, "deleters")
    life_cycle = DataLifeCycle.PERMANENT_ERASURE if permanent else DataLifeCycle.LOGICAL_DELETION
    event = Event(STUDY_DELETED, "D", time, outcome, (), outcome_description)
    return AuditMessage(
        event, tuple(deleters), source, _studies_and_patient(studies, patient, life_cycle)
    ).to_xml()


def export(
    *,
    exporters: Sequence[Participant],
    media: Participant,
    patients: Sequence[Patient],
    time: datetime,
    source: AuditSource,
    studies: Sequence[Study] = (),
    recipients: Sequence[Participant] = (),
    life_cycle: DataLifeCycle = DataLifeCycle.EXPORT,
    outcome: Outcome = Outcome.SUCCESS,
    outcome_description: str = "",
) -> bytes:
    """110106: data left the control of the node's security domain, e.g. a share to a third
    party (A.5.3.4). `exporters` are the local user and/or process, `recipients` the remote
    ones, `media` where the data went (`destination_media`). Exactly one participant is the
    requestor. Use DataLifeCycle.DISCLOSURE for a disclosure to a third party."""
    _count(exporters, 1, 2, "exporters")
    _count(patients, 1, None, "patients")
    if media.is_requestor:
        raise ValueError("media.is_requestor must be false (PS3.15 A.5.3.4)")
    participants = (
        tuple(_with_role(p, ROLE_SOURCE) for p in exporters)
        + tuple(_with_role(p, ROLE_DESTINATION) for p in recipients)
        + (_with_role(media, ROLE_DESTINATION_MEDIA),)
    )
    if sum(p.is_requestor for p in participants) != 1:
        raise ValueError("exactly one exporter or recipient must be the requestor (A.5.3.4.1)")
    objects = tuple(_study_object(s, life_cycle) for s in studies) + tuple(
        _patient_object(p) for p in patients
    )
    event = Event(EXPORT, "R", time, outcome, (), outcome_description)
    return AuditMessage(event, participants, source, objects).to_xml()


def query(
    *,
    requester: Participant,
    responder: Participant,
    query: Query,
    time: datetime,
    source: AuditSource,
    others: Sequence[Participant] = (),
    outcome: Outcome = Outcome.SUCCESS,
    outcome_description: str = "",
) -> bytes:
    """110112: a query was issued or received (C-FIND, QIDO-RS); `requester` issued it and
    `responder` answers (A.5.3.10). Build `query` with `dicom_query` or `web_query`."""
    details = ()
    if query.transfer_syntax_uid:
        details = (("TransferSyntax", query.transfer_syntax_uid.encode("ascii")),)
    asked = ParticipantObject(
        query.object_id,
        query.id_type,
        TYPE_SYSTEM_OBJECT,
        ROLE_REPORT,
        query=query.query,
        details=details,
    )
    event = Event(QUERY, "E", time, outcome, (), outcome_description)
    return AuditMessage(
        event, _transfer_participants(requester, responder, others), source, (asked,)
    ).to_xml()


def security_alert(
    *,
    alert_type: Code,
    reporters: Sequence[Participant],
    time: datetime,
    source: AuditSource,
    subjects: Sequence[AlertSubject] = (),
    performers: Sequence[Participant] = (),
    outcome: Outcome = Outcome.SUCCESS,
    outcome_description: str = "",
) -> bytes:
    """110113: something a security officer must know (A.5.3.11). `alert_type` comes from CID
    403, e.g. NODE_AUTHENTICATION for a failed TLS handshake or an unknown calling AE,
    USE_OF_RESTRICTED_FUNCTION for a refused request, SECURITY_CONFIGURATION for a changed
    policy, EMERGENCY_OVERRIDE_STARTED for break-glass. SUCCESS means an informative alert;
    the failure outcomes grade its severity."""
    _count(reporters, 1, 2, "reporters")
    if any(p.is_requestor for p in performers):
        raise ValueError("performers must not be the requestor (PS3.15 A.5.3.11)")
    objects = tuple(
        ParticipantObject(
            s.object_id,
            s.id_type,
            TYPE_SYSTEM_OBJECT,
            s.role,
            details=(("Alert Description", s.description.encode("utf-8")),),
        )
        for s in subjects
    )
    event = Event(SECURITY_ALERT, "E", time, outcome, (alert_type,), outcome_description)
    return AuditMessage(event, tuple(reporters) + tuple(performers), source, objects).to_xml()


def user_authentication(
    *,
    login: bool,
    user: Participant,
    time: datetime,
    source: AuditSource,
    authenticator: Participant | None = None,
    outcome: Outcome = Outcome.SUCCESS,
    outcome_description: str = "",
) -> bytes:
    """110114: a user logged in or out, or tried to (A.5.3.12). The user's network access
    point (the client address) is required; `authenticator` is the node that checked."""
    if not user.network_access_point:
        raise ValueError("user.network_access_point is required for User Authentication")
    event = Event(
        USER_AUTHENTICATION, "E", time, outcome, (LOGIN if login else LOGOUT,), outcome_description
    )
    participants = (user,) + ((authenticator,) if authenticator else ())
    return AuditMessage(event, participants, source).to_xml()


# --- helpers ----------------------------------------------------------------------------------


def _with_role(participant: Participant, role: Code) -> Participant:
    if role in participant.roles:
        return participant
    return replace(participant, roles=(role,) + participant.roles)


def _transfer_participants(
    source: Participant, destination: Participant, others: Sequence[Participant]
) -> tuple[Participant, ...]:
    return (_with_role(source, ROLE_SOURCE), _with_role(destination, ROLE_DESTINATION)) + tuple(
        others
    )


def _patient_object(patient: Patient) -> ParticipantObject:
    return ParticipantObject(
        patient.patient_id,
        ID_PATIENT_NUMBER,
        TYPE_PERSON,
        ROLE_PATIENT,
        name=patient.name,
        details=patient.details,
    )


def _study_object(study: Study, life_cycle: DataLifeCycle | None = None) -> ParticipantObject:
    description = None
    if study.sop_classes:
        description = ObjectDescription(
            study.sop_classes, study.accession_numbers, study.anonymized, study.encrypted
        )
    return ParticipantObject(
        study.study_uid,
        ID_STUDY_INSTANCE_UID,
        TYPE_SYSTEM_OBJECT,
        ROLE_REPORT,
        life_cycle,
        description=description,
    )


def _studies_and_patient(
    studies: Sequence[Study], patient: Patient, life_cycle: DataLifeCycle | None = None
) -> tuple[ParticipantObject, ...]:
    _count(studies, 1, None, "studies")
    return tuple(_study_object(s, life_cycle) for s in studies) + (_patient_object(patient),)
