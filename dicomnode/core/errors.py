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


class ConfigError(DicomnodeError):
    """A configuration value is wrong. `key` names it, e.g. ``dimse.port``."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")
