"""Encryption at rest with a data key per study, and crypto-shredding (checklist item 31).

`SealedBlobStore` wraps any `BlobStore` (files or S3): every blob, held (quarantined) object
and cached data it writes is sealed with its study's data key, and read back through it. The
study is the first part of the key (after ``held/`` or ``cache/``). The keys live in a
`StudyKeyStore`, a database apart from the index (by default its own SQLite file), so a
backup of the index and the blobs holds no key: destroying a study destroys its key row, and
every copy of its blobs, in backups too, is unreadable with what remains.

The sealed format (one header, then the data in 64 KiB chunks, each sealed on its own):

    header  = b"DNSEAL1\\n" | key id (8) | salt (32) | plaintext size (u64) | chunk size (u32)
    chunk i = AES-256-GCM(blob key, nonce = i (u64) | last (u32), data, aad = header | key)

The blob key is HKDF-SHA256 of the study's data key with the header's salt. The salt is an
HMAC (by the study key) of the blob's key and the SHA-256 of its bytes: sealing the same bytes
at the same key gives the same sealed bytes (an S3 put refused because the key is taken
compares equal, as before), and no two different plaintexts share a blob key and a nonce.
Chunks make byte ranges (a frame) cheap: only the chunks a range covers are read, and each is
authenticated on its own (GCM tag). Integrity: a chunk altered, moved within the blob, moved to
another blob or key, a header altered, or a blob truncated fails to open (the chunk's index and
the last-chunk flag are in its nonce; the header with the plaintext size, and the blob's key,
are its associated data), and reads raise `SealBroken`; bytes appended after the last chunk
are never read. A range read authenticates the chunks it covers, not the others (a reader of
one frame does not pay for the whole blob); a whole-blob read authenticates every chunk.

Blobs without the header (written before ``encrypt_at_rest`` was turned on) are read as they
are. A blob whose study key was destroyed raises `StudyKeyDestroyed` (a FileNotFoundError:
for the archive, the study is gone).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from dicomnode.archive.blobstore import BlobStore, Placement, Range
from dicomnode.core.errors import NotFound
from dicomnode.core.uids import validate_uid

log = logging.getLogger("dicomnode.archive.sealed")

MAGIC = b"DNSEAL1\n"
HEADER = struct.Struct(">8s8s32sQI")  # magic, key id, salt, plaintext size, chunk size
CHUNK = 64 * 1024
TAG = 16
_BLOB_KEY_INFO = b"dicomnode sealed blob v1"
KEY_STORE_FILE = "study-keys.sqlite"
QUEUED, DONE = "queued", "done"
KEY_CACHE_SECONDS = 5.0  # how long a process keeps a study key it read, at most


class StudyKeyDestroyed(FileNotFoundError):
    """The blob's study data key is gone (the study was destroyed): it cannot be read."""


class SealBroken(OSError):
    """A sealed blob does not authenticate: altered, truncated, or not the blob at its key."""


# --- the key store ---------------------------------------------------------------------------

