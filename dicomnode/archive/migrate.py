"""Bringing the index's schema to the head revision: `migrate` (the `dicomnode migrate`
command; `serve` runs it on the embedded default). Opening the archive only checks that the
schema is current (`check_current`), so several processes or nodes never race to migrate.

On PostgreSQL the migration runs under a session advisory lock (`pg_advisory_lock`): a second
`migrate` waits for the first, then finds the schema at head and does nothing. On SQLite a
lock file beside the database does the same for processes of one machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
from collections.abc import Iterator
from pathlib import Path

from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url

from dicomnode.archive import migrations
from dicomnode.archive.index import create_index_engine
from dicomnode.core.errors import ConfigError

MIGRATION_LOCK = 0x6469636F6D6E6F64  # the PostgreSQL advisory lock's key ("dicomnod")


class SchemaNotCurrent(ConfigError):
    """The index's schema is not at the revision this version of dicomnode needs."""


@functools.cache
def head_revision() -> str:
    """The revision this version's migrations end at."""
    script = ScriptDirectory.from_config(migrations.alembic_config(None))  # type: ignore[arg-type]
    (head,) = script.get_heads()
    return head


def current_revision(conn: Connection) -> str | None:
    """The revision the database is at (None: never migrated)."""
    heads = MigrationContext.configure(conn).get_current_heads()
    return heads[0] if len(heads) == 1 else None


def migrate(database_url: str) -> str:
    """Bring the index at `database_url` to the head revision, under a lock that makes
    concurrent calls (processes, nodes) wait their turn; returns the head revision."""
    engine = create_index_engine(database_url)
    try:
        with _migration_lock(engine, database_url) as conn:
            config = migrations.alembic_config(engine)
            config.attributes["connection"] = conn
            from alembic import command

            command.upgrade(config, "head")
            conn.commit()
            return current_revision(conn) or ""
    finally:
        engine.dispose()


def check_current(engine: Engine) -> None:
    """Raise SchemaNotCurrent, naming `dicomnode migrate`, unless the index is at head."""
    with engine.connect() as conn:
        current = current_revision(conn)
    head = head_revision()
    if current != head:
        found = f"revision {current}" if current else "no dicomnode schema"
        raise SchemaNotCurrent(
            "database_url",
            f"the index database has {found}; this version needs revision {head}: "
            "run `dicomnode migrate` (with the same --config) first",
        )


@contextlib.contextmanager
def _migration_lock(engine: Engine, database_url: str) -> Iterator[Connection]:
    """A connection holding the migration lock of the database."""
    url = make_url(database_url)
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
            conn.commit()
            try:
                yield conn
            finally:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
                conn.commit()
            return
        if engine.dialect.name == "sqlite" and url.database not in (None, "", ":memory:"):
            lock = Path(url.database + ".migrate-lock")
            with lock.open("a") as held:
                fcntl.flock(held, fcntl.LOCK_EX)
                try:
                    yield conn
                finally:
                    fcntl.flock(held, fcntl.LOCK_UN)
            return
        yield conn
