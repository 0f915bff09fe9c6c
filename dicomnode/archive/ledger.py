"""The append-only, hash-chained ledger: every governance decision and every destruction.

Entry n's hash is SHA-256 over entry n-1's hash and a canonical JSON encoding of entry n (its
sequence number, time, kind, actor, outcome and detail). Appends are serialised (SQLite's write
lock; a PostgreSQL advisory lock), and sequence numbers are the primary key, so the chain can
never fork. `verify` recomputes the chain and names the first entry that was edited, deleted or
moved. A write that fails raises, and the caller (egress) then lets nothing leave.

A hash chain alone cannot show that its tail was cut off. Checkpoints can: `checkpoint` signs
(seq, hash) of the last entry with the node's key, and `verify` checks the chain against every
checkpoint it is given (the table's, and any exported copy): an entry a checkpoint covers that
is missing, or whose hash differs, is named.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, func, select, text

from dicomnode.archive import schema
from dicomnode.archive.index import Index, Prepared
from dicomnode.core.errors import StorageUnavailable
from dicomnode.core.ledger import (
    GENESIS_HASH,
    Checkpoint,
    LedgerEntry,
    Verification,
    canonical_detail,
    entry_hash,
)

_LEDGER_LOCK = 1573_0001  # PostgreSQL advisory lock key that serialises appends
# Built once: an append runs on every disclosure decision, so on the request path.
_TAKE_LEDGER_LOCK = text(f"SELECT pg_advisory_xact_lock({_LEDGER_LOCK})")
_LEDGER_TAIL = text("SELECT seq, hash FROM ledger_entries ORDER BY seq DESC LIMIT 1")
_ENTRY_COLUMNS = ["seq", "recorded_at", "kind", "actor", "outcome", "detail", "prev_hash", "hash"]


class Ledger:
    """The ledger's persistence, in the index database."""

    def __init__(self, index: Index) -> None:
        self.index = index
        dialect = index.engine.dialect
        self._tail = Prepared(_LEDGER_TAIL, dialect)
        self._insert = Prepared(schema.ledger_entries.insert(), dialect, _ENTRY_COLUMNS)

    def append(
        self, conn: Connection, kind: str, actor: str, outcome: str, detail: dict[str, Any]
    ) -> LedgerEntry:
        """Append one entry inside the caller's write transaction (it commits with the change
        the entry records)."""
        if not self.index.is_sqlite:  # SQLite's write lock already serialises appends
            conn.execute(_TAKE_LEDGER_LOCK)
        tail = self._tail.run(conn, {}).fetchone()
        seq, prev = (tail[0] + 1, tail[1]) if tail else (1, GENESIS_HASH)
        recorded_at = datetime.now(UTC).isoformat(timespec="microseconds")
        body = canonical_detail(detail)
        digest = entry_hash(prev, seq, recorded_at, kind, actor, outcome, body)
        self._insert.run(
            conn,
            {
                "seq": seq,
                "recorded_at": recorded_at,
                "kind": kind,
                "actor": actor,
                "outcome": outcome,
                "detail": body,
                "prev_hash": prev,
                "hash": digest,
            },
        )
        return LedgerEntry(seq, recorded_at, kind, actor, outcome, body, prev, digest)

    def record(self, kind: str, actor: str, outcome: str, detail: dict[str, Any]) -> LedgerEntry:
        """Append one entry and commit it; raises StorageUnavailable when it cannot be written."""
        try:
            with self.index.write() as conn:
                return self.append(conn, kind, actor, outcome, detail)
        except Exception as e:
            raise StorageUnavailable(f"the ledger cannot be written: {e}") from e

    def entries(self, after: int = 0, batch: int = 1000) -> Iterator[LedgerEntry]:
        """Every entry in sequence order."""
        table = schema.ledger_entries
        while True:
            with self.index.read() as conn:
                rows = conn.execute(
                    select(table).where(table.c.seq > after).order_by(table.c.seq).limit(batch)
                ).all()
            for row in rows:
                yield LedgerEntry.from_row(row)
            if len(rows) < batch:
                return
            after = rows[-1].seq

    def count(self) -> int:
        with self.index.read() as conn:
            return conn.execute(
                select(func.count()).select_from(schema.ledger_entries)
            ).scalar_one()

    # --- checkpoints ------------------------------------------------------------------------

    def checkpoint(self, sign: Callable[[dict[str, Any]], str]) -> Checkpoint | None:
        """Sign the current head (None when the ledger is empty or the head is signed already)."""
        entries, checkpoints = schema.ledger_entries, schema.ledger_checkpoints
        with self.index.write() as conn:
            tail = conn.execute(
                select(entries.c.seq, entries.c.hash).order_by(entries.c.seq.desc()).limit(1)
            ).first()
            if tail is None:
                return None
            if conn.execute(select(checkpoints.c.seq).where(checkpoints.c.seq == tail.seq)).first():
                return None
            now = datetime.now(UTC)
            unsigned = Checkpoint(tail.seq, tail.hash, now.isoformat(timespec="seconds"), "")
            signed = Checkpoint(**{**unsigned.__dict__, "signature": sign(unsigned.payload())})
            conn.execute(
                checkpoints.insert().values(
                    seq=signed.seq,
                    head_hash=signed.head_hash,
                    created_at=now,
                    signature=signed.signature,
                )
            )
            return signed

    def checkpoints(self) -> list[Checkpoint]:
        t = schema.ledger_checkpoints
        with self.index.read() as conn:
            rows = conn.execute(select(t).order_by(t.c.seq)).all()
        return [Checkpoint(r.seq, r.head_hash, _iso(r.created_at), r.signature) for r in rows]

    def verify(
        self,
        checkpoints: Iterable[Checkpoint] | None = None,
        signature_ok: Callable[[Checkpoint], bool] | None = None,
    ) -> Verification:
        """Recompute the chain from the first entry: an edited entry fails its hash, a deleted one
        leaves a gap in the sequence, a moved one breaks the link to its predecessor; then hold
        it against `checkpoints` (default: the stored ones), each checked with `signature_ok`:
        a checkpoint beyond the last entry means the tail was cut off."""
        expected_seq, prev = 1, GENESIS_HASH
        checked = 0
        marks = {c.seq: c for c in (self.checkpoints() if checkpoints is None else checkpoints)}
        for mark in sorted(marks.values(), key=lambda c: c.seq):
            if signature_ok is not None and not signature_ok(mark):
                return Verification(
                    False,
                    0,
                    mark.seq,
                    f"the checkpoint of entry {mark.seq} is not signed by this node's key",
                )
        for entry in self.entries():
            if entry.seq != expected_seq:
                return Verification(
                    False, checked, expected_seq, f"entry {expected_seq} is missing", prev
                )
            if entry.prev_hash != prev:
                return Verification(
                    False, checked, entry.seq, "it does not link to the entry before it", prev
                )
            recomputed = entry_hash(
                prev,
                entry.seq,
                entry.recorded_at,
                entry.kind,
                entry.actor,
                entry.outcome,
                entry.detail,
            )
            if recomputed != entry.hash:
                return Verification(
                    False, checked, entry.seq, "its content does not match its hash", prev
                )
            mark = marks.get(entry.seq)
            if mark is not None and mark.head_hash != entry.hash:
                return Verification(
                    False,
                    checked,
                    entry.seq,
                    f"it differs from the checkpoint signed at {mark.created_at}",
                    prev,
                )
            checked += 1
            expected_seq, prev = entry.seq + 1, entry.hash
        beyond = [c for c in marks.values() if c.seq >= expected_seq]
        if beyond:
            last = max(beyond, key=lambda c: c.seq)
            return Verification(
                False,
                checked,
                expected_seq,
                f"the ledger ends at entry {expected_seq - 1}, but a checkpoint signed at "
                f"{last.created_at} covers entry {last.seq}: entries were cut off",
                prev,
                len(marks),
            )
        return Verification(True, checked, None, "", prev, len(marks))


def _iso(moment: datetime) -> str:
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return moment.isoformat(timespec="seconds")
