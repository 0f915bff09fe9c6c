"""Read-only views of the ledger for the DPO: filtered, paged, counted and exported.

Every filter runs in SQL on both back ends. Filters on the entry's detail (recipient, purpose,
lawful basis, operation, patient) read the canonical JSON with SQLite's ``json_extract`` /
``json_each`` or PostgreSQL's ``jsonb`` operators; the detail has no index, so such a filter
reads every entry of the kinds asked for (tens of milliseconds per 10^5 entries). Dates are UTC
days, compared with the ISO 8601 ``recorded_at`` that is part of each entry's hash.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, cast, exists, func, literal, not_, or_, select
from sqlalchemy.dialects.postgresql import JSONB

from dicomnode.archive import schema
from dicomnode.archive.index import Index
from dicomnode.core.ledger import DECISION_KINDS, RETRIEVALS, LedgerEntry, LedgerFilter, Page
from dicomnode.core.model import LedgerKind

FILTER_KEYS = ("recipient", "purpose", "basis", "operation")

_t = schema.ledger_entries


def _moment(day: date) -> str:
    """The first instant of `day` (UTC) in the ledger's own recorded_at format."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC).isoformat(timespec="microseconds")


class LedgerViews:
    """Filtered reads of the ledger table."""

    def __init__(self, index: Index) -> None:
        self.index = index

    # --- the JSON detail, per back end ------------------------------------------------------

    def _text(self, key: str) -> ColumnElement[Any]:
        """The string value of `key` in the entry's detail."""
        if self.index.is_sqlite:
            return func.json_extract(_t.c.detail, f"$.{key}")
        return cast(_t.c.detail, JSONB)[key].astext

    def _lists(self, key: str, value: str) -> ColumnElement[bool]:
        """Whether the list under `key` in the entry's detail holds the string `value`."""
        if self.index.is_sqlite:
            items = func.json_each(_t.c.detail, f"$.{key}").table_valued("value")
            return exists(select(literal(1)).select_from(items).where(items.c.value == value))
        return cast(_t.c.detail, JSONB)[key].contains([value])

    def _length(self, key: str) -> ColumnElement[int]:
        """The length of the list under `key` in the entry's detail (0 when absent)."""
        if self.index.is_sqlite:
            return func.coalesce(func.json_array_length(_t.c.detail, f"$.{key}"), 0)
        value = cast(_t.c.detail, JSONB)[key]
        return func.coalesce(
            case((func.jsonb_typeof(value) == "array", func.jsonb_array_length(value)), else_=0),
            0,
        )

    def _where(self, f: LedgerFilter) -> list[ColumnElement[bool]]:
        clauses: list[ColumnElement[bool]] = [_t.c.kind.in_(f.kinds)]
        if f.date_from:
            clauses.append(_t.c.recorded_at >= _moment(f.date_from))
        if f.date_to:
            clauses.append(_t.c.recorded_at < _moment(f.date_to + timedelta(days=1)))
        if f.outcome:
            clauses.append(_t.c.outcome == f.outcome)
        for key in FILTER_KEYS:
            value = getattr(f, key)
            if value:
                clauses.append(self._text(key) == value)
        if f.patient_id:
            clauses.append(self._lists("patient_ids", f.patient_id))
            if f.disclosed_patient_only:
                clauses.append(not_(self._lists("denied_patients", f.patient_id)))
        return clauses

    # --- views -------------------------------------------------------------------------------

    def page(self, f: LedgerFilter, page: int = 1, per_page: int = 50) -> Page:
        """One page of the matching entries, newest first, and how many match in all."""
        page = max(1, page)
        where = and_(*self._where(f))
        with self.index.read() as conn:
            total = conn.execute(select(func.count()).select_from(_t).where(where)).scalar_one()
            rows = conn.execute(
                select(_t)
                .where(where)
                .order_by(_t.c.seq.desc())
                .limit(per_page)
                .offset((page - 1) * per_page)
            ).all()
        return Page([LedgerEntry.from_row(r) for r in rows], int(total), page, per_page)

    def count(self, f: LedgerFilter) -> int:
        with self.index.read() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(_t).where(and_(*self._where(f)))
                ).scalar_one()
            )

    def iter(self, f: LedgerFilter, newest_first: bool = True) -> Iterator[LedgerEntry]:
        """Every matching entry (all pages) from one query whose rows are streamed, not
        loaded at once: for exports. The read stays open while the caller iterates."""
        order = _t.c.seq.desc() if newest_first else _t.c.seq
        query = select(_t).where(and_(*self._where(f))).order_by(order)
        with self.index.read() as conn:
            rows = conn.execution_options(stream_results=True, yield_per=1000).execute(query)
            for row in rows:
                yield LedgerEntry.from_row(row)

    def daily_counts(self, f: LedgerFilter) -> list[tuple[str, str, int]]:
        """(UTC day, recipient, entries) for the matching entries, oldest day first."""
        day = func.substr(_t.c.recorded_at, 1, 10)
        recipient = func.coalesce(self._text("recipient"), "")
        with self.index.read() as conn:
            rows = conn.execute(
                select(day, recipient, func.count())
                .where(and_(*self._where(f)))
                .group_by(day, recipient)
                .order_by(day, recipient)
            ).all()
        return [(str(d), str(r), int(n)) for d, r, n in rows]

    def choices(
        self, keys: tuple[str, ...] = FILTER_KEYS, kinds: tuple[str, ...] = DECISION_KINDS
    ) -> dict[str, list[str]]:
        """The values each of `keys` takes in entries of `kinds` (the filters' choices), from
        one pass over the entries."""
        columns = [self._text(key) for key in keys]
        with self.index.read() as conn:
            rows = conn.execute(select(*columns).where(_t.c.kind.in_(kinds)).distinct()).all()
        return {
            key: sorted({str(row[i]) for row in rows if row[i] not in (None, "")})
            for i, key in enumerate(keys)
        }

    def entry(self, seq: int) -> LedgerEntry | None:
        with self.index.read() as conn:
            row = conn.execute(select(_t).where(_t.c.seq == seq)).first()
        return LedgerEntry.from_row(row) if row else None

    def head(self) -> int:
        """The sequence number of the last entry (0: empty)."""
        with self.index.read() as conn:
            return int(conn.execute(select(func.coalesce(func.max(_t.c.seq), 0))).scalar_one())

    def latest(self, kind: str, outcome: str | None = None) -> LedgerEntry | None:
        query = select(_t).where(_t.c.kind == kind)
        if outcome is not None:
            query = query.where(_t.c.outcome == outcome)
        with self.index.read() as conn:
            row = conn.execute(query.order_by(_t.c.seq.desc()).limit(1)).first()
        return LedgerEntry.from_row(row) if row else None

    def patient_studies(self, patient_id: str) -> list[str]:
        """The Study Instance UIDs the index holds under this Patient ID (any issuer)."""
        st, p = schema.studies, schema.patients
        with self.index.read() as conn:
            return list(
                conn.execute(
                    select(st.c.study_instance_uid)
                    .join(p, st.c.patient_pk == p.c.id)
                    .where(p.c.patient_id == patient_id)
                ).scalars()
            )

    def copies_by_study(
        self, study_uids: list[str] | set[str], before_seq: int | None = None
    ) -> dict[str, list[dict[str, str]]]:
        """Per study, the recipients the ledger says received copies (before entry
        `before_seq`, when given): transfers that sent something, and allowed retrievals by a
        third party; each with the operation and when it last happened. The one rule that
        destruction records, erasure and the DPO pages use."""
        wanted = sorted(set(study_uids))
        if not wanted:
            return {}
        copied = or_(
            and_(_t.c.kind == LedgerKind.TRANSFER.value, self._length("sent") > 0),
            and_(
                _t.c.kind == LedgerKind.DISCLOSURE.value,
                self._text("operation").in_(RETRIEVALS),
                self._text("recipient_kind") == "third-party",
            ),
        )
        found: dict[str, dict[tuple[str, str], str]] = {}
        for start in range(0, len(wanted), 50):
            chunk = wanted[start : start + 50]
            clauses = [
                _t.c.kind.in_((LedgerKind.TRANSFER.value, LedgerKind.DISCLOSURE.value)),
                copied,
                or_(*[self._lists("study_instance_uids", u) for u in chunk]),
            ]
            if before_seq is not None:
                clauses.append(_t.c.seq < before_seq)
            with self.index.read() as conn:
                rows = conn.execute(
                    select(_t.c.detail, _t.c.recorded_at).where(*clauses).order_by(_t.c.seq)
                ).all()
            for detail, recorded_at in rows:
                data = json.loads(detail)
                for study in set(data.get("study_instance_uids") or ()) & set(chunk):
                    key = (str(data.get("recipient") or ""), str(data.get("operation") or ""))
                    found.setdefault(study, {})[key] = recorded_at
        return {
            study: [
                {"recipient": r, "operation": op, "last_at": at}
                for (r, op), at in sorted(copies.items())
            ]
            for study, copies in found.items()
        }

    def recipients_with_copies(self, study_uids: list[str], before_seq: int) -> list[str]:
        """The recipients that received copies of any of these studies before `before_seq`."""
        copies = self.copies_by_study(study_uids, before_seq)
        return sorted(
            {c["recipient"] for found in copies.values() for c in found if c["recipient"]}
        )
