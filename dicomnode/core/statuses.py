"""The one table from the node's errors to DICOM status codes (PS3.4 Annex B and C, PS3.7 C).

DIMSE answers carry these codes as Status; STOW-RS answers carry them as FailureReason.
"""

from __future__ import annotations

from dicomnode.core.errors import (
    DatasetMismatch,
    DuplicateConflict,
    InvalidInput,
    NotFound,
    NotPermitted,
    StorageUnavailable,
    UnknownDestination,
    storage_failure,
)

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
REFUSED_NOT_AUTHORIZED = 0x0124  # PS3.7 C general status
DUPLICATE_SOP_INSTANCE = 0x0111
OUT_OF_RESOURCES = 0xA700
MOVE_DESTINATION_UNKNOWN = 0xA801
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
UNABLE_TO_PROCESS = 0xC001

# (error class, status), most specific first; the first match wins.
_STATUS_BY_ERROR: tuple[tuple[type[BaseException], int], ...] = (
    (UnknownDestination, MOVE_DESTINATION_UNKNOWN),
    (NotPermitted, REFUSED_NOT_AUTHORIZED),
    (DuplicateConflict, DUPLICATE_SOP_INSTANCE),
    (DatasetMismatch, DOES_NOT_MATCH_SOP_CLASS),
    (InvalidInput, CANNOT_UNDERSTAND),
    (NotFound, UNABLE_TO_PROCESS),
    (StorageUnavailable, OUT_OF_RESOURCES),
)


def status_for(error: BaseException) -> int:
    """The DICOM status for `error`. A failure of the disk or the index database, also one
    not yet turned into StorageUnavailable, is 0xA700 (out of resources: senders try again
    later); an object too large to take (TooLarge) is 0xC000 (cannot understand: a retry
    cannot succeed); any other unexpected error is 0xC001 (unable to process)."""
    error = storage_failure(error) or error
    for error_class, status in _STATUS_BY_ERROR:
        if isinstance(error, error_class):
            return status
    return UNABLE_TO_PROCESS
