"""S3-compatible object storage as a `BlobStore` (`S3BlobStore`), through obstore.

Keys are the archive's blob keys (`blobstore.blob_key`) under the configured prefix. Objects
never change: every blob is put create-only (``If-None-Match: *``), so two nodes placing one
key never overwrite each other, and the node refuses to start against a server that ignores
the condition (`S3BlobStore.verify_create_only`). A put refused because the key is taken
(412) is accepted only when the object there holds the same data set: the key carries a
64-bit prefix of the data set's SHA-256, so the full SHA-256 of the bytes (object metadata
``sha256``) is compared, then the data sets themselves (another File Meta group, same data
set, is the same object); a different object under a key raises DuplicateConflict.

Every placing is recorded in the store's `Placements` (the index database's table) before
the put; a crash between the put and the index row leaves the record for recovery, which
files or removes the object without listing the bucket. A put whose outcome is unknown (the
server failed mid-request) keeps its record too, and is withdrawn by recovery, not here.

Reads stream (`open`, with a byte range for a frame); nothing holds a whole study. Every
failure to reach the server or of a request becomes `ObjectStoreUnavailable`, a
StorageUnavailable (0xA700 / HTTP 503) that is also an OSError, in words naming no host;
the full error goes to the node's log.
"""

from __future__ import annotations

import configparser
import hashlib
import io
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import obstore
from obstore.exceptions import AlreadyExistsError, BaseError, NotFoundError
from obstore.store import S3Store

from dicomnode.archive.blobstore import (
    CACHE_PREFIX,
    SPECIAL_PREFIXES,
    Placement,
    Placements,
    Range,
    StoreUsage,
    blob_key,
    key_hash,
)
from dicomnode.archive.received import dataset_sha256s
from dicomnode.core.errors import ConfigError, DuplicateConflict, StorageUnavailable

if TYPE_CHECKING:
    from dicomnode.archive.index import Index
    from dicomnode.config import StorageSettings

log = logging.getLogger("dicomnode.archive.objectstore")

PROBE_PREFIX = CACHE_PREFIX + "probe/"  # the start-up and health probes' objects
SHA256_METADATA = "sha256"  # object metadata: the SHA-256 of the object's bytes, in hex
READ_CHUNK = 1 << 20  # the least a streaming read hands over at once
MAX_RETRIES = 3


class ObjectStoreUnavailable(StorageUnavailable, OSError):
    """The object store cannot be reached, or refused or failed a request."""


@dataclass(frozen=True)
class S3Location:
    """Where and how to reach a bucket."""

    endpoint: str  # http(s)://host:port
    bucket: str
    access_key_id: str
    secret_access_key: str
    prefix: str = ""  # keys live under it ("" or "a/b")
    region: str = "us-east-1"
    session_token: str = ""
    verify_tls: bool = True
    ca_pem: str = ""  # extra roots to trust (PEM), e.g. the hospital's CA
    timeout_seconds: float = 30.0  # one request, retries included

    def __post_init__(self) -> None:
        if not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError("storage.endpoint", "must start with http:// or https://")
        if not self.bucket:
            raise ConfigError("storage.bucket", "name the bucket the node stores its blobs in")


