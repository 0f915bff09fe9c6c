"""What the DPO's pages and exports say, as plain data: rows of the disclosure views, the
per-patient accounting of disclosures, and the record of processing activities generated from
the policy in force. No Flask here: the views render these, the exports write them."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from dicomnode.config import Settings
from dicomnode.core.ledger import LedgerEntry
from dicomnode.core.ledger_events import DecisionRecord, without_linkage
from dicomnode.governance import Policy, codes
from dicomnode.governance.policy import ACTIVITY_RECIPIENT_KINDS, Recipient

# The columns of a disclosure view's CSV export, in order.
DISCLOSURE_COLUMNS = (
    "seq",
    "recorded_at",
    "kind",
    "outcome",
    "actor",
    "operation",
    "protocol",
    "address",
    "recipient",
    "recipient_kind",
    "activity",
    "purpose",
    "basis",
    "rule_id",
    "reason",
    "policy_version",
    "deid_profile",
    "consent_refs",
    "patient_ids",
    "denied_patients",
    "study_instance_uids",
    "items",
    "hash",
)
ACCOUNTING_COLUMNS = (
    "seq",
    "disclosed_at",
    "recipient",
    "recipient_name",
    "recipient_kind",
    "purpose",
    "purpose_text",
    "basis",
    "basis_text",
    "operation",
    "operation_text",
    "what",
    "study_instance_uids",
    "deid_profile",
    "deidentified",
)
RETENTION_COLUMNS = (
    "study_instance_uid",
    "patient_id",
    "category",
    "rule_id",
    "expires_at",
    "action",
    "reason",
    "instances",
    "legal_basis",
)


def _joined(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ";".join(str(v) for v in value)
    return "" if value is None else str(value)


def disclosure_row(entry: LedgerEntry) -> dict[str, str]:
    """One entry as the flat row of the disclosure views and their CSV export."""
    detail = entry.data
    row = {column: _joined(detail.get(column)) for column in DISCLOSURE_COLUMNS}
    row.update(
        seq=str(entry.seq),
        recorded_at=entry.recorded_at,
        kind=entry.kind,
        outcome=entry.outcome,
        actor=entry.actor,
        hash=entry.hash,
    )
    return row


def entry_json(entry: LedgerEntry) -> dict[str, Any]:
    """One entry in full, as the JSON export carries it; an entry of an earlier version that
    holds pseudonyms has them left out (PIPA 28-4(1)), named in `left_out`."""
    detail, left_out = without_linkage(entry.data)
    return {
        "seq": entry.seq,
        "recorded_at": entry.recorded_at,
        "kind": entry.kind,
        "actor": entry.actor,
        "outcome": entry.outcome,
        "detail": detail,
        "prev_hash": entry.prev_hash,
        "hash": entry.hash,
    } | ({"left_out": left_out} if left_out else {})


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: str) -> str:
    """A cell a spreadsheet will not run as a formula (OWASP CSV injection)."""
    return "'" + value if value.startswith(_FORMULA_START) else value


def csv_lines(columns: tuple[str, ...], rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """The header and then each row as CSV text, one chunk per row (for streaming)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def line(values: Iterable[Any]) -> str:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(values)
        return buffer.getvalue()

    yield line(columns)
    for row in rows:
        yield line(_cell(_joined(row.get(c))) for c in columns)


# --- per-patient accounting (HIPAA 164.528, PIPA 35) ---------------------------------------


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def accounting_row(
    entry: LedgerEntry, patient_id: str, policy: Policy, patient_studies: set[str]
) -> dict[str, Any]:
    """One disclosure of `patient_id`'s data: when, to whom, why, on what basis, what.
    An answer about several patients names only this patient's studies."""
    decision = DecisionRecord.read(entry.data)  # an older entry may lack some keys
    recipient_id = _text(decision.recipient)
    recipient = policy.recipient(recipient_id)
    purpose, basis = _text(decision.purpose), _text(decision.basis)
    operation = _text(decision.operation)
    patients = list(decision.patient_ids or ())
    studies = list(decision.study_instance_uids or ())
    if patients != [patient_id]:
        studies = [s for s in studies if s in patient_studies]
    items = "" if decision.items is None else decision.items
    what = codes.OPERATIONS.get(operation, operation)
    if decision.service:
        what += f" ({decision.service})"
    if len(patients) > 1:
        what += f"; part of an answer about {len(patients)} patients ({items} items in all)"
    else:
        what += f"; {items} items"
    return {
        "seq": entry.seq,
        "disclosed_at": entry.recorded_at,
        "recipient": recipient_id,
        "recipient_name": recipient.name if recipient else recipient_id,
        "recipient_kind": _text(decision.recipient_kind),
        "purpose": purpose,
        "purpose_text": codes.PURPOSES.get(purpose, ""),
        "basis": basis,
        "basis_text": codes.LAWFUL_BASES.get(basis, ""),
        "operation": operation,
        "operation_text": codes.OPERATIONS.get(operation, ""),
        "what": what,
        "study_instance_uids": studies,
        "deid_profile": _text(decision.deid_profile),
        # recorded by deliveries (shares): whether what left was de-identified; other
        # operations record only the rule's profile
        "deidentified": ("yes" if decision.plan.deidentified else "no") if decision.plan else "",
    }


