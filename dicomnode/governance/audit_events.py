"""The node's audit events: its own concepts (who asked, what left, what was decided) as DICOM
audit messages (PS3.15 A.5), built with `audit`. Pure, like `audit`: the caller passes the time
and hands the bytes to the audit log (``archive.auditlog``), usually from its writer thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from dicomnode.core.model import Source, StoredInstance
from dicomnode.governance import audit


@dataclass(frozen=True)
class Reporter:
    """Who reports: the audit source, and the node as a DICOM application."""

    source: audit.AuditSource
    node: audit.Participant


def reporter(ae_title: str, host: str, source_id: str = "", site_id: str = "") -> Reporter:
    return Reporter(
        audit.AuditSource(source_id or ae_title, site_id),
        audit.dicom_application(ae_title, host, user_id=f"dicomnode@{host or 'localhost'}"),
    )


@dataclass(frozen=True)
class DisclosureRef:
    """What ties an audit message to its ledger entry: the identifier both carry, and the
    consent versions (or policy rules) the decision rested on."""

    disclosure_id: str
    consent_refs: tuple[str, ...] = ()

    def details(self) -> tuple[tuple[str, bytes], ...]:
        return (("DisclosureID", self.disclosure_id.encode("ascii")),) + tuple(
            ("ConsentRef", ref.encode("utf-8")) for ref in self.consent_refs
        )


def _patient(patient_id: str, ref: DisclosureRef | None) -> audit.Patient:
    return audit.Patient(patient_id, details=ref.details() if ref else ())


def participant(source: Source, is_requestor: bool = True) -> audit.Participant:
    """The caller as an active participant: a DICOM application (AE title) or a person or
    process (token subject, CLI user, analyzer)."""
    who = source.caller or source.protocol or "unknown"
    if source.protocol == "dimse":
        return audit.dicom_application(who, source.address, is_requestor=is_requestor)
    return audit.person(who, source.address, is_requestor=is_requestor)


def _studies(instances: Iterable[StoredInstance], anonymized: bool | None = None):
    """{patient ID: [Study, ...]} of `instances`."""
    by_patient: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for i in instances:
        by_patient.setdefault(i.patient_id, {}).setdefault(i.study_instance_uid, []).append(
            (i.sop_class_uid, i.sop_instance_uid)
        )
    return {
        patient: [
            audit.Study.from_instances(study, pairs, anonymized=anonymized)
            for study, pairs in sorted(studies.items())
        ]
        for patient, studies in sorted(by_patient.items())
    }


def received(
    sender: Source, instances: Sequence[StoredInstance], time: datetime, by: Reporter
) -> list[bytes]:
    """110104 (action C): instances the node received, one message per patient."""
    return [
        audit.instances_transferred(
            action="C",
            sender=participant(sender),
            receiver=by.node,
            patient=audit.Patient(patient),
            studies=studies,
            time=time,
            source=by.source,
        )
        for patient, studies in _studies(instances).items()
    ]


def sent(
    requester: Source,
    receiver: audit.Participant,
    instances: Sequence[StoredInstance],
    time: datetime,
    by: Reporter,
    begin: bool = False,
    ref: DisclosureRef | None = None,
) -> list[bytes]:
    """110104 (action R) for instances sent, or 110102 when a C-MOVE/C-GET begins."""
    others = () if receiver.user_id == participant(requester).user_id else (participant(requester),)
    build = audit.begin_transferring_instances if begin else audit.instances_transferred
    extra = {} if begin else {"action": "R"}
    return [
        build(
            sender=by.node,
            receiver=receiver,
            patient=_patient(patient, ref),
            studies=studies,
            time=time,
            source=by.source,
            others=others,
            **extra,
        )
        for patient, studies in _studies(instances).items()
    ]


def exported(
    requested_by: str,
    destination: str,
    recipient: str,
    instances: Sequence[StoredInstance],
    anonymized: bool,
    time: datetime,
    by: Reporter,
    ref: DisclosureRef | None = None,
) -> bytes:
    """110106: data left the node's security domain for a third party (a share, or a
    retrieval by WADO-RS, C-MOVE or C-GET that governance counted as a disclosure)."""
    studies = [s for group in _studies(instances, anonymized).values() for s in group]
    return audit.export(
        exporters=[audit.person(requested_by or "dicomnode", is_requestor=True), by.node],
        media=audit.destination_media(destination),
        patients=[_patient(p, ref) for p in sorted({i.patient_id for i in instances})],
        studies=studies,
        recipients=[audit.person(recipient, is_requestor=False)],
        life_cycle=audit.DataLifeCycle.DISCLOSURE,
        time=time,
        source=by.source,
    )


def queried(requester: Source, query: audit.Query, time: datetime, by: Reporter) -> bytes:
    """110112: a C-FIND or QIDO-RS query the node answered."""
    return audit.query(
        requester=participant(requester),
        responder=by.node,
        query=query,
        time=time,
        source=by.source,
    )


def refused(
    requester: Source,
    operation: str,
    reason: str,
    time: datetime,
    by: Reporter,
    count: int = 1,
    alert_type: audit.Code = audit.USE_OF_RESTRICTED_FUNCTION,
    ref: DisclosureRef | None = None,
) -> bytes:
    """110113 (Use of Restricted Function, or Node Authentication for a refused association):
    a request governance or the node refused. `count` > 1: this many refusals of this source
    and kind were aggregated into one message (an attack must not flood the audit queue)."""
    subjects = [
        audit.AlertSubject(
            requester.address or requester.caller or "unknown", f"{operation}: {reason}"[:1024]
        )
    ]
    if ref is not None:
        subjects.append(audit.AlertSubject(ref.disclosure_id, "ledger DisclosureID"))
    times = f" ({count} times within a minute)" if count > 1 else ""
    return audit.security_alert(
        alert_type=alert_type,
        reporters=[by.node],
        performers=[participant(requester, is_requestor=False)],
        subjects=subjects,
        outcome=audit.Outcome.MINOR_FAILURE,
        outcome_description=f"{operation} refused{times}: {reason}"[:1024],
        time=time,
        source=by.source,
    )


def deleted(
    actor: Source, instances: Sequence[StoredInstance], reason: str, time: datetime, by: Reporter
) -> list[bytes]:
    """110105: studies destroyed, one message per patient."""
    return [
        audit.study_deleted(
            deleters=[participant(actor), by.node],
            patient=audit.Patient(patient),
            studies=studies,
            outcome_description=reason[:1024],
            time=time,
            source=by.source,
        )
        for patient, studies in _studies(instances).items()
    ]


def configuration_changed(who: str, what: str, time: datetime, by: Reporter) -> bytes:
    """110113 (Security Configuration): a policy version published or in force."""
    return audit.security_alert(
        alert_type=audit.SECURITY_CONFIGURATION,
        reporters=[by.node],
        performers=[audit.person(who or "dicomnode", is_requestor=False)],
        subjects=[audit.AlertSubject(by.source.source_id, what)],
        outcome_description=what[:1024],
        time=time,
        source=by.source,
    )


def authentication_failed(
    who: str, address: str, reason: str, time: datetime, by: Reporter, count: int = 1
) -> bytes:
    """110114 (failure): a request whose credentials were refused (`count` of them from this
    address within a minute, aggregated into one message)."""
    times = f" ({count} times within a minute)" if count > 1 else ""
    return audit.user_authentication(
        login=True,
        user=audit.person(who or "unknown", address or "unknown", is_requestor=True),
        authenticator=by.node,
        outcome=audit.Outcome.MINOR_FAILURE,
        outcome_description=(reason + times)[:1024],
        time=time,
        source=by.source,
    )


def application(started: bool, time: datetime, by: Reporter) -> bytes:
    """110100: the node started or stopped."""
    return audit.application_activity(
        started=started, application=by.node, time=time, source=by.source
    )


def log_used(who: Source, what: str, time: datetime, by: Reporter) -> bytes:
    """110101: someone read or exported the ledger."""
    return audit.audit_log_used(
        accessors=[participant(who)], log_uri=what, time=time, source=by.source
    )