def read_credentials(path: Path, profile: str = "default") -> tuple[str, str, str]:
    """The access key id, secret and session token ("" if none) in an AWS-style credentials
    file (``[default]`` with ``aws_access_key_id`` and ``aws_secret_access_key``); raises
    ConfigError naming ``storage.credentials_file``."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with path.open(encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, configparser.Error, UnicodeDecodeError) as e:
        raise ConfigError("storage.credentials_file", f"cannot read {path}: {e}") from None
    if not parser.has_section(profile):
        raise ConfigError("storage.credentials_file", f"{path} has no [{profile}] section")
    values = parser[profile]
    key, secret = values.get("aws_access_key_id", ""), values.get("aws_secret_access_key", "")
    if not key.strip() or not secret.strip():
        raise ConfigError(
            "storage.credentials_file",
            f"[{profile}] in {path} needs aws_access_key_id and aws_secret_access_key",
        )
    return key.strip(), secret.strip(), values.get("aws_session_token", "").strip()


def _unavailable(error: BaseException, doing: str) -> ObjectStoreUnavailable:
    """`error` of obstore as the node answers it; logged in full here (it names the host)."""
    log.error(
        "object store failure while %s: %s: %s",
        doing,
        type(error).__name__,
        str(error).split("\n", 1)[0],
        extra={"event": "storage", "alert": True, "kind": "ObjectStoreUnavailable"},
    )
    if type(error).__name__ in ("PermissionDeniedError", "UnauthenticatedError"):
        return ObjectStoreUnavailable(
            "the object store refused the node's credentials; try again later"
        )
    return ObjectStoreUnavailable(f"the object store failed {doing}; try again later")


class PendingObject:
    """An object's bytes held for a put (`S3BlobStore.begin`): no local file."""

    def __init__(self, store: S3BlobStore, data: bytes) -> None:
        self._store = store
        self._data: bytes | None = data
        self._size = len(data)
        self._sha256 = ""
        self._placed = False
        self._unsure = False  # the put failed in a way that may have stored the object
        self.key = ""
        self.named = False
        self.placement: Placement | None = None

    @property
    def size(self) -> int:
        return self._size

    def sha256(self) -> str:
        if not self._sha256:
            assert self._data is not None, "the bytes went with the put"
            self._sha256 = hashlib.sha256(self._data).hexdigest()
        return self._sha256

    def place(self, key: str) -> None:
        """Record the placing, then put the bytes at `key` create-only; a 412 is accepted when
        the object there is the same (DuplicateConflict otherwise); raises
        ObjectStoreUnavailable when the server fails."""
        if self._placed:
            raise ValueError("the blob was already placed or abandoned")
        self._placed = True
        self.key = key
        data, self._data = self._data, None
        assert data is not None
        digest = self._sha256 or hashlib.sha256(data).hexdigest()
        self._sha256 = digest
        self.placement = self._store.placements.record(key)
        try:
            self._store.put_new(key, data, digest)
            self.named = True
        except AlreadyExistsError:
            if not self._store.holds_same(key, data, digest):
                placement, self.placement = self.placement, None
                self._store.placements.forget(placement)
                raise DuplicateConflict(
                    "a different object is stored under this SOP Instance UID with the same "
                    "content hash prefix"
                ) from None
        except BaseError as e:
            self._unsure = True
            raise _unavailable(e, "a write") from None

    def settle(self) -> None:
        placement, self.placement = self.placement, None
        if placement is not None:
            self._store.placements.settle([placement])

    def withdraw(self) -> None:
        """Mark the record withdrawn, remove the object when this placing created it and no
        other counts on it, then forget the record; when the removal fails (the server is
        down) the withdrawn record stays, and recovery removes the object. After a failed put
        that may have stored the object, the record is left as it is: an identical object
        placed by someone else may be what the key holds, and recovery judges it."""
        placement, self.placement = self.placement, None
        if placement is None or self._unsure:
            return
        if self._store.placements.withdraw(placement) and self.named:
            self._store.delete(self.key)  # raises: the withdrawn record stays
        self._store.placements.forget(placement)

    def abandon(self) -> None:
        self._placed = True
        self._data = None