def accounting_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Repeated disclosures to one recipient for one purpose: first, last and how many
    (the summary HIPAA 164.528(b)(3) allows)."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["recipient"], row["purpose"])
        group = groups.setdefault(
            key,
            {
                "recipient": row["recipient"],
                "recipient_name": row["recipient_name"],
                "purpose": row["purpose"],
                "count": 0,
                "first": row["disclosed_at"],
                "last": row["disclosed_at"],
            },
        )
        group["count"] += 1
        group["first"] = min(group["first"], row["disclosed_at"])
        group["last"] = max(group["last"], row["disclosed_at"])
    return sorted(groups.values(), key=lambda g: (g["recipient"], g["purpose"]))


# --- the record of processing activities (GDPR Art. 30, PIPA 30) ---------------------------


def _coded(code: str, table: dict[str, str]) -> dict[str, str]:
    return {"code": code, "text": table.get(code, "")}


def _recipients_of(policy: Policy, activity_id: str) -> list[str]:
    """The recipients a rule allows the activity to go to (none for processing: intake,
    analysis, and a data subject's own access)."""
    kinds = ACTIVITY_RECIPIENT_KINDS.get(activity_id, frozenset())
    if not kinds:
        return []
    found: list[str] = []
    for rule in policy.rules:
        if rule.effect != "allow" or rule.activity != activity_id:
            continue
        for name in rule.recipients:
            if name == "*":
                matches = [r.id for r in policy.recipients if r.kind in kinds]
            elif name.startswith("kind:"):
                kind = name.removeprefix("kind:")
                matches = [r.id for r in policy.recipients if r.kind == kind]
            else:
                matches = [name]
            found += [m for m in matches if m not in found]
    return found


def _purposes(policy: Policy) -> list[dict[str, Any]]:
    """Every purpose of use the policy configures (its activities', its rules' and its
    recipients' default ones), each with the activities and recipients it is configured for."""
    found: dict[str, dict[str, Any]] = {}

    def add(code: str) -> dict[str, Any]:
        return found.setdefault(
            code, {**_coded(code, codes.PURPOSES), "activities": [], "recipients": []}
        )

    for activity in policy.activities:
        for code in activity.purposes:
            add(code)["activities"].append(activity.id)
    for rule in policy.rules:
        for code in rule.purposes:
            add(code)
    for recipient in policy.recipients:
        add(recipient.default_purpose)["recipients"].append(recipient.id)
    return list(found.values())


def _recipient(recipient: Recipient, home: str) -> dict[str, Any]:
    abroad = recipient.country != home
    return {
        "id": recipient.id,
        "name": recipient.name,
        "kind": _coded(recipient.kind, codes.RECIPIENT_KINDS),
        "country": recipient.country,
        "transfer_abroad": abroad,
        "cross_border_basis": (
            _coded(recipient.cross_border_basis, codes.LAWFUL_BASES)
            if recipient.cross_border_basis
            else None
        ),
        "default_purpose": _coded(recipient.default_purpose, codes.PURPOSES),
        "retention_by_recipient": recipient.retention,
        "contact": recipient.contact,
        "description": recipient.description,
    }


