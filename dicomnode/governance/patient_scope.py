"""Tokens bound to one patient (SMART-style ``patient/...`` scopes; checklist item 40).

A token carrying a ``patient/*.read`` (or ``patient/ImagingStudy.read``; SMART v2 ``.rs``)
scope, or a ``patient`` claim, speaks for one person only: its ``patient`` claim names the
Patient ID (a string, or an object ``{"id": ..., "issuer": ...}``; a separate
``patient_issuer`` claim may name the issuer). Such a token grants nothing but reading that
patient's studies: every QIDO answer is cut to rows whose Patient ID and issuer equal the
claim exactly (a claim ``A*`` is the patient ``A*``, never a pattern), and a WADO retrieval
of any other study is refused. A claim without an issuer binds to records that carry none.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

from dicomnode.core.model import PatientIdentity, Query

PATIENT_READ = "patient/*.read"  # the one scope every patient-read scope is read as
_PATIENT_READ_SCOPE = re.compile(r"patient/(\*|ImagingStudy)\.(read|rs|r|s)")
PERSON_FILTERS = ("PatientID", "IssuerOfPatientID")


class PatientClaimError(ValueError):
    """A token's patient claim cannot be used."""


def is_patient_scope(scope: str) -> bool:
    """Whether `scope` is a SMART patient-context scope (any resource, any access)."""
    return scope.startswith("patient/")


def patient_read_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """What a patient-bound token is granted: PATIENT_READ when one of `scopes` reads
    imaging studies in patient context (or is ``dicomweb.read``), and nothing else (no
    write, no delete, no other room)."""
    return frozenset(
        PATIENT_READ for s in scopes if _PATIENT_READ_SCOPE.fullmatch(s) or s == "dicomweb.read"
    )


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 64:
        raise PatientClaimError(f"the token's {name} must be a non-empty string of at most 64")
    return value.strip()


def binding(claims: dict[str, Any], scopes: Iterable[str]) -> PatientIdentity | None:
    """The one patient a verified token's `claims` bind it to, None when the token is not
    patient-bound; PatientClaimError when it has patient scopes but no usable claim."""
    scoped = any(is_patient_scope(s) for s in scopes)
    claim = claims.get("patient")
    if claim is None:
        if scoped:
            raise PatientClaimError("a token with patient/ scopes needs a patient claim")
        return None
    issuer: Any = claims.get("patient_issuer")
    if isinstance(claim, dict):
        patient_id = _text(claim.get("id"), "patient.id")
        issuer = claim.get("issuer", issuer)
    else:
        patient_id = _text(claim, "patient claim")
    issuer = None if issuer in (None, "") else _text(issuer, "patient issuer")
    return PatientIdentity(patient_id, issuer)


def admits(identity: PatientIdentity, patient_id: Any, issuer: Any) -> bool:
    """Whether a record with `patient_id` and `issuer` is the bound patient's, exactly
    (an issuer the claim does not name must be absent from the record)."""
    return patient_id == identity.patient_id and (issuer or "") == (identity.issuer or "")


def _wildcard_admits(pattern: str, value: str) -> bool:
    """Whether a DICOM single-value/wildcard/list match key `pattern` matches `value`."""
    for item in pattern.split("\\"):
        if item in ("", "*"):
            return True
        regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in item)
        if re.fullmatch(regex, value, re.DOTALL):
            return True
    return False


def bound_query(query: Query, identity: PatientIdentity) -> Query | None:
    """`query` narrowed to the bound patient: None when the requester's own Patient ID or
    issuer keys exclude that patient (the answer is empty), else the query with the person
    keys set to the claim and returned (the rows are then cut with `admits`, exactly)."""
    asked = dict(query.filters)
    wanted = {"PatientID": identity.patient_id, "IssuerOfPatientID": identity.issuer or ""}
    for keyword, value in wanted.items():
        if keyword in asked and not _wildcard_admits(asked[keyword], value):
            return None
    filters = {k: v for k, v in asked.items() if k not in PERSON_FILTERS}
    filters["PatientID"] = identity.patient_id
    if identity.issuer:
        filters["IssuerOfPatientID"] = identity.issuer
    returned = tuple(dict.fromkeys(query.return_keys + PERSON_FILTERS))
    return dataclasses.replace(query, filters=tuple(sorted(filters.items())), return_keys=returned)


def retrieval_keys(identity: PatientIdentity) -> tuple[tuple[str, str], ...]:
    """The exact person keys a retrieval for a bound token adds to its selection."""
    return (("PatientID", identity.patient_id), ("IssuerOfPatientID", identity.issuer or ""))
