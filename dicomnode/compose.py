"""Wiring: the one place that builds the node's rooms from the settings.

`compose(settings, role)` opens the archive and builds governance's rooms over it (intake,
egress, stewardship, casework) and, where the role runs them, the analysis service. The role
says what else happens:

- ``serve``: the node (`dicomnode.serve.Node`): first the index schema is brought to this
  version's head (a SQLite index, or with ``[database] migrate_at_start``) or checked (else:
  SchemaNotCurrent, naming `dicomnode migrate`); the configured policy (``[governance]
  policy``) is published if its version is new, analysis is subscribed to intake;
- ``dimse-worker``: a DIMSE worker process: its metrics and audit log are handed in (they
  report to the main process), analysis only counts what arrives;
- ``cli``: one command of `dicomnode`: nothing is published and no analysis is built (a
  command that queues analysis asks `build_analysis`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from dicomnode.analysis.runner import AnalysisService
from dicomnode.archive import Archive
from dicomnode.archive.access_tags import AccessTagStore
from dicomnode.archive.auditlog import AuditLog
from dicomnode.archive.index import create_index_engine
from dicomnode.archive.keys import KeyStore
from dicomnode.archive.migrate import check_current, migrate
from dicomnode.casework import Casework, review_settings
from dicomnode.config import Settings
from dicomnode.core.errors import ConfigError
from dicomnode.core.metrics import Metrics
from dicomnode.core.times import utc_now
from dicomnode.dicomweb.stow_client import StowSender
from dicomnode.egress import Egress
from dicomnode.governance import PolicyError, audit_events
from dicomnode.governance.access_tags import rule_tags
from dicomnode.intake import Intake
from dicomnode.records import Records, Workbench
from dicomnode.scp.scu import DimseSender
from dicomnode.stewardship import Stewardship


class Role(enum.StrEnum):
    """What the composed services are for."""

    SERVE = "serve"
    DIMSE_WORKER = "dimse-worker"
    CLI = "cli"


SERVE, DIMSE_WORKER, CLI = Role.SERVE, Role.DIMSE_WORKER, Role.CLI


@dataclass
class Services:
    """The node's rooms over one archive, as `compose` built them for `role`."""

    settings: Settings
    role: Role
    metrics: Metrics
    archive: Archive
    audit: Any  # the AuditLog (or what stands in for it in a DIMSE worker)
    intake: Intake
    egress: Egress
    stewardship: Stewardship
    casework: Casework
    analysis: AnalysisService | None
    records: Records  # what layer 4 reads from the stores (the web face, /healthz)

    def close(self) -> None:
        """Close the archive (its index connections, its spare blob files)."""
        self.archive.close()


def compose(
    settings: Settings,
    role: Role | str,
    *,
    metrics: Metrics | None = None,
    audit: Any = None,
    clock: Callable[[], datetime] = utc_now,
) -> Services:
    """The archive and the rooms over it for `role` (see the module's docstring). `metrics`
    and `audit` stand in for the node's own (a DIMSE worker's report to the main process).
    Raises ConfigError when the configured policy cannot be published (role ``serve``)."""
    try:
        role = Role(role)
    except ValueError:
        raise ValueError(f"role: not one of {', '.join(Role)}: {role!r}") from None
    metrics = metrics if metrics is not None else Metrics()
    if role is SERVE:
        prepare_schema(settings)
    archive = open_archive(settings)
    try:
        services = _build(settings, role, archive, metrics, audit, clock)
        if role is SERVE:
            publish_configured_policy(settings, services.stewardship)
    except BaseException:
        archive.close()
        raise
    return services


def migrates_at_start(settings: Settings) -> bool:
    """Whether `serve` migrates the index itself: a SQLite index (the embedded default), or
    ``[database] migrate_at_start``."""
    return settings.database_url.startswith("sqlite") or settings.database.migrate_at_start


def migrate_index(settings: Settings) -> str:
    """Bring the index to this version's schema, under the migration lock (`dicomnode
    migrate`); returns the revision it is at."""
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    return migrate(settings.database_url)