_metadata = MetaData()
study_keys = Table(
    "study_keys",
    _metadata,
    Column("study_instance_uid", String(64), primary_key=True),
    Column("key_id", LargeBinary(8), nullable=False),
    Column("data_key", LargeBinary(32), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
# Backup purges queued by destructions: every backup of the index (or of blobs from before
# encryption) taken before `destroyed_at` holds the study; by `due_at` each is purged or has
# expired (the window the README documents), and an operator marks it done.
backup_purges = Table(
    "backup_purges",
    _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_instance_uid", String(64), nullable=False),
    Column("destroyed_at", DateTime(timezone=True), nullable=False),
    Column("due_at", DateTime(timezone=True), nullable=False),
    Column("state", String(16), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("done_at", DateTime(timezone=True)),
)


@dataclass(frozen=True)
class BackupPurge:
    """A queued (or done) purge of a destroyed study from the backups."""

    id: int
    study_instance_uid: str
    destroyed_at: datetime
    due_at: datetime
    state: str
    actor: str


def _key_store_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_size=5, max_overflow=10, pool_pre_ping=True)
    path = url.split("///", 1)[-1].split("?", 1)[0]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # A destroyed key's page is overwritten with zeros, not left in the file's free pages;
        # a rollback journal (not a WAL that keeps old pages until a checkpoint).
        for pragma in ("secure_delete=ON", "journal_mode=DELETE", "synchronous=FULL"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    return engine


class StudyKeyStore:
    """The studies' data keys (32 random bytes each, with an 8-byte id that sealed blobs name)
    and the queue of backup purges, in a database apart from the index (`url`)."""

    def __init__(
        self, url: str, backup_purge_days: int = 35, cache_seconds: float = KEY_CACHE_SECONDS
    ) -> None:
        self.url = url
        self.backup_purge_days = backup_purge_days
        self.cache_seconds = cache_seconds
        self.engine = _key_store_engine(url)
        _metadata.create_all(self.engine)
        self._lock = threading.Lock()
        # study -> (key id, key, when read): kept `cache_seconds` at most, so a key another
        # node destroyed leaves this process's memory soon after
        self._known: dict[str, tuple[bytes, bytes, float]] = {}

    def key_for_sealing(self, study: str) -> tuple[bytes, bytes]:
        """The study's (key id, key), made now if it has none; read from the store at every
        call (another process may have destroyed it: a new one is made then)."""
        found = self._read(study)
        if found is None:
            made = (secrets.token_bytes(8), secrets.token_bytes(32))
            with self.engine.begin() as conn:
                dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
                conn.execute(
                    dialect.insert(study_keys)
                    .values(
                        study_instance_uid=study,
                        key_id=made[0],
                        data_key=made[1],
                        created_at=datetime.now(UTC),
                    )
                    .on_conflict_do_nothing(index_elements=[study_keys.c.study_instance_uid])
                )
            found = self._read(study)
            if found is None:
                raise OSError(f"the data key of study {study} was written but cannot be read")
        with self._lock:
            self._known[study] = (*found, time.monotonic())
        return found

    def key_for_opening(self, study: str, key_id: bytes) -> bytes:
        """The study's key with id `key_id` (StudyKeyDestroyed when the store has no such);
        read again from the store when the copy at hand is `cache_seconds` old."""
        now = time.monotonic()
        with self._lock:
            known = self._known.get(study)
        if known is not None and known[0] == key_id and now - known[2] < self.cache_seconds:
            return known[1]
        found = self._read(study)
        if found is None or found[0] != key_id:
            with self._lock:
                self._known.pop(study, None)
            raise StudyKeyDestroyed(f"the data key of study {study} was destroyed")
        with self._lock:
            self._known[study] = (*found, now)
        return found[1]

    def studies(self) -> dict[str, datetime]:
        """Every study that has a key, with when its key was made."""
        t = study_keys
        with self.engine.connect() as conn:
            return {
                uid: _utc(made)
                for uid, made in conn.execute(select(t.c.study_instance_uid, t.c.created_at))
            }

    def has_key(self, study: str) -> bool:
        return self._read(study) is not None

    def destroy(self, study: str, actor: str) -> BackupPurge | None:
        """Delete the study's key and queue its backup purge, in one transaction; None (and
        nothing queued) when the study had no key."""
        now = datetime.now(UTC)
        due = now + timedelta(days=self.backup_purge_days)
        with self.engine.begin() as conn:
            gone = conn.execute(
                delete(study_keys).where(study_keys.c.study_instance_uid == study)
            ).rowcount
            if not gone:
                purge_id = None
            else:
                purge_id = conn.execute(
                    insert(backup_purges)
                    .values(
                        study_instance_uid=study,
                        destroyed_at=now,
                        due_at=due,
                        state=QUEUED,
                        actor=actor[:200],
                    )
                    .returning(backup_purges.c.id)
                ).scalar_one()
        with self._lock:
            self._known.pop(study, None)
        if purge_id is None:
            return None
        return BackupPurge(int(purge_id), study, now, due, QUEUED, actor)

    def backup_purges(self, state: str | None = None) -> list[BackupPurge]:
        """The backup purges (of `state` only, when given), oldest first."""
        t = backup_purges
        query = select(t).order_by(t.c.id)
        if state is not None:
            query = query.where(t.c.state == state)
        with self.engine.connect() as conn:
            return [
                BackupPurge(
                    r.id,
                    r.study_instance_uid,
                    _utc(r.destroyed_at),
                    _utc(r.due_at),
                    r.state,
                    r.actor,
                )
                for r in conn.execute(query)
            ]

    def purge_done(self, purge_id: int) -> BackupPurge:
        """Every backup that held the study was purged or has expired: the queued purge
        `purge_id` is done (NotFound when no such purge is queued)."""
        t = backup_purges
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(t)
                .where(t.c.id == purge_id, t.c.state == QUEUED)
                .values(state=DONE, done_at=datetime.now(UTC))
            ).rowcount
        if not changed:
            raise NotFound(f"no queued backup purge {purge_id}")
        (done,) = [p for p in self.backup_purges(DONE) if p.id == purge_id]
        return done

    def close(self) -> None:
        self.engine.dispose()

    def _read(self, study: str) -> tuple[bytes, bytes] | None:
        t = study_keys
        with self.engine.connect() as conn:
            row = conn.execute(
                select(t.c.key_id, t.c.data_key).where(t.c.study_instance_uid == study)
            ).first()
        return (bytes(row[0]), bytes(row[1])) if row is not None else None


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# --- the sealed format -----------------------------------------------------------------------


def study_of(key: str) -> str:
    """The Study Instance UID a blob key begins with, after the key spaces' prefixes
    (``cache/``, ``held/``, ``retained/``: names, never UIDs); InvalidUID when there is none."""
    for part in key.split("/")[:-1]:
        if part and set(part) <= _UID_CHARACTERS:
            return validate_uid(part, "StudyInstanceUID")
    return validate_uid("", "StudyInstanceUID")


_UID_CHARACTERS = set("0123456789.")


@dataclass(frozen=True)
class Header:
    key_id: bytes
    salt: bytes
    size: int  # of the plaintext
    chunk: int
    raw: bytes

    @classmethod
    def parse(cls, raw: bytes) -> Header | None:
        """The header `raw` begins with, or None for bytes that were not sealed."""
        if len(raw) < HEADER.size or not raw.startswith(MAGIC):
            return None
        _magic, key_id, salt, size, chunk = HEADER.unpack(raw[: HEADER.size])
        if chunk <= 0:
            raise SealBroken("a sealed blob's header names no chunk size")
        return cls(key_id, salt, size, chunk, raw[: HEADER.size])

    @property
    def chunks(self) -> int:
        return max(1, -(-self.size // self.chunk))

    def offset(self, index: int) -> int:
        """Where sealed chunk `index` begins."""
        return HEADER.size + index * (self.chunk + TAG)

    @property
    def sealed_size(self) -> int:
        return HEADER.size + self.size + self.chunks * TAG


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(8, "big") + (1 if last else 0).to_bytes(4, "big")


def _blob_cipher(study_key: bytes, salt: bytes) -> AESGCM:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_BLOB_KEY_INFO)
    return AESGCM(derived.derive(study_key))


def seal(key: str, key_id: bytes, study_key: bytes, data: bytes) -> list[bytes]:
    """`data` sealed for `key`: the header, then the sealed chunks."""
    digest = hashlib.sha256(data).digest()
    salt = hmac.new(study_key, b"salt\0" + key.encode() + b"\0" + digest, "sha256").digest()
    raw = HEADER.pack(MAGIC, key_id, salt, len(data), CHUNK)
    header = Header(key_id, salt, len(data), CHUNK, raw)
    cipher, aad = _blob_cipher(study_key, salt), raw + key.encode()
    view = memoryview(data)
    out = [raw]
    for index in range(header.chunks):
        piece = view[index * CHUNK : (index + 1) * CHUNK]
        out.append(cipher.encrypt(_nonce(index, index == header.chunks - 1), piece, aad))
    return out


def unseal(key: str, study_key: bytes, sealed: bytes) -> bytes:
    """The plaintext of a whole sealed blob held in memory (SealBroken when it does not
    authenticate); bytes without the header are returned as they are."""
    header = Header.parse(sealed)
    if header is None:
        return sealed
    opener = _ChunkOpener(key, header, study_key)
    return b"".join(
        opener.open(i, sealed[header.offset(i) : header.offset(i) + header.chunk + TAG])
        for i in range(header.chunks)
    )


class _ChunkOpener:
    def __init__(self, key: str, header: Header, study_key: bytes) -> None:
        self.key, self.header = key, header
        self._cipher = _blob_cipher(study_key, header.salt)
        self._aad = header.raw + key.encode()

    def open(self, index: int, sealed: bytes) -> bytes:
        last = index == self.header.chunks - 1
        expected = self.header.size - index * self.header.chunk if last else self.header.chunk
        if len(sealed) != expected + TAG:
            raise SealBroken(f"the sealed blob at {self.key} is truncated")
        try:
            return self._cipher.decrypt(_nonce(index, last), sealed, self._aad)
        except InvalidTag:
            log.error(
                "a sealed blob does not authenticate: %s (chunk %d)",
                self.key,
                index,
                extra={"event": "storage", "alert": True, "kind": "SealBroken"},
            )
            raise SealBroken(f"the sealed blob at {self.key} does not authenticate") from None


class _SealedReader(io.BufferedIOBase):
    """Plaintext bytes [start, end) of a sealed blob as a seekable stream (positions relative
    to `start`): the chunks are read from the store one after another, a seek starts a new
    ranged read at the chunk it lands in. Not an io.BufferedReader (pydicom takes one for a
    file it can open again by name); a read after `close` (pydicom's deferred reads) reads
    the chunks it needs again, as the S3 store's streams do."""

    def __init__(
        self,
        store: BlobStore,
        opener: _ChunkOpener,
        start: int,
        end: int,
        stream: BinaryIO | None = None,
    ) -> None:
        super().__init__()
        self._store, self._opener = store, opener
        self._start, self._end, self._position = start, end, start
        self._stream = stream  # positioned at the chunk `_next`
        self._next = 0
        self._plain, self._plain_index = b"", -1

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position - self._start

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.tell(), io.SEEK_END: self._end - self._start}
        self._position = self._start + max(0, base[whence] + offset)
        return self.tell()

    def read(self, size: int | None = -1) -> bytes:
        """Up to `size` bytes (all that is left when negative); fewer only at the end."""
        wanted = self._end - self._position if size is None or size < 0 else size
        parts = []
        while wanted > 0 and (piece := self._take(wanted)):
            parts.append(piece)
            wanted -= len(piece)
        return b"".join(parts)

    read1 = read

    def _take(self, limit: int) -> bytes:
        if self._position >= self._end:
            return b""
        chunk = self._opener.header.chunk
        index = self._position // chunk
        if index != self._plain_index:
            self._plain, self._plain_index = self._chunk(index), index
        within = self._position - index * chunk
        count = min(limit, len(self._plain) - within, self._end - self._position)
        self._position += count
        return self._plain[within : within + count]

    def _chunk(self, index: int) -> bytes:
        header = self._opener.header
        if self._stream is None or self._next != index:
            self._close_stream()
            last = (max(self._end, self._position + 1) - 1) // header.chunk
            end = min(header.offset(last + 1), header.sealed_size)
            self._stream = self._store.open(self._opener.key, (header.offset(index), end))
            self._next = index
        is_last = index == header.chunks - 1
        length = (header.size - index * header.chunk if is_last else header.chunk) + TAG
        sealed = _read_exactly(self._stream, length)
        self._next += 1
        return self._opener.open(index, sealed)

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def close(self) -> None:
        self._close_stream()
        super().close()


def _read_exactly(stream: BinaryIO, length: int) -> bytes:
    parts, left = [], length
    while left > 0:
        piece = stream.read(left)
        if not piece:
            break
        parts.append(piece)
        left -= len(piece)
    return b"".join(parts)


# --- the store -------------------------------------------------------------------------------


class SealedPendingBlob:
    """An object's bytes held (in memory, as they arrived) until `place` names its key, and
    so its study: sealed then, and staged and placed by the inner store."""

    def __init__(self, store: SealedBlobStore, chunks: Sequence[bytes]) -> None:
        self._store = store
        self._chunks: list[bytes] | None = [bytes(c) for c in chunks]
        self._size = sum(len(c) for c in self._chunks)
        self._sha256 = ""
        self._inner: Any = None  # the inner store's pending blob, once placed
        self._key = ""

    @property
    def size(self) -> int:
        return self._size

    def sha256(self) -> str:
        """The SHA-256 of the plaintext (the blob key's hash, as without sealing)."""
        if not self._sha256:
            assert self._chunks is not None, "the bytes went with the placing"
            digest = hashlib.sha256()
            for chunk in self._chunks:
                digest.update(chunk)
            self._sha256 = digest.hexdigest()
        return self._sha256

    def place(self, key: str) -> None:
        if self._chunks is None:
            raise ValueError("the blob was already placed or abandoned")
        chunks, self._chunks = self._chunks, None
        self._key = key
        key_id, study_key = self._store.study_keys.key_for_sealing(study_of(key))
        sealed = seal(key, key_id, study_key, b"".join(chunks))
        self._inner = self._store.inner.begin(sealed)
        self._inner.place(key)

    @property
    def key(self) -> str:
        return self._inner.key if self._inner is not None else self._key

    @property
    def relative(self) -> str:
        return self.key

    @property
    def named(self) -> bool:
        return bool(self._inner is not None and self._inner.named)

    @property
    def placement(self) -> Placement | None:
        return self._inner.placement if self._inner is not None else None

    @placement.setter
    def placement(self, value: Placement | None) -> None:
        if self._inner is not None:
            self._inner.placement = value

    def settle(self) -> None:
        if self._inner is not None:
            self._inner.settle()

    def withdraw(self) -> None:
        if self._inner is not None:
            self._inner.withdraw()

    def abandon(self) -> None:
        self._chunks = None
        if self._inner is not None:
            self._inner.abandon()


class SealedBlobStore:
    """A `BlobStore` that seals what it writes into `inner` with the study's data key from
    `study_keys` and unseals what it reads; everything else is the inner store's."""

    def __init__(self, inner: Any, study_keys: StudyKeyStore) -> None:
        self.inner = inner
        self.study_keys = study_keys
        if hasattr(inner, "reveal"):  # an S3 store compares data sets on a refused put
            inner.reveal = self.reveal

    def __getattr__(self, name: str) -> Any:  # placements, absolute, journal, relative_path...
        return getattr(self.inner, name)

    def begin(self, chunks: Sequence[bytes]) -> SealedPendingBlob:
        return SealedPendingBlob(self, chunks)

    def write(self, key: str, chunks: Sequence[bytes]) -> None:
        blob = self.begin(chunks)
        blob.place(key)
        blob.settle()

    def put_cached(self, key: str, data: bytes) -> None:
        key_id, study_key = self.study_keys.key_for_sealing(study_of(key))
        self.inner.put_cached(key, b"".join(seal(key, key_id, study_key, data)))

    def open(self, key: str, byte_range: Range | None = None) -> BinaryIO:
        if byte_range is not None and (byte_range[0] < 0 or byte_range[1] < byte_range[0]):
            raise ValueError(f"not a byte range: {byte_range}")
        whole = self.inner.open(key) if byte_range is None else None
        try:
            raw = _read_exactly(whole, HEADER.size) if whole is not None else self._head(key)
            header = Header.parse(raw)
        except BaseException:
            if whole is not None:
                whole.close()
            raise
        if header is None:  # written before sealing was turned on
            if whole is not None:
                whole.close()
            return self.inner.open(key, byte_range)
        study_key = self.study_keys.key_for_opening(study_of(key), header.key_id)
        opener = _ChunkOpener(key, header, study_key)
        start, end = byte_range if byte_range is not None else (0, header.size)
        start, end = min(start, header.size), min(end, header.size)
        return _SealedReader(self.inner, opener, start, end, whole)  # type: ignore[return-value]

    def _head(self, key: str) -> bytes:
        with self.inner.open(key, (0, HEADER.size)) as stream:
            return _read_exactly(stream, HEADER.size)

    def reveal(self, key: str, sealed: bytes) -> bytes:
        """The plaintext of sealed bytes held in memory (the S3 store's refused-put check)."""
        header = Header.parse(sealed)
        if header is None:
            return sealed
        return unseal(key, self.study_keys.key_for_opening(study_of(key), header.key_id), sealed)

    def exists(self, key: str) -> bool:
        return bool(self.inner.exists(key))

    def size(self, key: str) -> int:
        """The plaintext's size."""
        header = Header.parse(self._head(key))
        return header.size if header is not None else int(self.inner.size(key))

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def keys(self, prefix: str = "") -> Iterator[str]:
        return self.inner.keys(prefix)

    def discard_spares(self) -> None:
        """The inner store's spare files go, and the key store's connections."""
        getattr(self.inner, "discard_spares", lambda: None)()
        self.study_keys.close()

    def close(self) -> None:
        self.inner.close()
        self.study_keys.close()


def key_store_url(configured: str, data_dir: Path) -> str:
    """The key store's database: `configured`, else a SQLite file beside the index."""
    return configured or f"sqlite:///{data_dir / KEY_STORE_FILE}"


def sealed_store_builder(
    inner: Callable[[Any], Any] | None, data_dir: Path, url: str, backup_purge_days: int
) -> Callable[[Any], SealedBlobStore]:
    """What builds the archive's store from its index, sealed (``[storage] encrypt_at_rest``):
    `inner` builds the store under it (None: files under ``data_dir/blobs``); the keys are in
    the key store at `url` (`key_store_url`)."""

    def build(index: Any) -> SealedBlobStore:
        from dicomnode.archive.blobs import FileBlobStore

        under = inner(index) if inner is not None else None
        if under is None:
            under = FileBlobStore(data_dir / "blobs", data_dir / "placing")
        return SealedBlobStore(
            under, StudyKeyStore(key_store_url(url, data_dir), backup_purge_days)
        )

    return build
