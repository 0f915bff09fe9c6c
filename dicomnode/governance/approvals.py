"""Four-eyes (checklist item 44): which changes need a second person's approval, and who may
give it. Pure: decided from the facts handed in.

Once the DPO has named at least one deputy, the node has two people who can decide, and
four-eyes is in force: publishing a policy version that is not narrower than the one in force,
erasing a patient, a DICOMweb DELETE, releasing a legal hold and releasing objects held at
intake each become a pending request that another person (a DPO or a named deputy) approves
or rejects. A narrowing publication needs none: it is the fast brake. Nobody approves their own
request, whatever their role.
"""

from __future__ import annotations

from dataclasses import dataclass

PUBLISH_POLICY, ERASE, DELETE, RELEASE_HOLD, RELEASE_HELD, REMOVE_DEPUTY = (
    "publish-policy",
    "erase",
    "delete",
    "release-hold",
    "release-held",
    "remove-deputy",
)
# action -> what it does, as the ledger and the pages say it
ACTIONS: dict[str, str] = {
    PUBLISH_POLICY: "publish a policy version that widens processing",
    ERASE: "erase a patient's data",
    DELETE: "delete studies, series or instances (DICOMweb DELETE)",
    RELEASE_HOLD: "release a legal hold",
    RELEASE_HELD: "release objects held at intake into the archive",
    REMOVE_DEPUTY: "remove a deputy (the last one switches four-eyes off)",
}
STATES = ("pending", "approved", "rejected", "failed")
DECISIONS = ("approved", "rejected")
# Prefixes the entry points put before an account name: the same person whatever the door.
IDENTITY_PREFIXES = ("dpo:", "account:", "token:", "cli:", "oidc:")
MAX_NOTE = 2000


@dataclass(frozen=True)
class Verdict:
    """Whether someone may decide a request, and why not."""

    allowed: bool
    reason: str


def person(actor: str) -> str:
    """The person an actor names, whatever entry point it came through (``dpo:alice``,
    ``account:Alice`` and ``token:alice`` are one person: ``alice``)."""
    name = actor.strip()
    lowered = name.lower()
    for prefix in IDENTITY_PREFIXES:
        if lowered.startswith(prefix):
            name = name[len(prefix) :]
            break
    return name.strip().lower()


def needs_approval(action: str, four_eyes: bool, change_kind: str = "") -> bool:
    """Whether `action` waits for a second person: only while four-eyes is in force, and for
    a policy publication only when the change is not a narrowing (`change_kind` from
    `notice.classify_change`: narrower, wider or material)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown four-eyes action {action!r}")
    if not four_eyes:
        return False
    if action == PUBLISH_POLICY:
        return change_kind != "narrower"
    return True


def may_decide(
    requester: str, approver: str, approver_is_dpo: bool, deputies: frozenset[str] | set[str]
) -> Verdict:
    """Whether `approver` may approve or reject a request `requester` made: never their own;
    otherwise a DPO or a named deputy (`deputies`: person names, see `person`)."""
    who = person(approver)
    if not who:
        return Verdict(False, "the approver must be a named, signed-in account")
    if who == person(requester):
        return Verdict(
            False,
            f"{who} made this request: nobody approves their own request "
            "(a second person, a DPO or a named deputy, must decide)",
        )
    if approver_is_dpo or who in {person(d) for d in deputies}:
        return Verdict(True, "")
    return Verdict(False, f"{who} is neither a DPO nor a named deputy")


def may_remove_deputy(deputies: frozenset[str] | set[str], name: str) -> Verdict:
    """A deputy can be removed only if named."""
    if person(name) not in {person(d) for d in deputies}:
        return Verdict(False, f"{name!r} is not a named deputy")
    return Verdict(True, "")