class _ObjectReader(io.BufferedIOBase):
    """An object's bytes [start, end) as a seekable stream: read chunk by chunk from one GET;
    a seek drops it, and the next read asks for the rest of the range from the new place.
    Not an io.BufferedReader: pydicom takes one for a file it can open again by name; for
    any other stream its deferred reads seek back into it, also once its reader closed it,
    so a read after `close` fetches just the bytes asked for (as a file opened again would)."""

    def __init__(self, get: Callable[[int, int], Any], start: int, end: int, first: Any) -> None:
        super().__init__()
        self._get = get  # (start, end) -> a GET's result
        self._start, self._end, self._position = start, end, start
        self._chunks: Iterator[Any] | None = iter(first.stream(min_chunk_size=READ_CHUNK))
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position - self._start

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.tell(), io.SEEK_END: self._end - self._start}
        target = self._start + max(0, base[whence] + offset)
        if target != self._position:
            self._position, self._chunks, self._pending = target, None, memoryview(b"")
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
        """Up to `limit` bytes of the chunk at hand, fetching the next one when it is used up;
        b"" at the end."""
        if self.closed:  # a deferred read (pydicom): fetch just these bytes, keep nothing open
            return self._fetch(limit)
        while not self._pending:
            if self._position >= self._end:
                return b""
            try:
                if self._chunks is None:
                    result = self._get(self._position, self._end)
                    self._chunks = iter(result.stream(min_chunk_size=READ_CHUNK))
                self._pending = memoryview(next(self._chunks)).cast("B")
            except StopIteration:
                self._chunks = None
                return b""
            except BaseError as e:
                self._chunks = None
                raise _unavailable(e, "a read") from None
        piece = bytes(self._pending[:limit])
        self._pending = self._pending[limit:]
        self._position += len(piece)
        return piece

    def _fetch(self, limit: int) -> bytes:
        if self._position >= self._end:
            return b""
        try:
            result = self._get(self._position, min(self._end, self._position + limit))
            piece = bytes(result.bytes())
        except BaseError as e:
            raise _unavailable(e, "a read") from None
        self._position += len(piece)
        return piece

    def close(self) -> None:
        self._chunks = None
        self._pending = memoryview(b"")
        super().close()


