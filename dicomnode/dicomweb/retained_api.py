"""``/governance/api/retained``: data retained only by law (PIPA 21(3), checklist item 33),
for the ``governance.legal`` scope alone (the DPO, legal counsel): no other token reaches it,
whatever its scopes. Every read states a `reason` (query parameter) and is a ledger entry
(operation ``legal-access``), made by `Egress.retrieve_retained`."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from dicomnode.core.errors import InvalidInput
from dicomnode.core.uids import validate_uid
from dicomnode.dicomweb import media
from dicomnode.dicomweb.access import requester, require_token, services
from dicomnode.governance.retained_access import LEGAL_SCOPE

SCOPES = {"GET": LEGAL_SCOPE, "HEAD": LEGAL_SCOPE, "POST": LEGAL_SCOPE, "DELETE": LEGAL_SCOPE}


def _reason() -> str:
    reason = request.args.get("reason", "").strip()
    if not reason:
        raise InvalidInput("a read of data retained by law states its reason (?reason=...)")
    return reason


def retained_blueprint() -> Blueprint:
    bp = Blueprint("retained", __name__)
    require_token(bp, SCOPES)

    @bp.get("")
    def studies() -> Any:
        """The studies retained by law: what, the legal basis, until when, and why."""
        return jsonify([s.as_dict() for s in services().egress.retained_studies()])

    @bp.get("/<study>")
    def study(study: str) -> Any:
        """A retained study's instances (a legal-access read, ledgered)."""
        study = validate_uid(study, "StudyInstanceUID")
        instances = services().egress.retrieve_retained(study, requester(), _reason())
        return jsonify(
            {
                "study_instance_uid": study,
                "instances": [
                    {
                        "sop_instance_uid": i.sop_instance_uid,
                        "series_instance_uid": i.series_instance_uid,
                        "sop_class_uid": i.sop_class_uid,
                    }
                    for i in instances
                ],
            }
        )

    @bp.get("/<study>/instances/<sop>")
    def instance(study: str, sop: str) -> Response:
        """One instance of a retained study, as stored (a legal-access read, ledgered)."""
        study = validate_uid(study, "StudyInstanceUID")
        sop = validate_uid(sop, "SOPInstanceUID")
        egress = services().egress
        (found,) = egress.retrieve_retained(study, requester(), _reason(), sop)
        with egress.open_blob(found) as stream:
            data = stream.read()
        return Response(data, mimetype=media.DICOM)

    return bp