def prepare_schema(settings: Settings) -> None:
    """Before `serve` opens the archive: migrate the index (`migrates_at_start`) or refuse a
    schema that is not current (SchemaNotCurrent, a ConfigError naming `dicomnode migrate`)."""
    if migrates_at_start(settings):
        migrate_index(settings)
        return
    engine = create_index_engine(settings.database_url)
    try:
        check_current(engine)
    finally:
        engine.dispose()


def open_archive(settings: Settings) -> Archive:
    """The archive of `settings`: blobs under the data directory or in the [storage] bucket
    (checked to refuse overwrites before anything starts), the configured index."""
    from dicomnode.archive.objectstore import blob_store_from_settings
    from dicomnode.archive.sealed import sealed_store_builder

    storage = settings.storage
    blob_store = blob_store_from_settings(storage, settings.node.name, settings.node.data_dir)
    if storage.encrypt_at_rest:  # item 31: sealed with per-study keys kept apart
        blob_store = sealed_store_builder(
            blob_store, settings.node.data_dir, storage.key_store_url, storage.backup_purge_days
        )
    return Archive(
        settings.node.data_dir,
        settings.database_url,
        settings.dimse.duplicate_policy,
        settings.node.quota_bytes,
        settings.node.min_free_bytes,
        blob_store=blob_store,
    )


def _build(
    settings: Settings,
    role: Role,
    archive: Archive,
    metrics: Metrics,
    audit: Any,
    clock: Callable[[], datetime],
) -> Services:
    audit = audit if audit is not None else AuditLog.from_settings(settings)
    audit.source = audit_events.reporter(
        settings.node.ae_title,
        settings.dimse.host,
        settings.audit.audit_source_id,
        settings.audit.enterprise_site_id,
    )
    archive.index.ingest_busy_seconds = settings.node.index_busy_seconds
    intake = Intake(archive, metrics, clock, audit)
    intake.max_inflated_bytes = settings.node.max_inflated_bytes
    egress = Egress(
        archive,
        peers={p.name: p for p in settings.peers},
        transports={
            "dimse": DimseSender(settings),
            "stow": StowSender(dict(settings.governance.stow_token_files)),
        },
        clock=clock,
        delivery_attempts=settings.governance.delivery_attempts,
        deid_secret=KeyStore(archive.index, settings.node.data_dir).deid_secret(),
        audit=audit,
    )
    stewardship = Stewardship(archive, clock, audit)
    casework = Casework(  # on stewardship's clock, read at each call (a test may swap it)
        archive, stewardship, egress, lambda: stewardship.clock(), review_settings(settings.dpo)
    )
    by_rule = partial(rule_tags, settings.access_tag_rules) if settings.access_tag_rules else None
    tagger = AccessTagStore(archive.index, {p.name: p.intake_tags for p in settings.peers}, by_rule)
    intake.subscribe(tagger.on_stored)  # study access tags by sender and attributes (item 41)
    analysis = None
    if role is not CLI and settings.analysis.enabled:
        analysis = build_analysis(settings, archive, intake, egress)
        intake.subscribe(analysis.on_stored)  # a worker counts; the main process runs the jobs
    return Services(
        settings,
        role,
        metrics,
        archive,
        audit,
        intake,
        egress,
        stewardship,
        casework,
        analysis,
        Records(archive, audit),
    )


def build_analysis(
    settings: Settings, archive: Archive, intake: Intake, egress: Egress
) -> AnalysisService:
    """The analysis service over the node's rooms (its analyzers from the installed plugins)."""
    return AnalysisService(settings.analysis, Workbench(archive), intake, egress)


def publish_configured_policy(settings: Settings, stewardship: Stewardship) -> None:
    """Publish ``[governance] policy`` if its version is new (ConfigError if it is unusable)."""
    path = settings.governance.policy
    if path is None:
        return
    try:
        stewardship.publish_policy(path.read_text(encoding="utf-8"), f"config:{path.name}")
    except (PolicyError, OSError, ValueError) as e:
        raise ConfigError("governance.policy", f"{path}: {e}") from None
