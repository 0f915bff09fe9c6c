"""Governance: pure decisions about what may enter the node, be processed and leave it.

Every function here is pure: ``(request, facts, policy, now) -> Decision``, with no database,
clock or I/O. The policy (`policy.py`) is data: activities with their purpose and lawful basis,
recipients, sharing rules, de-identification profiles, retention rules. The services gather the
facts (consents, restrictions) and record each decision in the ledger; they never decide.
"""

from dicomnode.governance.decisions import (
    Admission,
    AdmissionRequest,
    Decision,
    DisclosureRequest,
    Party,
    admit,
    consent_in_force,
    current_consent,
    decide,
    resolve_recipient,
    withdrawal_affects,
)
from dicomnode.governance.policy import Policy, PolicyError
from dicomnode.governance.policy_parse import parse_policy
from dicomnode.governance.policy_versions import (
    diff_policies,
    effective_at,
    embedded_policy,
    notice_period,
    policy_in_force,
    policy_version,
    scheduled,
)

__all__ = [
    "Admission",
    "AdmissionRequest",
    "Decision",
    "DisclosureRequest",
    "Party",
    "Policy",
    "PolicyError",
    "admit",
    "consent_in_force",
    "current_consent",
    "decide",
    "diff_policies",
    "effective_at",
    "embedded_policy",
    "notice_period",
    "parse_policy",
    "policy_in_force",
    "policy_version",
    "resolve_recipient",
    "scheduled",
    "withdrawal_affects",
]
