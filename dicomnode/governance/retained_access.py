"""Reading data retained only by law (PIPA 21(3), checklist item 33): pure rules.

A study whose purpose has ended and that a law alone keeps (`retention.retained_by_law`) is
stored apart and no normal role reaches it: not QIDO/WADO/C-FIND/C-MOVE/C-GET clients, not
analysis, forwarding, share links or patient-bound tokens, and not break-glass either (the
data are no longer kept for treatment; a clinician who needs them asks the DPO). Only a
holder of the ``governance.legal`` scope (the DPO, legal counsel) reads it, stating a reason,
while the legal period runs; each read is a ledger entry like any disclosure.
"""

from __future__ import annotations

from datetime import datetime

from dicomnode.governance.decisions import Decision

LEGAL_SCOPE = "governance.legal"  # the one role that reads data retained by law
LEGAL_ACCESS = "legal-access"  # the operation of such a read in the ledger
RULE_ID = "retained-by-law"
MAX_REASON = 500


def legal_access(
    legal_basis: str, until: datetime, reason: str, policy_version: str, now: datetime
) -> Decision:
    """Whether a legal-access read of a study retained under `legal_basis` until `until` may
    go ahead: only with a stated reason (at most MAX_REASON characters), and only while the
    legal period runs (after it, the data are due for destruction)."""
    reason = reason.strip()
    why = f"legal access to data retained under {legal_basis} until {until:%Y-%m-%d}"
    if not reason:
        allowed, why = False, f"{why}: refused, no reason was stated"
    elif len(reason) > MAX_REASON:
        allowed, why = False, f"{why}: refused, the reason is longer than {MAX_REASON} characters"
    elif until <= now:
        allowed, why = False, f"{why}: refused, the legal period is over (due for destruction)"
    else:
        allowed, why = True, f"{why}: {reason}"
    return Decision(
        allowed=allowed,
        reason=why,
        rule_id=RULE_ID,
        policy_version=policy_version,
        activity=LEGAL_ACCESS,
        purpose="HLEGAL",  # HL7 PurposeOfUse: legal
        recipient_kind="controller",
        basis=legal_basis,
    )