def security_measures(settings: Settings) -> list[str]:
    """The technical and organisational measures (Art. 30(1)(g), 32; PIPA 29), as this node is
    configured."""
    dimse = settings.dimse
    measures = [
        "Images, analysis results and the index stay on the node's own storage; nothing is "
        "deleted to make room (at the disk quota new data is refused).",
        (
            "DIMSE associations use TLS (DICOM PS3.15 B.1)"
            + (", with client certificates required" if dimse.tls.require_client_cert else "")
            if dimse.tls
            else "DIMSE runs without TLS on the hospital network (no [dimse.tls] configured)"
        )
        + (
            "; only the configured peers may associate."
            if dimse.require_known_peers
            else "; the configured peers' services are limited per peer."
        ),
        "Every DICOMweb and governance API request needs a signed bearer token (JWT, asymmetric "
        "keys only) with the scope of its method"
        + (
            "; tokens of the hospital's OIDC provider are accepted."
            if settings.auth.issuer
            else "."
        ),
        "Every disclosure is decided by the policy in force before data leaves, and each decision "
        "(allowed or denied) is written first to an append-only, hash-chained ledger; the node "
        "signs checkpoints of the chain"
        + (
            f" every {settings.governance.checkpoint_interval:g} s."
            if settings.governance.checkpoint_interval
            else " on request."
        ),
        "Data given to research or third-party recipients is de-identified under the rule's "
        "profile (DICOM PS3.15 Annex E Basic Profile and options); UIDs and patient identifiers "
        "are remapped with a keyed HMAC held only by the node.",
        "Consent versions are immutable (a change is a new version); restrictions and legal holds "
        "stop processing and deletion until lifted or released.",
        "The DPO's pages need a named account with the dpo or auditor role ("
        + (
            "the hospital's OIDC provider"
            + (" or a local account" if settings.dpo.local_accounts else "")
            if settings.dpo.oidc_enabled
            else "local accounts, passwords stored as scrypt hashes"
        )
        + f"), lock an account after {settings.dpo.max_failed_signins} failed sign-ins, and end "
        f"a session after {settings.dpo.session_hours:g} hours.",
    ]
    if settings.audit.enabled:
        measures.append(
            "DICOM audit messages (PS3.15 A.5) are spooled durably"
            + (
                f" and sent to the audit repository {settings.audit.syslog_host} by syslog "
                f"({settings.audit.syslog_protocol})."
                if settings.audit.syslog_host
                else "."
            )
        )
    return measures


def processing_record(
    policy: Policy, since: datetime | None, settings: Settings, now: datetime
) -> dict[str, Any]:
    """The record of processing activities of the policy in force (GDPR Art. 30(1) for the
    controller, 30(2) as processor; PIPA 30 processing policy items)."""
    home = policy.home_country
    recipients = {r.id: r for r in policy.recipients}
    activities = []
    for activity in policy.activities:
        activities.append(
            {
                "id": activity.id,
                "name": codes.ACTIVITIES.get(activity.id, ""),
                "description": activity.description,
                "purposes": [_coded(p, codes.PURPOSES) for p in activity.purposes],
                "lawful_basis": _coded(activity.lawful_basis, codes.LAWFUL_BASES),
                "additional_bases": [
                    _coded(b, codes.LAWFUL_BASES) for b in activity.additional_bases
                ],
                "data_categories": [
                    _coded(c, codes.DATA_CATEGORIES) for c in activity.data_categories
                ],
                "data_subjects": activity.data_subjects,
                "recipients": _recipients_of(policy, activity.id),
                "rules": [
                    {
                        "id": rule.id,
                        "effect": rule.effect,
                        "recipients": list(rule.recipients),
                        "operations": list(rule.operations),
                        "purposes": [_coded(p, codes.PURPOSES) for p in rule.purposes],
                        "lawful_basis": _coded(rule.lawful_basis, codes.LAWFUL_BASES),
                        "consent_required": rule.consent_required,
                        "deid_profile": rule.deid_profile,
                    }
                    for rule in policy.rules
                    if rule.activity == activity.id
                ],
            }
        )
    return {
        "title": "Record of processing activities",
        "generated_at": now.isoformat(timespec="seconds"),
        "policy": {
            "version": policy.version,
            "sha256": policy.sha256,
            "in_force_since": since.isoformat() if since else None,
            "embedded_default": since is None,
        },
        "controller": policy.controller,
        "processor": policy.operator,
        "dpo_contact": policy.dpo_contact,
        "home_country": home,
        "summary": policy.summary,
        "purposes": _purposes(policy),
        "activities": activities,
        "recipients": [_recipient(r, home) for r in recipients.values()],
        "transfers_abroad": [_recipient(r, home) for r in recipients.values() if r.country != home],
        "erasure_time_limits": [
            {
                "rule": rule.id,
                "category": _coded(rule.category, codes.DATA_CATEGORIES),
                "period": rule.period.text,
                "from": _coded(rule.start, codes.RETENTION_STARTS),
                "priority": rule.priority,
                "modalities": list(rule.modalities),
                "legal_basis": (
                    _coded(rule.legal_basis, codes.LAWFUL_BASES) if rule.legal_basis else None
                ),
                "description": rule.description,
            }
            for rule in policy.retention
        ],
        "deid_profiles": [
            {"id": p.id, "options": list(p.options), "description": p.description}
            for p in policy.deid_profiles
        ],
        "security_measures": security_measures(settings),
    }
