"""The public disclosure of the node's automated decisions (PIPA 37-2(4); GDPR 13(2)(f)):
``GET /automated-decisions`` lists each AI output type (one per analyzer) with the criteria and
procedure of its output, as the analyzer declares them or as the site replaced them, and how a
patient refuses it or asks for an explanation. No token: it is for anyone to read."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from dicomnode.dicomweb.access import services

HOW_TO_ASK = (
    "A patient may refuse automated processing of their images, or ask for an explanation of "
    "an automated result (PIPA 37-2), through the hospital's privacy office. The request is "
    "recorded as a ticket and reviewed by a person; a refusal stops new automated analysis "
    "of the patient's images meanwhile, and the results already made are flagged."
)


def automated_decisions_blueprint() -> Blueprint:
    bp = Blueprint("automated_decisions", __name__)

    @bp.get("/automated-decisions")
    def disclosure() -> Response:
        return jsonify(
            {
                "law": "PIPA 37-2(4)",
                "requests": HOW_TO_ASK,
                "outputs": list(services().automated_decisions),
            }
        )

    return bp
