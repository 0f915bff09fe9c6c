"""DIMSE status data sets for the node's errors; the codes come from `core.statuses`."""

from __future__ import annotations

from pydicom.dataset import Dataset

from dicomnode.core.errors import DicomnodeError, storage_failure
from dicomnode.core.statuses import (  # noqa: F401  (re-exported for the handlers)
    CANCEL,
    MOVE_DESTINATION_UNKNOWN,
    PENDING,
    SUCCESS,
    status_for,
)


def failure(error: BaseException) -> Dataset:
    """A status data set for `error`, with its message as the Error Comment (LO, 64 chars):
    the node's own words only, never an unexpected error's text (a path, a host, SQL)."""
    error = storage_failure(error) or error
    status = Dataset()
    status.Status = status_for(error)
    if isinstance(error, DicomnodeError):
        status.ErrorComment = str(error)[:64] or type(error).__name__
    else:
        status.ErrorComment = "the node failed to process the request"
    return status
