"""The index: SQLAlchemy engine set-up and the write transaction of ingest.

The few statements every received object runs (is it known, which series, insert it) are
compiled once per engine into the DBAPI's own SQL (`Prepared`) and run on the transaction's
DBAPI cursor: SQLAlchemy's per-execution work costs more than SQLite's.

SQLite runs in WAL mode with synchronous=FULL, so a commit is durable when it returns;
writers in one process take a lock so that they queue instead of failing with "database is
locked", and the writes of received objects that queued while one commit was being written
go in together, in one transaction (`Index.write_grouped`, group commit). Those ingest
commits alone run with synchronous=NORMAL: visible at once and safe from a process crash,
but synced to disk with the next FULL commit or checkpoint instead of each on its own. Each
of those objects' blobs is synced before its commit, so the rows a power loss could take
are rebuilt from their blobs at the next start (`Archive.unindexed_recent_blobs`).
PostgreSQL needs neither: concurrent inserts of the same patient, study or series are
resolved by INSERT ... ON CONFLICT DO NOTHING on both back ends. `Index.make_durable` syncs
SQLite's WAL file, after which the blobs' placement journal entries of those rows may go.

An ingest write waits at most `ingest_busy_seconds` for the write lock (in this process and
SQLite's, held by another process): then the sender is answered "out of resources" (0xA700)
while it still waits for the answer, instead of after its own timeout gave up on the node.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

from pydicom.dataset import Dataset
from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    create_engine,
    event,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from dicomnode.archive import schema
from dicomnode.core.attributes import ATTRIBUTES_BY_LEVEL, INDEXED, IndexedAttribute
from dicomnode.core.errors import DatasetMismatch, IndexUnavailable
from dicomnode.core.model import Level, Source, StoredInstance
from dicomnode.core.turns import ANY_TIME, Turn

# Statements of the ingest hot path, built once (building them costs more than running them).
_SERIES_BY_UID = select(schema.series.c.id, schema.series.c.study_pk).where(
    schema.series.c.series_instance_uid == bindparam("uid")
)
_TOUCH_SERIES = (
    update(schema.series)
    .where(schema.series.c.id == bindparam("pk_"))
    .values(updated_at=bindparam("now_"))
)
_TOUCH_STUDY = (
    update(schema.studies)
    .where(schema.studies.c.id == bindparam("pk_"))
    .values(updated_at=bindparam("now_"))
)
_INSTANCE_BY_UID = select(
    schema.instances.c.id, schema.instances.c.sha256, schema.instances.c.blob_path
).where(schema.instances.c.sop_instance_uid == bindparam("uid"))
_SERIES_UID = INDEXED["SeriesInstanceUID"].reader
TOUCH_SECONDS = 1.0  # how often a series' (and its study's) updated_at is rewritten at most
BUSY_MS = 60_000  # how long a write waits for SQLite's lock (PRAGMA busy_timeout)
INGEST_BUSY_SECONDS = 15.0  # how long an ingest write waits at most (under senders' timeouts)
# SQLite maps its WAL index (the "-shm" file) into memory and grows it 32 KiB at a time, by
# writing one byte per memory page; on a filesystem whose blocks are smaller than a page, the
# rest of the page is allocated only when written through the mapping, and a full disk then
# kills the process with SIGBUS. The node warns at start of such a filesystem, and makes a
# fatal signal leave the Python stacks in its log (faulthandler) instead of dying silently.
# (Allocating the file up front was tried: SQLite's own handling of the file's size then
# raised SIGBUS in another process, so the file is left to SQLite.)

log = logging.getLogger("dicomnode.index")


class Prepared:
    """A Core statement compiled once for a dialect, with named parameters, run on a DBAPI
    cursor with SQLAlchemy's own conversion of each parameter (e.g. datetimes on SQLite)."""

    def __init__(self, statement: Any, dialect: Any, column_keys: list[str] | None = None):
        if dialect.paramstyle not in ("named", "pyformat"):
            dialect = type(dialect)(paramstyle="named")
        compiled = statement.compile(dialect=dialect, column_keys=column_keys)
        self.sql = str(compiled)
        self._convert = {
            key: convert
            for key, bind in compiled.binds.items()
            if (convert := bind.type.bind_processor(dialect)) is not None
        }

    def run(self, conn: Connection, params: dict[str, Any]) -> Any:
        """Execute on `conn`'s DBAPI connection (inside its transaction); the cursor."""
        for key, convert in self._convert.items():
            if key in params:
                params[key] = convert(params[key])
        cursor = conn.connection.dbapi_connection.cursor()
        cursor.execute(self.sql, params)
        return cursor


