"""Oversight (layer 3, issue 21): four-eyes approval of sensitive changes (`approvals`) and the
interchange of consents as HL7 FHIR R4 Consent resources (`consents`)."""
