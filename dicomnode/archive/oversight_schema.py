"""The index tables of oversight (migration 0010): four-eyes requests and the named deputies,
break-glass grants, share links for a second opinion, and the FHIR provisions of imported
consents. They join the index's one
`schema.metadata` (imported by the archive package, so every migration check sees them)."""

from __future__ import annotations

from sqlalchemy import Column, Index, Integer, String, Table, Text, UniqueConstraint

from dicomnode.archive.schema import UTCDateTime, metadata

# A change that waits for a second person (four-eyes); every change is also a ledger entry
# (kind "approval") naming the requester and, once decided, the approver.
approval_requests = Table(
    "approval_requests",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("action", String(32), nullable=False),
    Column("params", Text, nullable=False),  # JSON: what to do once approved
    Column("summary", Text, nullable=False, server_default=""),
    Column("requested_by", String, nullable=False),
    Column("requested_at", UTCDateTime(), nullable=False),
    Column("state", String(16), nullable=False),  # pending, approved, rejected, failed
    Column("decided_by", String, nullable=True),
    Column("decided_at", UTCDateTime(), nullable=True),
    Column("note", Text, nullable=False, server_default=""),
    Column("outcome", Text, nullable=False, server_default=""),  # JSON: what the action did
    Index("ix_approval_requests_state", "state"),
)

# The people the DPO named as deputies: while one is named, four-eyes is in force.
approval_deputies = Table(
    "approval_deputies",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False),
    Column("added_by", String, nullable=False),
    Column("added_at", UTCDateTime(), nullable=False),
    Column("removed_by", String, nullable=True),
    Column("removed_at", UTCDateTime(), nullable=True),
    UniqueConstraint("name", "added_at"),
)

# Break-glass: one requester's emergency access to one patient (or one study of theirs) past a
# restriction or a missing consent, for treatment, until it expires; the DPO reviews each.
break_glass_grants = Table(
    "break_glass_grants",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("requester", String, nullable=False),
    Column("patient_id", String, nullable=False),
    Column("issuer_of_patient_id", String, nullable=False, server_default=""),
    Column("study_instance_uid", String(64), nullable=True),  # NULL: the patient's studies
    Column("reason", Text, nullable=False),
    Column("granted_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("ended_at", UTCDateTime(), nullable=True),  # ended early
    Column("reviewed_by", String, nullable=True),
    Column("reviewed_at", UTCDateTime(), nullable=True),
    Column("review_note", Text, nullable=False, server_default=""),
    Index("ix_break_glass_grants_requester", "requester"),
)

# Share links for a second opinion: only the SHA-256 of the random token is kept.
share_links = Table(
    "share_links",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("token_sha256", String(64), nullable=False, unique=True),
    Column("study_instance_uid", String(64), nullable=False),
    Column("recipient", String, nullable=False, server_default=""),
    Column("created_by", String, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("revoked_by", String, nullable=True),
    Column("last_used_at", UTCDateTime(), nullable=True),
    Column("uses", Integer, nullable=False, server_default="0"),
)

# What a consent imported as an HL7 FHIR R4 Consent said beyond the consent version itself:
# the provision's actors, actions and data period (JSON), kept to be exported again as they came.
consent_provisions = Table(
    "consent_provisions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("patient_id", String, nullable=False),
    Column("issuer_of_patient_id", String, nullable=False, server_default=""),
    Column("purpose", String(16), nullable=False),
    Column("version", Integer, nullable=False),
    Column("fhir_id", String(64), nullable=False, server_default=""),
    Column("provision", Text, nullable=False),
    Column("imported_at", UTCDateTime(), nullable=False),
    UniqueConstraint("patient_id", "issuer_of_patient_id", "purpose", "version"),
)

# --- recipients' copies (migration 0011) ----------------------------------------------------
# A recipient's confirmation that it destroyed its copy of a study (item 29).
destruction_confirmations = Table(
    "destruction_confirmations",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("recipient", String, nullable=False),
    Column("study_instance_uid", String(64), nullable=False),
    Column("confirmed_at", UTCDateTime(), nullable=False),  # when the recipient destroyed it
    Column("evidence", Text, nullable=False, server_default=""),
    Column("recorded_by", String, nullable=False),
    Column("recorded_at", UTCDateTime(), nullable=False),
    Index("ix_destruction_confirmations_recipient", "recipient"),
)

# Notices owed to recipients holding copies when a patient's data is erased or a consent is
# withdrawn: queued from the ledger entry that caused them (`source_seq`), sent by the DPO.
recipient_notices = Table(
    "recipient_notices",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("source_seq", Integer, nullable=False),
    Column("recipient", String, nullable=False),
    Column("patient_id", String, nullable=False),
    Column("studies", Text, nullable=False),  # JSON list
    Column("reason", String(32), nullable=False),  # erasure, withdrawal
    Column("state", String(16), nullable=False),  # queued, sent
    Column("queued_at", UTCDateTime(), nullable=False),
    Column("sent_at", UTCDateTime(), nullable=True),
    Column("sent_by", String, nullable=True),
    UniqueConstraint("source_seq", "recipient"),
)
