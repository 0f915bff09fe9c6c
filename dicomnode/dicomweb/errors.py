"""The one place that maps errors to HTTP status codes, with a JSON body saying what was wrong."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from dicomnode.core.errors import (
    DicomnodeError,
    DuplicateConflict,
    InvalidInput,
    NotFound,
    NotPermitted,
    StorageUnavailable,
    storage_failure,
)
from dicomnode.dicomweb.auth import AuthError, ScopeError
from dicomnode.dicomweb.multipart import PartTooLarge
from dicomnode.oversight.approvals import ApprovalPending

log = logging.getLogger("dicomnode.http")


class NotAcceptable(DicomnodeError):
    """No representation the client accepts can be produced (HTTP 406)."""


class UnsupportedMediaType(DicomnodeError):
    """The request body's media type is not one the node takes (HTTP 415)."""


# (error class, HTTP status), most specific first; the first match wins.
HTTP_STATUS_BY_ERROR: tuple[tuple[type[BaseException], int], ...] = (
    (AuthError, 401),
    (ScopeError, 403),
    (ApprovalPending, 202),  # four-eyes: accepted as a request a second person decides
    (NotPermitted, 403),
    (NotFound, 404),
    (NotAcceptable, 406),
    (DuplicateConflict, 409),
    (PartTooLarge, 413),
    (UnsupportedMediaType, 415),
    (InvalidInput, 400),
    (StorageUnavailable, 503),
)


def http_status_for(error: BaseException) -> int:
    for error_class, status in HTTP_STATUS_BY_ERROR:
        if isinstance(error, error_class):
            return status
    return 500


RETRY_AFTER_SECONDS = 30  # what a 503 (storage or index failing) asks clients to wait


def error_response(error: BaseException) -> Response:
    status = http_status_for(error)
    body = {"error": type(error).__name__, "detail": str(error), "status": status}
    if isinstance(error, ApprovalPending):
        body["pending_request"] = error.request.id
    response = jsonify(body)
    response.status_code = status
    if isinstance(error, ApprovalPending):
        response.headers["Location"] = f"/governance/approvals/{error.request.id}"
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    if status == 401:
        detail = str(error).replace('"', "'")
        response.headers["WWW-Authenticate"] = (
            f'Bearer realm="dicomnode", error="invalid_token", error_description="{detail}"'
        )
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(DicomnodeError)
    @app.errorhandler(AuthError)
    @app.errorhandler(ScopeError)
    def known(error: Exception) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    def http(error: HTTPException) -> Response:
        response = jsonify({"error": error.name, "detail": error.description, "status": error.code})
        response.status_code = error.code or 500
        return response

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        failure = storage_failure(error)  # the index or the disk failing: 503, not 500
        if failure is not None:
            log.error("storage failure: %s", error, extra={"event": "storage", "alert": True})
            return error_response(failure)
        log.exception("request failed unexpectedly")
        detail = "the node failed to process the request; its log has the details"
        response = jsonify({"error": "InternalError", "detail": detail, "status": 500})
        response.status_code = 500
        return response