class S3BlobStore:
    """Blobs as objects in one bucket of an S3-compatible server. `placements` records every
    placing (the archive gives it the index database's table)."""

    # The object a stored body holds, for comparing data sets on a refused put: the bytes
    # themselves, unless a wrapper seals them (`dicomnode.archive.sealed` sets it to unseal).
    reveal: Callable[[str, bytes], bytes] = staticmethod(lambda _key, data: data)

    def __init__(self, location: S3Location, placements: Placements | None = None) -> None:
        self.location = location
        self.placements: Placements = placements  # type: ignore[assignment]  # set before use
        retry = timedelta(seconds=location.timeout_seconds)
        client: dict[str, Any] = {
            "allow_http": location.endpoint.startswith("http://"),
            "timeout": f"{max(1, int(location.timeout_seconds))}s",
            "connect_timeout": f"{max(1, min(5, int(location.timeout_seconds)))}s",
            "allow_invalid_certificates": not location.verify_tls,
        }
        if location.ca_pem:
            client["root_certificate"] = location.ca_pem
        credentials: dict[str, Any] = {
            "access_key_id": location.access_key_id,
            "secret_access_key": location.secret_access_key,
        }
        if location.session_token:
            credentials["session_token"] = location.session_token
        self._store = S3Store(
            location.bucket,
            prefix=location.prefix.strip("/") or None,
            endpoint=location.endpoint,
            region=location.region,
            virtual_hosted_style_request=False,
            client_options=client,
            retry_config={
                "max_retries": MAX_RETRIES,
                "backoff": {
                    "init_backoff": timedelta(milliseconds=100),
                    "max_backoff": timedelta(seconds=1),
                    "base": 2,
                },
                "retry_timeout": retry,
            },
            **credentials,
        )
        self._probe_name = f"{socket.gethostname()}-{os.getpid()}"

    # --- writing ----------------------------------------------------------------------------

    def begin(self, chunks: Sequence[bytes]) -> PendingObject:
        """Hold `chunks` for a put (they are in memory already; nothing is staged locally)."""
        if len(chunks) == 1 and isinstance(chunks[0], bytes):
            return PendingObject(self, chunks[0])
        return PendingObject(self, b"".join(chunks))

    def write(self, key: str, chunks: Sequence[bytes]) -> None:
        blob = self.begin(chunks)
        blob.place(key)
        blob.settle()

    def put_new(self, key: str, data: bytes, sha256: str) -> None:
        """Put `data` at `key` unless an object is there (AlreadyExistsError); one request
        (no multipart upload: its completion may not honour the condition on every server)."""
        obstore.put(
            self._store,
            key,
            data,
            mode="create",
            use_multipart=False,
            attributes={"Content-Type": "application/dicom", SHA256_METADATA: sha256},
        )

    def holds_same(self, key: str, data: bytes, sha256: str) -> bool:
        """Whether the object at `key` is the object `data` (its bytes, or its data set when
        the key names one's hash: a File Meta group may differ between two senders)."""
        try:
            head = obstore.get(self._store, key, options={"head": True})
            if head.attributes.get(SHA256_METADATA) == sha256:
                return True
            with self.open(key) as stream:  # one object, written by someone else
                existing = stream.read()
        except FileNotFoundError:
            raise ObjectStoreUnavailable(
                "the object store refused a write to a key that then held nothing; try again"
            ) from None
        except BaseError as e:
            raise _unavailable(e, "a read") from None
        if existing == data:
            return True
        if not _names_a_hash(key):
            return False
        try:
            stored, placing = self.reveal(key, existing), self.reveal(key, data)
            return bool(dataset_sha256s(stored) & dataset_sha256s(placing))
        except Exception:  # not DICOM with a File Meta group: pydicom's errors vary
            return False

    def put_cached(self, key: str, data: bytes) -> None:
        """Store re-derivable `data` at `key`, replacing what is there."""
        try:
            obstore.put(self._store, key, data, use_multipart=False)
        except BaseError as e:
            raise _unavailable(e, "a write") from None

    # --- reading ----------------------------------------------------------------------------

    def open(self, key: str, byte_range: Range | None = None) -> BinaryIO:
        """A stream of the object at `key` (or of bytes [start, end) of it); the body is read
        as the caller reads, never held whole."""
        if byte_range is not None:
            start, end = byte_range
            if start < 0 or end < start:
                raise ValueError(f"not a byte range: {byte_range}")
            if end == start:
                return io.BytesIO(b"")  # type: ignore[return-value]

        def get(start: int, end: int | None) -> Any:
            ranged = {"range": (start, end)} if end is not None else None
            return obstore.get(self._store, key, options=ranged)

        try:
            first = get(*byte_range) if byte_range is not None else get(0, None)
        except (FileNotFoundError, NotFoundError):
            raise FileNotFoundError(f"no blob at {key}") from None
        except BaseError as e:
            raise _unavailable(e, "a read") from None
        start, end = first.range  # a range past the end is cut short, as a file's read is
        return _ObjectReader(get, start, end, first)  # type: ignore[return-value]

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        try:
            return int(obstore.head(self._store, key)["size"])
        except (FileNotFoundError, NotFoundError):
            raise FileNotFoundError(f"no blob at {key}") from None
        except BaseError as e:
            raise _unavailable(e, "a read") from None

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every blob key under `prefix` (whole path segments); without one, the archive's
        blobs only. A bucket listing: for `archive check`, never for recovery."""
        try:
            for batch in obstore.list(self._store, prefix or None, chunk_size=1000):
                for meta in batch:
                    key = meta["path"]
                    if prefix or not key.startswith(SPECIAL_PREFIXES):
                        yield key
        except BaseError as e:
            raise _unavailable(e, "a listing") from None

    # --- removing ---------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        """Remove the object at `key` and its cached data; nothing there is no error."""
        doomed = [key]
        if not key.startswith(CACHE_PREFIX):
            doomed += self._cached_of(key)
        try:
            obstore.delete(self._store, doomed)
        except (FileNotFoundError, NotFoundError):
            return
        except BaseError as e:
            raise _unavailable(e, "a deletion") from None

    def _cached_of(self, key: str) -> list[str]:
        """The cached data of blob `key` (``cache/<key>.<kind>``): its folder's listing."""
        folder, _, name = (CACHE_PREFIX + key).rpartition("/")
        try:
            return [
                meta["path"]
                for batch in obstore.list(self._store, folder, chunk_size=1000)
                for meta in batch
                if meta["path"].rpartition("/")[2].startswith(name + ".")
            ]
        except BaseError as e:
            raise _unavailable(e, "a listing") from None

    # --- the store itself -------------------------------------------------------------------

    def usage(self) -> StoreUsage:
        """A bucket has no free space to report; the index knows the bytes stored."""
        return StoreUsage(free_bytes=None, used_bytes=None)

    def check(self) -> None:
        """Raise ObjectStoreUnavailable unless an object can be written now."""
        self.put_cached(PROBE_PREFIX + self._probe_name, b"ok")

    def verify_create_only(self) -> None:
        """Put one new probe key twice, create-only: the second put must be refused (412).
        A server that stores it again ignores ``If-None-Match: *``, so two nodes could
        overwrite each other's objects: raise ConfigError (the node refuses to start)."""
        probe = f"{PROBE_PREFIX}create-only-{uuid.uuid4().hex}"
        try:
            obstore.put(self._store, probe, b"first", mode="create", use_multipart=False)
            try:
                obstore.put(self._store, probe, b"second", mode="create", use_multipart=False)
            except AlreadyExistsError:
                return
        except BaseError as e:
            raise _unavailable(e, "the start-up check") from None
        finally:
            try:
                obstore.delete(self._store, probe)
            except (BaseError, FileNotFoundError):
                log.warning("could not remove the probe object %s", probe)
        raise ConfigError(
            "storage.endpoint",
            "the object store accepted a second create-only put of one key (it ignores "
            "If-None-Match: *), so nodes could overwrite each other's objects; the node does "
            "not run on it (SeaweedFS, MinIO and AWS S3 honour it)",
        )

    def recover(self) -> int:
        """Nothing is staged locally: nothing to discard."""
        return 0

    def prepare_spare(self) -> None:
        """Nothing to prepare for a put; nothing held open to close (`close`), no spare files
        to discard (`discard_spares`, a filesystem store's name the archive still calls)."""

    close = discard_spares = prepare_spare
    discard_partial_writes = recover  # the filesystem store's names the archive still calls
    relative_path = staticmethod(blob_key)