def create_index_engine(url: str) -> Engine:
    """An engine for `url`, with SQLite tuned for a durable, concurrent archive."""
    if url.startswith("sqlite"):
        _guard_shared_memory(url)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself
            cursor = dbapi_connection.cursor()
            for pragma in (
                "journal_mode=WAL",
                "synchronous=FULL",
                "foreign_keys=ON",
                "case_sensitive_like=ON",
                f"busy_timeout={BUSY_MS}",
            ):
                cursor.execute(f"PRAGMA {pragma}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # A write transaction takes the write lock at once: a deferred one that upgrades
            # later fails with "database is locked" when another process wrote in between.
            mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
            conn.connection.dbapi_connection.execute(f"BEGIN {mode}")  # on every transaction

        return engine
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def _guard_shared_memory(url: str) -> None:
    """Make a fatal signal (SIGBUS from SQLite's mapped WAL index, see above) write the Python
    stacks to stderr, the node's log, before the process dies; and warn at start when the
    index's filesystem has blocks smaller than a memory page, where a full disk can do that."""
    if not faulthandler.is_enabled():
        faulthandler.enable()
    database = url.split("///", 1)[-1].split("?", 1)[0]
    if not database or database == ":memory:":
        return
    try:
        block = os.statvfs(os.path.dirname(os.path.abspath(database))).f_frsize
    except OSError:
        return
    if block < mmap.PAGESIZE:
        log.warning(
            "the index's filesystem has %d-byte blocks, smaller than a memory page (%d): when "
            "that disk fills, SQLite's shared memory file can stop the node (SIGBUS); put the "
            "index on a filesystem with blocks of at least a page",
            block,
            mmap.PAGESIZE,
            extra={"event": "storage", "alert": True},
        )


def normalized_value(attribute: IndexedAttribute, ds: Dataset) -> str | int | None:
    """The value of `attribute` in `ds` as the index stores it, or None when absent."""
    if attribute.is_integer:
        return attribute.reader.integer(ds)
    text = attribute.reader.text(ds)
    if text is None:
        return None
    if attribute.vr == "DA":
        text = text.replace(".", "")
    elif attribute.vr == "TM":
        text = text.replace(":", "")
    return text or None


def level_values(level: Level, ds: Dataset) -> dict[str, Any]:
    return {a.column: normalized_value(a, ds) for a in ATTRIBUTES_BY_LEVEL[level]}


T = TypeVar("T")


class _QueuedWrite:
    """One caller's part of a group commit: its work, then its result or its error."""

    def __init__(self, work: Callable[[Connection], Any]) -> None:
        self.work = work
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None


class _InstanceRow(NamedTuple):
    id: int
    sha256: str
    blob_path: str


class Index:
    """Reads and writes of the index tables."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._sqlite_lock = threading.Lock()  # SQLite's writers in this process queue for it
        self._write_lock = self._sqlite_lock if self.is_sqlite else contextlib.nullcontext()
        self._queued: list[_QueuedWrite] = []
        self._queued_lock = threading.Lock()
        self._touched: dict[int, float] = {}  # series pk -> when this process last touched it
        dialect = engine.dialect
        self._instance_by_uid = Prepared(_INSTANCE_BY_UID, dialect)
        self._series_by_uid = Prepared(_SERIES_BY_UID, dialect)
        self._touch_series = Prepared(_TOUCH_SERIES, dialect)
        self._touch_study = Prepared(_TOUCH_STUDY, dialect)
        self._inserts: dict[tuple[str, ...], Prepared] = {}
        self._sqlite_writer: Connection | None = None  # used only by the write lock's holder
        self._writer_synchronous = "FULL"  # the writer connection's PRAGMA synchronous
        self._writer_busy_ms = BUSY_MS  # and its PRAGMA busy_timeout
        self.ingest_busy_seconds = INGEST_BUSY_SECONDS

    def close(self) -> None:
        with self._write_lock:
            if self._sqlite_writer is not None:
                self._sqlite_writer.close()
                self._sqlite_writer = None

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction, committed on exit."""
        if not self.is_sqlite:
            with self.engine.connect() as conn, conn.begin():
                yield conn
            return
        with self._write_lock, self._writer_transaction() as conn:
            yield conn

    def probe_write(self, timeout: float = 2.0) -> None:
        """Raise unless a write transaction can be committed within about `timeout` seconds
        (for /healthz: reads keep working while writes fail on a full disk, a read-only or
        locked database, or a PostgreSQL standby)."""
        if not self.is_sqlite:
            with self.write() as conn:
                conn.execute(text(f"SET LOCAL statement_timeout = {int(timeout * 1000)}"))
                conn.execute(text("SELECT pg_catalog.txid_current()"))  # fails when read-only
            return
        if not self._sqlite_lock.acquire(timeout=timeout):
            raise IndexUnavailable("the index database is busy with other writes")
        try:
            with self._writer_transaction(busy_ms=int(timeout * 1000)) as conn:
                driver = conn.connection.dbapi_connection
                version = driver.execute("PRAGMA user_version").fetchone()[0]
                driver.execute(f"PRAGMA user_version = {int(version)}")  # a write of page 1
        finally:
            self._sqlite_lock.release()

    @contextlib.contextmanager
    def _writer_transaction(
        self, synced: bool = True, busy_ms: int | None = None
    ) -> Iterator[Connection]:
        """A write transaction on SQLite's one writing connection, which stays open between
        transactions (a checkout from the pool costs more than a small insert); after a
        failed transaction it is replaced. The caller holds the write lock. Unless `synced`,
        the commit is not synced on its own (synchronous=NORMAL: a later FULL commit or
        checkpoint syncs it): only for rows that can be rebuilt from synced blobs."""
        conn = self._sqlite_writer
        if conn is None:
            conn = self.engine.connect().execution_options(sqlite_begin="IMMEDIATE")
            self._sqlite_writer = conn
            self._writer_synchronous = "FULL"  # as every connection starts
            self._writer_busy_ms = BUSY_MS
        synchronous = "FULL" if synced else "NORMAL"
        if synchronous != self._writer_synchronous:  # set between transactions, never inside
            conn.connection.dbapi_connection.execute(f"PRAGMA synchronous={synchronous}")
            self._writer_synchronous = synchronous
        if busy_ms is None:
            busy_ms = BUSY_MS if synced else max(1, int(self.ingest_busy_seconds * 1000))
        if busy_ms != self._writer_busy_ms:
            conn.connection.dbapi_connection.execute(f"PRAGMA busy_timeout={busy_ms}")
            self._writer_busy_ms = busy_ms
        try:
            with conn.begin():
                yield conn
        except BaseException:
            self._sqlite_writer = None
            conn.close()
            raise

    def write_grouped(self, work: Callable[[Connection], T], turn: Turn = ANY_TIME) -> T:
        """`work(conn)` in a write transaction that is committed before this returns, possibly
        together with the work of other threads that waited meanwhile (on SQLite, whose writers
        queue for one lock: one commit for all of them). Only for the index rows of received
        objects whose blobs are synced: on SQLite the commit is not synced on its own (see the
        module's docstring). Each caller's work runs in
        a savepoint of its own when there are several, so its error rolls back only its own
        writes and is raised to that caller; a failed commit is raised to every caller.
        The work is queued (so its rows are written) after that of the turns before `turn`."""
        turn.wait()
        if not self.is_sqlite:
            try:
                with self.write() as conn:
                    value = work(conn)
                    turn.passed()  # our rows have their ids: the next turn may insert
                    return value
            finally:
                turn.passed()
        queued = _QueuedWrite(work)
        with self._queued_lock:
            self._queued.append(queued)
        turn.passed()
        if not self._sqlite_lock.acquire(timeout=self.ingest_busy_seconds):
            with self._queued_lock:
                if queued in self._queued:  # not taken into a commit: it never will be
                    self._queued.remove(queued)
                    raise IndexUnavailable(
                        "the index database stayed busy with other writes past its timeout; "
                        "try again later"
                    )
            self._sqlite_lock.acquire()  # a commit holding it is writing this one: wait for it
        try:  # the holder commits everything queued so far
            if not queued.done:
                with self._queued_lock:
                    batch, self._queued = self._queued, []
                self._commit_batch(batch)
        finally:
            self._sqlite_lock.release()
        if queued.error is not None:
            raise queued.error
        return queued.value  # type: ignore[no-any-return]

    def make_durable(self) -> None:
        """Sync every commit made so far: SQLite's ingest commits are not synced on their own
        (`write_grouped`); syncing the WAL file they were appended to makes them durable.
        PostgreSQL's commits are durable when they return."""
        database = self.engine.url.database if self.is_sqlite else None
        if not database or database == ":memory:":
            return
        try:
            fd = os.open(database + "-wal", os.O_RDONLY)
        except FileNotFoundError:
            return  # checkpointed and removed: everything is in the database file
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _commit_batch(self, batch: list[_QueuedWrite]) -> None:
        try:
            with self._writer_transaction(synced=False) as conn:
                if len(batch) == 1:
                    batch[0].value = batch[0].work(conn)
                else:  # savepoints straight on the driver: SQLAlchemy's cost more than SQLite's
                    cursor = conn.connection.dbapi_connection.cursor()
                    for queued in batch:
                        cursor.execute("SAVEPOINT queued_write")
                        try:
                            queued.value = queued.work(conn)
                        except Exception as e:  # raised to its own caller, the others go on
                            cursor.execute("ROLLBACK TO queued_write")
                            queued.error = e
                        cursor.execute("RELEASE queued_write")
        except BaseException as e:
            for queued in batch:
                queued.error = queued.error or e
                queued.value = None
            if not isinstance(e, Exception):
                raise
        finally:
            for queued in batch:
                queued.done = True

    def serialize(self, conn: Connection, key: int) -> None:
        """Make this write transaction the only one holding `key` until it ends: a check then
        an insert (the next consent version, an active restriction) cannot race another
        process. SQLite's write lock does this already; PostgreSQL takes an advisory lock."""
        if not self.is_sqlite:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    def _insert_ignore(
        self, conn: Connection, table: Any, values: dict[str, Any], keys: list[str]
    ) -> None:
        dialect_insert = sqlite.insert if self.is_sqlite else postgresql.insert
        conn.execute(
            dialect_insert(table).values(**values).on_conflict_do_nothing(index_elements=keys)
        )

    def _pk(self, conn: Connection, table: Any, **where: Any) -> int:
        query = select(table.c.id)
        for column, value in where.items():
            query = query.where(table.c[column] == value)
        return conn.execute(query).scalar_one()

    def ensure_hierarchy(self, conn: Connection, header: Dataset, now: datetime) -> int:
        """Create the patient, study and series rows `header` belongs to; returns the series pk."""
        series_uid = _SERIES_UID.text(header)
        known = self._series_by_uid.run(conn, {"uid": series_uid}).fetchone()
        if known is not None:  # the common case: one more instance of a series we have
            series_pk, study_pk = known
            self._touch(conn, series_pk, study_pk, now)
            return int(series_pk)
        patient = level_values(Level.PATIENT, header)
        patient["issuer_of_patient_id"] = patient["issuer_of_patient_id"] or ""
        self._insert_ignore(
            conn,
            schema.patients,
            {**patient, "created_at": now},
            ["patient_id", "issuer_of_patient_id"],
        )
        patient_pk = self._pk(
            conn,
            schema.patients,
            patient_id=patient["patient_id"],
            issuer_of_patient_id=patient["issuer_of_patient_id"],
        )
        study = level_values(Level.STUDY, header)
        self._insert_ignore(
            conn,
            schema.studies,
            {**study, "patient_pk": patient_pk, "created_at": now, "updated_at": now},
            ["study_instance_uid"],
        )
        study_row = conn.execute(
            select(schema.studies.c.id, schema.studies.c.patient_pk).where(
                schema.studies.c.study_instance_uid == study["study_instance_uid"]
            )
        ).one()
        if study_row.patient_pk != patient_pk:  # one study, one patient
            raise DatasetMismatch(
                f"study {study['study_instance_uid']} belongs to another patient than "
                f"PatientID {patient['patient_id']!r}; the object is refused"
            )
        study_pk = study_row.id
        conn.execute(_TOUCH_STUDY, {"pk_": study_pk, "now_": now})
        series = level_values(Level.SERIES, header)
        self._insert_ignore(
            conn,
            schema.series,
            {**series, "study_pk": study_pk, "created_at": now, "updated_at": now},
            ["series_instance_uid"],
        )
        series_pk = self._pk(conn, schema.series, series_instance_uid=series["series_instance_uid"])
        conn.execute(_TOUCH_SERIES, {"pk_": series_pk, "now_": now})
        return series_pk

    def _touch(self, conn: Connection, series_pk: int, study_pk: int, now: datetime) -> None:
        """Set the series' and study's updated_at to `now`, at most once a second per series
        (their updated_at is "last received", to the second), so that a stream of instances
        of one series does not rewrite the same two rows for each of them."""
        moment = time.monotonic()
        if moment - self._touched.get(series_pk, -TOUCH_SECONDS) < TOUCH_SECONDS:
            return
        # the study before the series, as when a series is created: writers that take row
        # locks in one order cannot deadlock (PostgreSQL)
        self._touch_study.run(conn, {"pk_": study_pk, "now_": now})
        self._touch_series.run(conn, {"pk_": series_pk, "now_": now})
        if len(self._touched) > 10_000:
            self._touched.clear()
        self._touched[series_pk] = moment

    def instance_row(self, conn: Connection, sop_instance_uid: str) -> Any:
        """(id, sha256, blob_path) of the instance with this SOP Instance UID, or None."""
        row = self._instance_by_uid.run(conn, {"uid": sop_instance_uid}).fetchone()
        return _InstanceRow(*row) if row is not None else None

    def insert_instance(self, conn: Connection, values: dict[str, Any]) -> None:
        keys = tuple(values)
        insert = self._inserts.get(keys)
        if insert is None:
            insert = self._inserts[keys] = Prepared(
                schema.instances.insert(), self.engine.dialect, list(keys)
            )
        insert.run(conn, dict(values))

    def instance_values(
        self, header: Dataset, series_pk: int, stored: StoredInstance, source: Source, now: datetime
    ) -> dict[str, Any]:
        return {
            **level_values(Level.IMAGE, header),
            "series_pk": series_pk,
            "transfer_syntax_uid": stored.transfer_syntax_uid,
            "blob_path": stored.blob_path,
            "size": stored.size,
            "sha256": stored.sha256,
            "received_at": now,
            "source_protocol": source.protocol,
            "source_caller": source.caller,
        }
