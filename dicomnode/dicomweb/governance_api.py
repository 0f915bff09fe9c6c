"""The governance JSON API under ``/governance/api`` (scopes ``governance.read`` for GET,
``governance.admin`` for changes): the policy in force and scheduled, the consent registry,
shares to recipients, deliveries, objects held at intake, restrictions, and the ledger.

Every change goes through `Stewardship`, `Intake` or `Egress`, exactly as the CLI does."""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from dicomnode.core.errors import InvalidInput, NotFound
from dicomnode.core.times import parse_moment
from dicomnode.core.uids import validate_uid
from dicomnode.dicomweb.access import (
    GOVERNANCE_SCOPE_BY_METHOD,
    requester,
    require_token,
    services,
)
from dicomnode.governance import deid
from dicomnode.stewardship import checkpoint_signed_by


def _body() -> dict[str, Any]:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise InvalidInput("the request body must be a JSON object")
    return data


def _text(data: dict[str, Any], key: str, required: bool = True) -> str:
    value = data.get(key, "")
    if not isinstance(value, str) or (required and not value.strip()):
        raise InvalidInput(f"{key!r} must be a non-empty string")
    return value.strip()


def _recipients(data: dict[str, Any]) -> list[str]:
    """The recipients a consent names: a list of recipient ids (absent: any recipient)."""
    value = data.get("recipients", [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput("'recipients' must be a list of recipient ids")
    if len(value) > 100:
        raise InvalidInput("'recipients': at most 100")
    return value


def _moment(data: dict[str, Any], key: str) -> datetime | None:
    value = data.get(key)
    if value in (None, ""):
        return None
    try:
        return parse_moment(str(value))
    except ValueError:
        raise InvalidInput(f"{key!r} must be an ISO 8601 date or date-time") from None


def _who() -> str:
    return requester().caller or "api"


def _policy_json() -> dict[str, Any]:
    status = services().stewardship.policy_status()
    policy = status.in_force
    return {
        "in_force": {
            "version": policy.version,
            "since": status.in_force_since.isoformat() if status.in_force_since else None,
            "embedded": status.in_force_since is None,
            "controller": policy.controller,
            "summary": policy.summary,
            "rules": [
                {
                    "id": r.id,
                    "effect": r.effect,
                    "activity": r.activity,
                    "recipients": list(r.recipients),
                    "basis": r.lawful_basis,
                    "consent_required": r.consent_required,
                    "deid_profile": r.deid_profile,
                }
                for r in policy.rules
            ],
        },
        "scheduled": [
            {
                "version": p.version,
                "published_at": p.published_at.isoformat(),
                "effective_at": p.effective_at.isoformat(),
                "material": p.material,
            }
            for p in status.scheduled
        ],
        "published": [
            {
                "version": p.version,
                "sha256": p.sha256,
                "published_at": p.published_at.isoformat(),
                "effective_at": p.effective_at.isoformat(),
                "material": p.material,
                "published_by": p.published_by,
            }
            for p in status.published
        ],
    }


def governance_blueprint() -> Blueprint:
    bp = Blueprint("governance", __name__)
    require_token(bp, GOVERNANCE_SCOPE_BY_METHOD)
    for install in (_policy_routes, _subject_routes, _register_routes, _ledger_routes):
        install(bp)
    return bp


def _policy_routes(bp: Blueprint) -> None:
    """The policy in force and scheduled, publishing one, de-identification statements."""

    @bp.get("/policy")
    def policy() -> Response:
        return jsonify(_policy_json())

    @bp.post("/policy")
    def publish() -> tuple[Response, int]:
        source = request.get_data(as_text=True)
        if not source.strip():
            raise InvalidInput("POST the policy's TOML text as the body")
        try:
            published, new = services().stewardship.publish_policy(
                source, _who(), reason=request.args.get("reason", "")
            )
        except ValueError as e:  # PolicyError
            raise InvalidInput(str(e)) from None
        return jsonify(
            {
                "version": published.version,
                "effective_at": published.effective_at.isoformat(),
                "new": new,
            }
        ), (201 if new else 200)

    @bp.get("/deid/<profile_id>")
    def deid_statement(profile_id: str) -> Response:
        """The PS3.15 E.1.3 conformance statement of a profile of the policy in force."""
        rule = services().stewardship.policy_status().in_force.deid_profile(profile_id)
        if rule is None:
            raise NotFound(f"no de-identification profile {profile_id!r} in the policy in force")
        profile = deid.DeidProfile(rule.id, frozenset(rule.options))
        return jsonify(deid.conformance_statement(profile))


def _subject_routes(bp: Blueprint) -> None:
    """Consent, restriction, erasure and export of a data subject; retention."""

    @bp.get("/consents/<patient_id>")
    def consents(patient_id: str) -> Response:
        stewardship = services().stewardship
        issuer = request.args.get("issuer")  # the versions that count for that issuer's patient
        return jsonify(
            {
                "patient_id": patient_id,
                "current": stewardship.consent_in_force(patient_id, issuer),
                "history": [c.as_dict() for c in stewardship.consent_history(patient_id, issuer)],
            }
        )

    @bp.post("/consents")
    def record_consent() -> tuple[Response, int]:
        data = _body()
        stored, changed = services().stewardship.record_consent(
            patient_id=_text(data, "patient_id"),
            purpose=_text(data, "purpose"),
            state=_text(data, "state"),
            recorded_by=_text(data, "recorded_by", required=False) or _who(),
            issuer=_text(data, "issuer_of_patient_id", required=False),
            valid_from=_moment(data, "valid_from"),
            valid_until=_moment(data, "valid_until"),
            evidence_ref=_text(data, "evidence_ref", required=False),
            note=_text(data, "note", required=False),
            recipients=_recipients(data),
        )
        return jsonify(stored.as_dict() | changed), 201

    @bp.post("/subjects/<patient_id>/restrict")
    def restrict(patient_id: str) -> tuple[Response, int]:
        data = request.get_json(silent=True) or {}
        reason = str(data.get("reason", "")) if isinstance(data, dict) else ""
        issuer = data.get("issuer_of_patient_id", "") if isinstance(data, dict) else ""
        issuer = request.args.get("issuer") or (issuer if isinstance(issuer, str) else "")
        restriction = services().stewardship.restrict(patient_id, _who(), reason, issuer=issuer)
        return jsonify({"restriction": restriction.ref, "patient_id": patient_id}), 201

    @bp.post("/subjects/<patient_id>/unrestrict")
    def unrestrict(patient_id: str) -> Response:
        restriction = services().stewardship.unrestrict(
            patient_id, _who(), request.args.get("issuer")
        )
        return jsonify({"lifted": restriction.ref, "patient_id": patient_id})

    @bp.post("/subjects/<patient_id>/erase")
    def erase(patient_id: str) -> tuple[Response, int]:
        outcome = services().stewardship.erase_subject(
            patient_id, _who(), issuer=request.args.get("issuer")
        )
        body = {"patient_id": patient_id, "erased": outcome.done, "reason": outcome.reason}
        return jsonify(body | outcome.changed), (200 if outcome.done else 409)

    @bp.get("/subjects/<patient_id>/export")
    def export(patient_id: str) -> Response:
        """The patient's files and summary as one ZIP archive (built in a temporary folder).
        It hands over images, so it needs governance.admin, not just governance.read."""
        g.principal.require("governance.admin")
        with tempfile.TemporaryDirectory(prefix="dicomnode-export-") as folder:
            services().egress.export_subject(
                patient_id,
                requester(),
                Path(folder) / "export",
                services().stewardship.subject_context(patient_id),
                issuer=request.args.get("issuer"),
            )
            archive = Path(folder) / "export.zip"
            shutil.make_archive(str(archive.with_suffix("")), "zip", Path(folder) / "export")
            data = archive.read_bytes()
        return Response(
            data,
            mimetype="application/zip",
            headers={"Content-Disposition": 'attachment; filename="patient-export.zip"'},
        )

    @bp.get("/retention")
    def retention_status() -> Response:
        return jsonify([i.as_dict() for i in services().stewardship.retention_status()])

    @bp.post("/retention/sweep")
    def retention_sweep() -> Response:
        dry_run = request.args.get("dry_run", "").lower() in ("1", "true", "yes")
        report = services().stewardship.retention_sweep(_who(), dry_run=dry_run)
        return jsonify(report.as_dict())


def _register_routes(bp: Blueprint) -> None:
    """Legal holds, shares and deliveries, objects held at intake."""

    @bp.get("/holds")
    def holds() -> Response:
        active = request.args.get("all", "").lower() not in ("1", "true", "yes")
        return jsonify([h.as_dict() for h in services().records.holds(active)])

    @bp.post("/holds")
    def place_hold() -> tuple[Response, int]:
        data = _body()
        study = _text(data, "study_instance_uid", required=False)
        hold = services().stewardship.place_hold(
            _who(),
            _text(data, "owner"),
            _text(data, "reason"),
            patient_id=_text(data, "patient_id", required=False) or None,
            study_uid=validate_uid(study, "study_instance_uid") if study else None,
            case_ref=_text(data, "case_ref", required=False),
            review_date=_moment(data, "review_date"),
            issuer=_text(data, "issuer_of_patient_id", required=False) or None,
        )
        return jsonify(hold.as_dict()), 201

    @bp.post("/holds/<int:hold_id>/release")
    def release_hold(hold_id: int) -> Response:
        return jsonify(services().stewardship.release_hold(hold_id, _who()).as_dict())

    @bp.post("/shares")
    def share() -> tuple[Response, int]:
        data = _body()
        egress = services().egress
        backoff = timedelta(seconds=services().settings.governance.delivery_backoff)
        delivery = egress.share_now(
            _text(data, "recipient"),
            validate_uid(_text(data, "study"), "study"),
            _who(),
            backoff,
            _text(data, "purpose", required=False) or None,
        )
        status = {"done": 200, "denied": 403}.get(delivery.state, 202)
        return jsonify(delivery.as_dict()), status

    @bp.get("/deliveries")
    def deliveries() -> Response:
        found = services().records.deliveries(
            state=request.args.get("state") or None,
            patient_id=request.args.get("patient_id") or None,
            limit=min(int(request.args.get("limit", "100") or 100), 1000),
        )
        return jsonify([d.as_dict() for d in found])

    @bp.get("/deliveries/<int:delivery_id>")
    def delivery(delivery_id: int) -> Response:
        return jsonify(services().records.delivery(delivery_id).as_dict())

    @bp.post("/deliveries/<int:delivery_id>/retry")
    def retry_delivery(delivery_id: int) -> Response:
        requeued = services().records.requeue_delivery(delivery_id, datetime.now(UTC), _who())
        return jsonify(requeued.as_dict())

    @bp.get("/held")
    def held() -> Response:
        study = request.args.get("study")
        found = services().records.quarantined(validate_uid(study, "study") if study else None)
        return jsonify([h.as_dict() for h in found])

    @bp.post("/held/<study>/release")
    def release(study: str) -> Response:
        results = services().intake.release_held(study, _who())
        return jsonify({"released": len(results), "study": study})

    @bp.post("/held/<study>/discard")
    def discard(study: str) -> Response:
        return jsonify({"discarded": services().intake.discard_held(study, _who())})


def _ledger_routes(bp: Blueprint) -> None:
    """Verifying the ledger and its signed checkpoints."""

    @bp.get("/ledger/verify")
    def verify() -> Response:
        node_key = services().signing_key
        result = services().records.verify_ledger(checkpoint_signed_by(node_key))
        return jsonify(
            {
                "ok": result.ok,
                "entries": result.entries,
                "first_bad": result.first_bad,
                "problem": result.problem,
                "head_hash": result.head_hash,
                "checkpoints": result.checkpoints,
                "verified_at": datetime.now(UTC).isoformat(),
            }
        )

    @bp.post("/ledger/checkpoints")
    def checkpoint() -> tuple[Response, int]:
        key, records = services().signing_key, services().records
        made = services().stewardship.checkpoint(lambda payload: records.sign(key, payload))
        if made is None:
            return jsonify({"checkpoint": None, "detail": "the head is already signed"}), 200
        return jsonify({"checkpoint": made.as_dict()}), 201

    @bp.get("/ledger/checkpoints")
    def checkpoints() -> Response:
        return jsonify([c.as_dict() for c in services().records.checkpoints()])
