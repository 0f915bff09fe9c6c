"""The node's error types.

Each error says what was wrong in words a hospital's IT staff can act on. The services
(`scp`, `dicomweb`) map these classes to DICOM statuses and HTTP codes in one place each.
"""


class DicomnodeError(Exception):
    """Base class of every error the node raises on purpose."""


class InvalidInput(DicomnodeError):
    """The object or request is malformed: it cannot be parsed or lacks what it must have."""


class InvalidUID(InvalidInput):
    """A UID is not in valid form (digits and dots, at most 64 characters)."""

    def __init__(self, field: str, value: object) -> None:
        self.field = field
        self.value = value
        super().__init__(f"{field} is not a valid UID: {value!r}")


class MissingAttribute(InvalidInput):
    """A required attribute is absent or empty."""

    def __init__(self, keyword: str) -> None:
        self.keyword = keyword
        super().__init__(f"required attribute {keyword} is missing or empty")


class DatasetMismatch(InvalidInput):
    """The data set contradicts its own command (e.g. SOP Instance UID differs)."""


class DuplicateConflict(DicomnodeError):
    """A different object arrived under a SOP Instance UID that is already stored."""


class NotFound(DicomnodeError):
    """The requested study, series or instance is not in the archive."""


class NotPermitted(DicomnodeError):
    """The caller may not use this service."""


class UnknownDestination(DicomnodeError):
    """A C-MOVE destination AE title is not a configured peer."""


class StorageUnavailable(DicomnodeError):
    """The archive cannot store right now (disk, database)."""


class QuotaExceeded(StorageUnavailable):
    """The archive is at its disk quota (or the disk is nearly full): new data is refused, and
    nothing stored is deleted to make room."""


class DiskFull(StorageUnavailable):
    """The disk holding the blobs or the index has no space left (ENOSPC, EDQUOT)."""


class IndexUnavailable(StorageUnavailable):
    """The index database cannot be reached or written (down, busy, read-only, full)."""


class TooLarge(InvalidInput):
    """The object exceeds a size bound of the node (e.g. a deflated data set that inflates
    past ``[limits] max_inflated_bytes``): the object's fault, so a retry cannot succeed."""


_DISK_FULL_ERRNOS = {28, 122}  # ENOSPC, EDQUOT
_READ_ONLY_ERRNOS = {30}  # EROFS
_IO_ERRNOS = {5}  # EIO
# What the database drivers' messages say, in words that name no host, path or statement.
_DATABASE_FAILURES = (
    ("database or disk is full", DiskFull, "the index database's disk is full"),
    ("disk i/o error", IndexUnavailable, "the index database's disk failed a read or write"),
    ("readonly database", IndexUnavailable, "the index database is read-only"),
    ("read-only", IndexUnavailable, "the index database is read-only"),
    (
        "database is locked",
        IndexUnavailable,
        "the index database stayed locked by another writer past its timeout",
    ),
    ("no space left", DiskFull, "the index database's disk is full"),
)
_DATABASE_ERROR_NAMES = {
    "OperationalError", "InterfaceError", "DisconnectionError", "TimeoutError",
    "InternalError", "DatabaseError",
}  # fmt: skip


def storage_failure(error: BaseException) -> StorageUnavailable | None:
    """`error` as the StorageUnavailable a caller is answered with, when it is a failure of
    the disk or of the index database (a driver's or SQLAlchemy's error, by class name, so
    that this pure module imports neither); None for anything else. The message names what
    failed, never a host, a path or an SQL statement (those go to the node's log)."""
    if isinstance(error, StorageUnavailable):
        return error
    if isinstance(error, DicomnodeError):
        return None
    if isinstance(error, OSError):
        if error.errno in _DISK_FULL_ERRNOS:
            return DiskFull("the disk holding the archive is full; try again later")
        if error.errno in _READ_ONLY_ERRNOS:
            return StorageUnavailable("the archive's disk is read-only; try again later")
        if error.errno in _IO_ERRNOS:
            return StorageUnavailable("the archive's disk failed a read or write; try again later")
        return None
    names = {cls.__name__ for cls in type(error).__mro__}
    if not names & _DATABASE_ERROR_NAMES:
        return None
    if "IntegrityError" in names or "ProgrammingError" in names or "DataError" in names:
        return None  # the request's fault or the node's, not the storage's
    text = str(getattr(error, "orig", None) or error).lower()
    for words, kind, message in _DATABASE_FAILURES:
        if words in text:
            return kind(message + "; try again later")
    return IndexUnavailable("the index database cannot be reached; try again later")


class ConfigError(DicomnodeError):
    """A configuration value is wrong. `key` names it, e.g. ``dimse.port``."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")
