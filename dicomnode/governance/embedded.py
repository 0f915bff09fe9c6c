"""The embedded default policy: in force until the hospital publishes one of its own.

It says what the company's privacy policy says today. The node processes studies on the
hospital's behalf (PIPA Art. 26 entrustment, GDPR Art. 28): studies from any sender are filed and
analysed, results go back to the hospital's configured peers, the hospital's authenticated
DICOMweb clients and configured DIMSE peers may query and retrieve, patients may get their own
data, and every disclosure to a third party is denied. Retention: a processing copy, kept 90
days from receipt (results follow their source), never the hospital's record of care.
"""

EMBEDDED_POLICY_TOML = """
[policy]
version = "embedded-1"
effective_from = 2026-01-01T00:00:00Z
material = false
controller = "the hospital operating this node"
operator = "dicomnode operator (processor under PIPA Art. 26 / GDPR Art. 28)"
dpo_contact = ""
home_country = "KR"
summary = "Processing on the hospital's behalf only; no third-party provision."

[intake]
unknown_sender = "admit"
restricted_patient = "hold"
refused_processing = "refuse"

[[activities]]
id = "intake"
purposes = ["TREAT"]
lawful_basis = "PIPA-26"
additional_bases = ["GDPR-28", "GDPR-9-2-h"]
data_categories = ["received-images", "identifiers"]
description = "Receiving and filing the studies the hospital's modalities send"

[[activities]]
id = "analysis"
purposes = ["TREAT", "HOPERAT"]
lawful_basis = "PIPA-26"
additional_bases = ["GDPR-28", "GDPR-9-2-h"]
data_categories = ["received-images", "analysis-results"]
description = "Image analysis of received studies for the treating clinicians"

[[activities]]
id = "return-results"
purposes = ["TREAT"]
lawful_basis = "PIPA-26"
additional_bases = ["GDPR-28", "GDPR-9-2-h"]
data_categories = ["analysis-results"]
description = "Sending analysis results back to the hospital's PACS"

[[activities]]
id = "hospital-access"
purposes = ["TREAT", "HOPERAT"]
lawful_basis = "PIPA-26"
additional_bases = ["GDPR-28", "GDPR-9-2-h"]
data_categories = ["received-images", "analysis-results", "identifiers"]
description = "Queries and retrievals by the hospital's own systems and staff"

[[activities]]
id = "third-party-provision"
purposes = ["HRESCH", "CLINTRCH", "PUBHLTH", "HMARKT", "HPAYMT", "SYSDEV", "TRAIN"]
lawful_basis = "PIPA-17-1-1"
data_categories = ["received-images", "analysis-results", "identifiers"]
description = "Giving data to anyone outside the hospital: not done"

[[activities]]
id = "subject-access"
purposes = ["PATRQT"]
lawful_basis = "PIPA-35"
additional_bases = ["GDPR-15", "GDPR-20"]
data_categories = ["received-images", "analysis-results", "identifiers"]
description = "Patients' access to their own data (through the hospital)"

[[recipients]]
id = "hospital"
name = "the hospital's PACS, workstations and DICOMweb clients"
kind = "controller"
peers = ["*"]
token_subjects = ["*"]

[[rules]]
id = "embedded.analysis"
effect = "allow"
activity = "analysis"
description = "Analyse every study the hospital sends"

[[rules]]
id = "embedded.return-results"
effect = "allow"
activity = "return-results"
recipients = ["kind:controller"]

[[rules]]
id = "embedded.hospital-access"
effect = "allow"
activity = "hospital-access"
recipients = ["kind:controller"]

[[rules]]
id = "embedded.subject-access"
effect = "allow"
activity = "subject-access"

[[rules]]
id = "embedded.no-third-party"
effect = "deny"
activity = "third-party-provision"
description = "The company provides personal data to no third party"

[[retention]]
id = "embedded.received-images"
category = "received-images"
period = "P90D"
start = "received"

[[retention]]
id = "embedded.analysis-results"
category = "analysis-results"
period = "P90D"
start = "received"
"""