def _names_a_hash(key: str) -> bool:
    try:
        named = key_hash(key)
    except IndexError:
        return False
    return len(named) == 16 and set(named) <= set("0123456789abcdef")


def location_from_files(
    endpoint: str,
    bucket: str,
    credentials_file: Path,
    *,
    prefix: str = "",
    region: str = "us-east-1",
    verify_tls: bool = True,
    ca_file: Path | None = None,
    timeout_seconds: float = 30.0,
) -> S3Location:
    """An S3Location whose secrets come from files (credentials, CA), as settings name them."""
    key, secret, token = read_credentials(credentials_file)
    ca_pem = ""
    if ca_file is not None:
        try:
            ca_pem = ca_file.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError("storage.ca_file", f"cannot read {ca_file}: {e}") from None
    return S3Location(
        endpoint=endpoint,
        bucket=bucket,
        access_key_id=key,
        secret_access_key=secret,
        session_token=token,
        prefix=prefix,
        region=region,
        verify_tls=verify_tls,
        ca_pem=ca_pem,
        timeout_seconds=timeout_seconds,
    )


def open_s3_store(location: S3Location, placements: Placements | None = None) -> S3BlobStore:
    """An S3BlobStore whose server was checked to enforce create-only puts (ConfigError
    otherwise; ObjectStoreUnavailable when it cannot be reached)."""
    store = S3BlobStore(location, placements)
    store.verify_create_only()
    return store


def node_identity(name: str, data_dir: Path) -> str:
    """Whose placings a node's recovery judges: ``[node] name`` when set, else the host's name
    and its data folder (two nodes on one host, as tests run them, must not judge each other's
    placings in flight; one restarted on the same folder is the same node)."""
    if name:
        return name[:160]
    folder = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    return f"{socket.gethostname()[:140]}:{folder}"


def blob_store_from_settings(
    storage: StorageSettings, node_name: str, data_dir: Path
) -> Callable[[Index], S3BlobStore] | None:
    """For ``[storage] backend = "s3"``: what builds the archive's store from its index (the
    placements are rows of the index database, under `node_identity`); None for the
    filesystem. The credentials (and CA) files are read now, so a bad one is a
    ConfigError before anything starts; the server is checked when the store is built."""
    if storage.backend != "s3":
        return None
    if storage.credentials_file is None:
        raise ConfigError("storage.credentials_file", 'is needed with backend = "s3"')
    location = location_from_files(
        storage.endpoint,
        storage.bucket,
        storage.credentials_file,
        prefix=storage.prefix,
        region=storage.region,
        verify_tls=storage.tls_verify,
        ca_file=storage.ca_file,
        timeout_seconds=storage.timeout_seconds,
    )

    identity = node_identity(node_name, data_dir)

    def build(index: Index) -> S3BlobStore:
        from dicomnode.archive.placements import DatabasePlacements

        return open_s3_store(location, DatabasePlacements(index, identity))

    return build
