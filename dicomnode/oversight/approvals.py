"""Four-eyes (checklist item 44): a second person approves or rejects a pending request, and
an approved one is carried out through the room that owns the change (stewardship, intake).

The request was recorded when the change was first asked for (stewardship's or intake's gate
raised ApprovalPending); approving it here checks, with governance, that the approver is
another person and a DPO or a named deputy, then runs exactly that change once. The ledger
holds the request (requester), the decision (approver, with the requester named) and what was
done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from dicomnode.archive.approvals import (
    ApprovalPending,
    ApprovalRequest,
    ApprovalStore,
    acting_as,
    identity_sources,
)
from dicomnode.core.errors import DicomnodeError, InvalidInput, NotPermitted
from dicomnode.core.model import Level, Source
from dicomnode.governance import approvals as rules

log = logging.getLogger("dicomnode.approvals")

# what the entry points (layer 4, wiring) use: who is signed in, and the pending-request error
__all__ = ["Approvals", "ApprovalPending", "ApprovalRequest", "acting_as", "identity_sources"]


class Approvals:
    """Decide four-eyes requests and name deputies. `stewardship` and `intake` are the node's
    (they carry out what is approved; their gates let exactly that change through)."""

    def __init__(
        self,
        stewardship: Any,
        intake: Any,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.stewardship = stewardship
        self.intake = intake
        self.clock = clock or (lambda: stewardship.clock())  # stewardship's, read at each call
        self.archive = stewardship.archive
        self.store: ApprovalStore = stewardship.approvals

    # --- reading ----------------------------------------------------------------------------

    def requests(self, state: str | None = None) -> list[ApprovalRequest]:
        if state and state not in rules.STATES:
            raise InvalidInput(f"state must be one of {', '.join(rules.STATES)}")
        return self.store.requests(state)

    def request(self, request_id: int) -> ApprovalRequest:
        return self.store.get(request_id)

    def deputies(self) -> list[dict[str, Any]]:
        return self.store.deputies()

    def in_force(self) -> bool:
        return self.store.four_eyes_in_force()

    # --- deputies ---------------------------------------------------------------------------

    def name_deputy(self, name: str, by: str, by_is_dpo: bool) -> bool:
        """A DPO names a deputy (an account name); from then on four-eyes is in force.
        False when already named."""
        if not by_is_dpo:
            raise NotPermitted("only a DPO names deputies")
        return self.store.add_deputy(name, by, self.clock()) is not None

    def remove_deputy(self, name: str, by: str, by_is_dpo: bool) -> None:
        """Removing a deputy needs a second person while four-eyes is in force (removing the
        last one switches it off): it becomes a pending request (ApprovalPending)."""
        if not by_is_dpo:
            raise NotPermitted("only a DPO removes deputies")
        verdict = rules.may_remove_deputy(self.store.deputy_names(), name)
        if not verdict.allowed:
            raise InvalidInput(verdict.reason)
        with acting_as(by):
            self.store.gate(
                rules.REMOVE_DEPUTY,
                {"name": name.strip()},
                f"remove deputy {name.strip()}",
                rules.needs_approval(rules.REMOVE_DEPUTY, self.in_force()),
                self.clock(),
            )
        self.store.remove_deputy(name, by, self.clock())

    # --- deciding ---------------------------------------------------------------------------

    def _check(self, request: ApprovalRequest, approver: str, approver_is_dpo: bool) -> None:
        verdict = rules.may_decide(
            request.requested_by, approver, approver_is_dpo, self.store.deputy_names()
        )
        if not verdict.allowed:
            self.archive.ledger.record(
                "approval",
                approver,
                "refused",
                {
                    "request": request.id,
                    "action": request.action,
                    "requested_by": request.requested_by,
                    "reason": verdict.reason,
                },
            )
            raise NotPermitted(verdict.reason)

    def reject(
        self, request_id: int, approver: str, approver_is_dpo: bool, note: str = ""
    ) -> ApprovalRequest:
        """Reject a pending request: nothing is done; ledgered with both people."""
        request = self.store.get(request_id)
        self._check(request, approver, approver_is_dpo)
        return self.store.decide(request_id, "rejected", approver, note, self.clock())

    def approve(
        self, request_id: int, approver: str, approver_is_dpo: bool, note: str = ""
    ) -> ApprovalRequest:
        """Approve a pending request and carry it out now. The decision is ledgered first;
        when the change then fails (e.g. a legal hold placed since), the request is marked
        failed with the reason, and the error is raised."""
        request = self.store.get(request_id)
        self._check(request, approver, approver_is_dpo)
        decided = self.store.decide(request_id, "approved", approver, note, self.clock())
        try:
            with self.store.carrying_out(decided):
                outcome = self._carry_out(decided)
        except DicomnodeError as e:
            self.store.finish(decided, {"error": str(e)}, failed=True)
            raise
        finished = self.store.finish(decided, outcome, failed=False)
        log.info(
            "four-eyes request %d (%s) approved by %s and carried out",
            request_id,
            decided.action,
            approver,
            extra={"event": "approval", "request": request_id, "action": decided.action},
        )
        return finished

    def _carry_out(self, request: ApprovalRequest) -> dict[str, Any]:
        """Run the approved change as its requester asked it (the requester is the actor of
        the change's own ledger entry; the approval entries name the approver)."""
        p, by = request.params, request.requested_by
        if request.action == rules.PUBLISH_POLICY:
            published, new = self.stewardship.publish_policy(p["source"], by, p.get("reason", ""))
            return {
                "version": published.version,
                "new": new,
                "effective_at": published.effective_at.isoformat(),
            }
        if request.action == rules.ERASE:
            outcome = self.stewardship.erase_subject(p["patient_id"], by, issuer=p["issuer"])
            return {"done": outcome.done, "reason": outcome.reason}
        if request.action == rules.DELETE:
            keys = tuple((str(k), str(v)) for k, v in p["keys"])
            outcome = self.stewardship.delete_on_request(
                Level(p["level"]), keys, Source("approval", by), p.get("reason", "")
            )
            return {"done": outcome.done, "reason": outcome.reason}
        if request.action == rules.RELEASE_HOLD:
            hold = self.stewardship.release_hold(int(p["hold_id"]), by)
            return {"hold": hold.ref}
        if request.action == rules.RELEASE_HELD:
            results = self.intake.release_held(p["study"], by)
            return {"released": len(results)}
        if request.action == rules.REMOVE_DEPUTY:
            self.store.remove_deputy(p["name"], by, self.clock())
            return {"removed": p["name"]}
        raise InvalidInput(f"unknown four-eyes action {request.action!r}")
