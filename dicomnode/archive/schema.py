"""The index schema (SQLAlchemy Core). Attribute columns come from `attributes.py`;
Alembic migrations in `migrations/` create and evolve these tables."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)

from dicomnode.core.attributes import (
    INSTANCE_ATTRIBUTES,
    PATIENT_ATTRIBUTES,
    SERIES_ATTRIBUTES,
    STUDY_ATTRIBUTES,
    IndexedAttribute,
)
from dicomnode.core.times import as_utc


class UTCDateTime(TypeDecorator):
    """A timezone-aware moment stored in UTC on every back end: SQLite keeps no offset, so a
    moment is converted to UTC before it is written and read back as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return as_utc(value) if isinstance(value, datetime) else value

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return as_utc(value) if isinstance(value, datetime) else value


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

_UNIQUE = {"study_instance_uid", "series_instance_uid", "sop_instance_uid"}
_NOT_NULL = _UNIQUE | {"patient_id", "issuer_of_patient_id", "sop_class_uid"}
_INDEXED = {"patient_name", "study_date", "accession_number", "modality"}


def _columns(attributes: tuple[IndexedAttribute, ...]) -> list[Column]:
    return [
        Column(
            a.column,
            Integer if a.is_integer else String,
            nullable=a.column not in _NOT_NULL,
            unique=a.column in _UNIQUE,
            index=a.column in _INDEXED,
            server_default="" if a.column == "issuer_of_patient_id" else None,
        )
        for a in attributes
    ]


patients = Table(
    "patients",
    metadata,
    Column("id", Integer, primary_key=True),
    *_columns(PATIENT_ATTRIBUTES),
    Column("created_at", UTCDateTime(), nullable=False),
    UniqueConstraint("patient_id", "issuer_of_patient_id"),
)

studies = Table(
    "studies",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("patient_pk", Integer, ForeignKey("patients.id", ondelete="CASCADE"), nullable=False),
    *_columns(STUDY_ATTRIBUTES),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Index("ix_studies_patient_pk", "patient_pk"),
)

series = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_pk", Integer, ForeignKey("studies.id", ondelete="CASCADE"), nullable=False),
    *_columns(SERIES_ATTRIBUTES),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Index("ix_series_study_pk", "study_pk"),
)

