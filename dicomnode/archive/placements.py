"""`Placements` in the index database: the record of placed blobs for stores that have no
local journal to link into (S3-compatible object storage, where several nodes share a bucket).

One row per placing (table ``placements``: key, node, state, started_at), committed before the
blob is put; deleted when the blob's index row is committed (settled), or marked withdrawn
(committed) before a refused object's blob is removed and deleted after. Recovery reads the rows
of its own node (`leftovers`): a node never judges another node's placings, which may be in
flight. Within a node, recovery runs at start-up, before the node's processes place anything.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import delete, func, insert, select, update

from dicomnode.archive import schema
from dicomnode.archive.blobstore import Leftover, Placement
from dicomnode.archive.index import Index

PLACING = "placing"
WITHDRAWN = "withdrawn"


@dataclass(frozen=True)
class RowPlacement:
    """A placing recorded as row `id` of ``placements``."""

    id: int
    key: str


def default_node_name() -> str:
    """The name a node records its placings under when none is configured: its host name."""
    return socket.gethostname()


class DatabasePlacements:
    """`Placements` as rows of the index database, under the name of this node."""

    def __init__(self, index: Index, node: str | None = None) -> None:
        self.index = index
        self.node = node or default_node_name()

    def record(self, key: str, staged: Path | None = None) -> RowPlacement:
        with self.index.write() as conn:
            row = conn.execute(
                insert(schema.placements)
                .values(key=key, node=self.node, state=PLACING, started_at=datetime.now(UTC))
                .returning(schema.placements.c.id)
            ).scalar_one()
        return RowPlacement(int(row), key)

    def settle(self, placements: Iterable[Placement]) -> None:
        ids = [_row(p).id for p in placements]
        if not ids:
            return
        table = schema.placements
        with self.index.write() as conn:
            for start in range(0, len(ids), 500):
                conn.execute(delete(table).where(table.c.id.in_(ids[start : start + 500])))

    def withdraw(self, placement: Placement) -> bool:
        row, table = _row(placement), schema.placements
        with self.index.write() as conn:
            conn.execute(update(table).where(table.c.id == row.id).values(state=WITHDRAWN))
            others = conn.execute(
                select(func.count()).where(
                    table.c.key == row.key, table.c.id != row.id, table.c.state == PLACING
                )
            ).scalar_one()
        return others == 0

    def forget(self, placement: Placement) -> None:
        self.settle([placement])

    def leftovers(self) -> list[Leftover]:
        table = schema.placements
        with self.index.read() as conn:
            rows = conn.execute(
                select(table.c.id, table.c.key, table.c.state, table.c.started_at)
                .where(table.c.node == self.node)
                .order_by(table.c.id)
            ).all()
        return [
            Leftover(RowPlacement(id_, key), key, _utc(started).timestamp(), state == WITHDRAWN)
            for id_, key, state, started in rows
        ]


def _row(placement: Placement) -> RowPlacement:
    if not isinstance(placement, RowPlacement):
        raise TypeError(f"not a database placement: {placement!r}")
    return placement


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