instances = Table(
    "instances",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("series_pk", Integer, ForeignKey("series.id", ondelete="CASCADE"), nullable=False),
    *_columns(INSTANCE_ATTRIBUTES),
    Column("transfer_syntax_uid", String, nullable=False),
    Column("blob_path", String, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("received_at", UTCDateTime(), nullable=False),
    Column("source_protocol", String, nullable=False),
    Column("source_caller", String, nullable=False, server_default=""),
    # where each frame lies in the blob (core.frames.FrameTable as JSON), found at ingest
    Column("frame_table", Text),
    Index("ix_instances_series_pk", "series_pk"),
)

TABLE_BY_LEVEL_NAME = {"PATIENT": patients, "STUDY": studies, "SERIES": series, "IMAGE": instances}

ledger_entries = Table(
    "ledger_entries",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("recorded_at", String(32), nullable=False),  # ISO 8601 UTC, part of the hash
    Column("kind", String(32), nullable=False),
    Column("actor", String, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("detail", String, nullable=False),  # canonical JSON
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False, unique=True),
)

# Analysis: one row per (analyzer, unit) being collected, and the jobs made from ready units.
analysis_units = Table(
    "analysis_units",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("analyzer", String(64), nullable=False),
    Column("unit_uid", String(64), nullable=False),  # SOP Instance, Series or Study UID
    Column("study_instance_uid", String(64), nullable=False),
    Column("patient_id", String, nullable=False),
    Column("instances", Integer, nullable=False),
    Column("expected", Integer, nullable=True),  # from the headers, when they say
    Column("first_received_at", UTCDateTime(), nullable=False),
    Column("last_received_at", UTCDateTime(), nullable=False),
    Column("state", String(16), nullable=False),  # collecting, queued
    UniqueConstraint("analyzer", "unit_uid"),
    Index("ix_analysis_units_state", "state"),
)

analysis_jobs = Table(
    "analysis_jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("analyzer", String(64), nullable=False),
    Column("analyzer_version", String(32), nullable=False),
    Column("unit_uid", String(64), nullable=False),
    Column("study_instance_uid", String(64), nullable=False),
    Column("patient_id", String, nullable=False),
    Column(
        "reason", String(32), nullable=False
    ),  # quiet-period, expected-count, on-receipt, requested
    Column("state", String(16), nullable=False),  # queued, running, done, failed
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("not_before", UTCDateTime(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("started_at", UTCDateTime(), nullable=True),
    Column("finished_at", UTCDateTime(), nullable=True),
    Column("claimed_by", String, nullable=True),
    Column("lease_until", UTCDateTime(), nullable=True),
    Column("error", String, nullable=True),
    Column("inputs", String, nullable=True),  # JSON list of SOP Instance UIDs
    Column("outputs", String, nullable=True),  # JSON list of SOP Instance UIDs filed
    Column("summary", String, nullable=True),  # JSON
    Index("ix_analysis_jobs_state_not_before", "state", "not_before"),
)

# --- governance ---------------------------------------------------------------------------------
# Policy versions as published (source kept whole: a decision names the version that made it).
policy_versions = Table(
    "policy_versions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", String(64), nullable=False, unique=True),
    Column("sha256", String(64), nullable=False),
    Column("source", Text, nullable=False),
    Column("material", Boolean, nullable=False),
    Column("published_at", UTCDateTime(), nullable=False),
    Column("effective_at", UTCDateTime(), nullable=False),
    Column("published_by", String, nullable=False, server_default=""),
    Column("activated_at", UTCDateTime(), nullable=True),  # first seen in force
)

# Consent versions: append-only (a trigger refuses UPDATE and DELETE).
consents = Table(
    "consents",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("patient_id", String, nullable=False),
    Column("issuer_of_patient_id", String, nullable=False, server_default=""),
    Column("purpose", String(16), nullable=False),
    Column("version", Integer, nullable=False),
    Column("state", String(16), nullable=False),  # granted, refused, withdrawn
    Column("valid_from", UTCDateTime(), nullable=False),
    Column("valid_until", UTCDateTime(), nullable=True),
    Column("evidence_ref", String, nullable=False, server_default=""),
    Column("recorded_by", String, nullable=False),
    Column("recorded_at", UTCDateTime(), nullable=False),
    Column("note", String, nullable=False, server_default=""),
    UniqueConstraint("patient_id", "issuer_of_patient_id", "purpose", "version"),
    Index("ix_consents_patient_id", "patient_id"),
)

# Data-subject restrictions of processing (PIPA 37, GDPR 18): active until lifted.
restrictions = Table(
    "restrictions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("patient_id", String, nullable=False),
    Column("issuer_of_patient_id", String, nullable=False, server_default=""),
    Column("reason", String, nullable=False, server_default=""),
    Column("requested_by", String, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("lifted_at", UTCDateTime(), nullable=True),
    Column("lifted_by", String, nullable=True),
    Index("ix_restrictions_patient_id", "patient_id"),
)

# Legal holds on a patient or a study: block every deletion until released.
legal_holds = Table(
    "legal_holds",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("patient_id", String, nullable=True),
    Column("study_instance_uid", String(64), nullable=True),
    Column("owner", String, nullable=False),
    Column("reason", String, nullable=False),
    Column("case_ref", String, nullable=False, server_default=""),
    Column("review_date", UTCDateTime(), nullable=True),
    Column("placed_by", String, nullable=False),
    Column("placed_at", UTCDateTime(), nullable=False),
    Column("released_at", UTCDateTime(), nullable=True),
    Column("released_by", String, nullable=True),
)

# Objects intake filed aside (held) instead of admitting: not indexed, not searchable, not
# analysed, until released (then ingested) or discarded.
held_objects = Table(
    "held_objects",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sop_instance_uid", String(64), nullable=False, unique=True),
    Column("sop_class_uid", String(64), nullable=False),
    Column("series_instance_uid", String(64), nullable=False),
    Column("study_instance_uid", String(64), nullable=False),
    Column("patient_id", String, nullable=False),
    Column("blob_path", String, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("source_protocol", String, nullable=False),
    Column("source_caller", String, nullable=False, server_default=""),
    Column("reason", String, nullable=False),
    Column("rule_id", String, nullable=False),
    Column("policy_version", String(64), nullable=False),
    Column("held_at", UTCDateTime(), nullable=False),
    Index("ix_held_objects_study", "study_instance_uid"),
)

# Data on its way out to a recipient (forwarded results, shares): queued, retried, visible.
deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),  # forward, share
    Column("recipient", String, nullable=False),  # recipient id (share) or peer name (forward)
    Column("purpose", String(16), nullable=False, server_default=""),
    Column("patient_id", String, nullable=False),
    Column("study_instance_uid", String(64), nullable=False),
    Column("sop_instance_uids", Text, nullable=False),  # JSON list
    Column("requested_by", String, nullable=False),
    Column("state", String(16), nullable=False),  # queued, sending, done, failed, denied, cancelled
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("max_attempts", Integer, nullable=False),
    Column("not_before", UTCDateTime(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime(), nullable=True),
    Column("claimed_by", String, nullable=True),
    Column("lease_until", UTCDateTime(), nullable=True),
    Column("error", String, nullable=True),
    Column("outcome", Text, nullable=True),  # JSON: sent, failed, ledger entries
    Index("ix_deliveries_state_not_before", "state", "not_before"),
    Index("ix_deliveries_patient_id", "patient_id"),
)

# Signed checkpoints of the ledger: entry `seq` had hash `head_hash` when the node signed it.
ledger_checkpoints = Table(
    "ledger_checkpoints",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("head_hash", String(64), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("signature", Text, nullable=False),  # compact JWS over the checkpoint
)

# Local accounts of the DPO pages (used when no OIDC provider is configured).
dpo_accounts = Table(
    "dpo_accounts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("username", String(64), nullable=False, unique=True),
    Column("password_hash", String, nullable=False),
    Column("display_name", String, nullable=False, server_default=""),
    Column("role", String(16), nullable=False),  # dpo, auditor
    Column("created_at", UTCDateTime(), nullable=False),
    Column("disabled_at", UTCDateTime(), nullable=True),
)

# Tables no one may UPDATE or DELETE rows of (migration 0004 adds the triggers).
APPEND_ONLY_TABLES = ("ledger_entries", "consents", "ledger_checkpoints")

# --- the DPO's casework (migration 0006) ----------------------------------------------------

# Personal data breaches: when the controller became aware, what happened, whom it affects,
# the notifications made; every change is also a ledger entry (kind "breach").
breaches = Table(
    "breaches",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("aware_at", UTCDateTime(), nullable=False),
    Column("occurred_at", UTCDateTime(), nullable=True),
    Column("what", Text, nullable=False),
    Column("facts", Text, nullable=False),  # JSON: how, counts, categories, flags, texts
    Column("state", String(16), nullable=False),  # open, notified, closed
    Column("notifications", Text, nullable=False, server_default="[]"),  # JSON list
    Column("recorded_by", String, nullable=False),
    Column("recorded_at", UTCDateTime(), nullable=False),
    Column("closed_at", UTCDateTime(), nullable=True),
    Column("closed_by", String, nullable=True),
)

# Data-subject requests (access, correction, deletion, suspension, portability) with their
# deadline, state and coded exemptions; every change is also a ledger entry (kind "ticket").
subject_tickets = Table(
    "subject_tickets",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("patient_id", String, nullable=False),
    Column("issuer_of_patient_id", String, nullable=False, server_default=""),
    Column("requester", String, nullable=False),  # who asked (the subject, a representative)
    Column("regimes", String(16), nullable=False),  # "pipa", "gdpr" or "pipa,gdpr"
    Column("details", Text, nullable=False, server_default=""),
    Column("received_at", UTCDateTime(), nullable=False),
    Column("due_at", UTCDateTime(), nullable=False),
    Column("state", String(16), nullable=False),  # open, extended, done, refused
    Column("exemptions", Text, nullable=False, server_default="[]"),  # JSON list
    Column("outcome", Text, nullable=False, server_default=""),  # what was done, or the notice
    Column("recorded_by", String, nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("updated_by", String, nullable=False),
    Index("ix_subject_tickets_state", "state"),
)

# A data subject's refusal or explanation request about an automated decision (PIPA 37-2,
# migration 0014): the ticket that records it, the reviewer it is routed to, and which AI
# outputs it flags (a patient's, or one study's); a refusal holds new analysis while open.
automated_decision_flags = Table(
    "automated_decision_flags",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("ticket_id", Integer, ForeignKey("subject_tickets.id"), nullable=False, unique=True),
    Column("request", String(16), nullable=False),  # refuse | explain
    Column("patient_id", String, nullable=False),
    Column("issuer_of_patient_id", String, nullable=False, server_default=""),
    Column("study_instance_uid", String(64), nullable=False, server_default=""),  # "": all
    Column("reviewer", String, nullable=False),  # the person the request is routed to
    Column("state", String(16), nullable=False),  # open | resolved
    Column("flagged_at", UTCDateTime(), nullable=False),
    Column("resolved_at", UTCDateTime(), nullable=True),
    Index("ix_automated_decision_flags_patient_id", "patient_id"),
)

# Failed authentication, counted per hour, kind and address (bounded: one row per triple).
auth_failures = Table(
    "auth_failures",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("hour", UTCDateTime(), nullable=False),
    Column("kind", String(32), nullable=False),  # bearer-token, dpo-signin, ...
    Column("address", String(64), nullable=False),
    Column("count", Integer, nullable=False),
    UniqueConstraint("hour", "kind", "address", name="uq_auth_failures_hour"),
)

# --- identity and named recipients (migration 0007) ---------------------------------------------
# A legal hold on a patient names the issuer of the Patient ID (NULL: the ID under any issuer);
# a consent may name its recipients (PIPA 17(2)1; a JSON list, "" or "[]": any recipient).
legal_holds.append_column(Column("issuer_of_patient_id", String, nullable=True))
consents.append_column(Column("recipients", Text, nullable=False, server_default=""))

# --- state the nodes share (migration 0009) -----------------------------------------------------
# Named secrets every node uses (signing key, session and de-identification secrets), written
# once: the first node to insert one wins and every node reads it back.
node_secrets = Table(
    "node_secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", LargeBinary, nullable=False),
    Column("origin", String(16), nullable=False),  # generated | imported (from data_dir/keys)
    Column("created_at", UTCDateTime(), nullable=False),
)

# The DPO pages' open sessions, by the SHA-256 of the id the signed cookie carries.
dpo_sessions = Table(
    "dpo_sessions",
    metadata,
    Column("id_sha256", String(64), primary_key=True),
    Column("username", String, nullable=False),
    Column("method", String(16), nullable=False),
    Column("opened_at", UTCDateTime(), nullable=False),
    Index("ix_dpo_sessions_opened_at", "opened_at"),
)

# Failed DPO sign-ins in a row per user name or client address, and the lock they earned.
signin_failures = Table(
    "signin_failures",
    metadata,
    Column("key", String(160), primary_key=True),  # user:<name> | addr:<address>
    Column("failures", Integer, nullable=False),
    Column("locked_until", UTCDateTime(), nullable=True),
    Column("updated_at", UTCDateTime(), nullable=False),
    Index("ix_signin_failures_updated_at", "updated_at"),
)

# Leader leases: housekeeping that must run once runs on the holder (times on the DB's clock).
leader_leases = Table(
    "leader_leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(160), nullable=False),
    Column("acquired_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
)

# --- placed blobs whose outcome is not yet durable (migration 0008) ----------------------------
# The database `Placements` (archive/placements.py) of stores without a local journal (S3): one
# row per placing, from before the blob is put until its index row is committed (settled: the
# row goes) or its object is refused (withdrawn, then the row goes once the blob is removed).
# `node` names the node that placed it, so recovery on one node never judges another's.
placements = Table(
    "placements",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String, nullable=False),
    Column("node", String(160), nullable=False),
    Column("state", String(16), nullable=False),  # placing | withdrawn
    Column("started_at", UTCDateTime(), nullable=False),
    Index("ix_placements_node", "node"),
    Index("ix_placements_key", "key"),
)

# --- the pseudonymised-data register (migration 0015) -------------------------------------------
# One record per pseudonymised disclosure (a share that left de-identified), with the items of
# PIPA Decree Art. 29-5(2): purpose, the items pseudonymised, the recipient, the processing
# period, the method, who processed it; and, once the pseudonymised data are destroyed, when and
# how (it is then kept until 3 years after: governance/pseudonymised.py, PIPA Art. 28-4(3)). No
# pseudonym and no UID map is kept here or in the ledger (PIPA Art. 28-4(1)).
pseudonymised_records = Table(
    "pseudonymised_records",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("delivery_id", Integer, nullable=True, unique=True),
    Column("processed_at", UTCDateTime(), nullable=False),
    Column("processed_by", String, nullable=False),
    Column("purpose", String, nullable=False),
    Column("activity", String, nullable=False),
    Column("basis", String, nullable=False),
    Column("recipient", String, nullable=False),
    Column("recipient_name", String, nullable=False),
    Column("recipient_country", String(8), nullable=False),
    Column("profile", String, nullable=False),
    Column("method", Text, nullable=False),  # JSON: options, CID 7050 codes, table, UID scope
    Column("items", Text, nullable=False),  # JSON: [item, treatment] pairs
    Column("patient_ids", Text, nullable=False),  # JSON list (the originals, as in the ledger)
    Column("study_instance_uid", String(64), nullable=False),
    Column("instances", Integer, nullable=False),
    Column("instances_sent", Integer, nullable=False),
    Column("withheld", Integer, nullable=False),
    Column("last_sent_at", UTCDateTime(), nullable=True),
    Column("period", String(32), nullable=False),  # the recipient's promised retention
    Column("period_end", UTCDateTime(), nullable=True),
    Column("policy_version", String, nullable=False),
    Column("destroyed_at", UTCDateTime(), nullable=True),
    Column("destroyed_how", Text, nullable=False),
    Index("ix_pseudonymised_records_study_instance_uid", "study_instance_uid"),
)

# --- studies kept only because a law requires it (migration 0017, checklist item 33) -----------
# A row marks the study "retained by law" (PIPA 21(3)): its blobs live under ``retained/`` and
# the query engine, and so every normal way out, does not see it (archive/retained.py).
retained_studies = Table(
    "retained_studies",
    metadata,
    Column("study_instance_uid", String(64), primary_key=True),
    Column("patient_id", String, nullable=False),
    Column("legal_basis", String(64), nullable=False),  # a shipped code, e.g. MSA-22-2
    Column("rule_id", String(64), nullable=False),  # the retention rule that requires it
    Column("retained_until", UTCDateTime(), nullable=False),  # the legal period's end
    Column("ground", String, nullable=False),  # why the purpose ended
    Column("retained_at", UTCDateTime(), nullable=False),
    Column("retained_by", String, nullable=False),
)
