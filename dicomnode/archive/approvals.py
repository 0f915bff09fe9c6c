"""Four-eyes requests and the named deputies in the index, and the gate the changing rooms
(stewardship, intake) pass before a change that needs a second person.

Every change (a request made, approved, rejected, carried out or failed; a deputy named or
removed) is written with its ledger entry (kind ``approval``) in one transaction, so the ledger
names both people. Who is asking comes from the entry point that authenticated them (a signed-in
DPO page, a bearer token, the CLI signed in as a named account): `signed_in_as` for the
duration of a call, or an identity source an entry point registers (`identity_sources`). A free
text actor (the CLI's ``--by``) is not a person while four-eyes is in force.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select, update

from dicomnode.archive.index import Index
from dicomnode.archive.ledger import Ledger, LedgerEntry
from dicomnode.archive.oversight_schema import approval_deputies, approval_requests
from dicomnode.core.errors import InvalidInput, NotFound, NotPermitted

APPROVAL_KIND = "approval"
MAX_TEXT = 20000

# The account a call runs as (set around a call by an entry point that signed the person in).
signed_in_as: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "dicomnode_signed_in_as", default=None
)
# The approved request being carried out (the gate lets exactly that change through).
_carrying_out: contextvars.ContextVar[ApprovalRequest | None] = contextvars.ContextVar(
    "dicomnode_carrying_out", default=None
)
# Callables an entry point registers that name who is asking in the current context (e.g. the
# HTTP layer: the bearer token's subject), or None.
identity_sources: list[Callable[[], str | None]] = []


class ApprovalPending(NotPermitted):
    """The change waits for a second person: `request` is the pending request."""

    def __init__(self, request: ApprovalRequest) -> None:
        self.request = request
        super().__init__(
            f"four-eyes: this needs a second person's approval; request {request.id} "
            f"({request.action}) is pending (approve it at /governance/approvals or with "
            f"`dicomnode approvals approve {request.id}`)"
        )


@dataclass(frozen=True)
class ApprovalRequest:
    """One four-eyes request as recorded."""

    id: int
    action: str
    params: dict[str, Any]
    summary: str
    requested_by: str
    requested_at: datetime
    state: str
    decided_by: str | None
    decided_at: datetime | None
    note: str
    outcome: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"approval-{self.id}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "id": self.id,
            "action": self.action,
            "params": self.params,
            "summary": self.summary,
            "requested_by": self.requested_by,
            "requested_at": self.requested_at.isoformat(),
            "state": self.state,
            "decided_by": self.decided_by,
            "decided_at": self.decided_at.isoformat() if self.decided_at else None,
            "note": self.note,
            "outcome": self.outcome,
        }

    @classmethod
    def from_row(cls, row: Any) -> ApprovalRequest:
        return cls(
            row.id,
            row.action,
            json.loads(row.params),
            row.summary,
            row.requested_by,
            row.requested_at,
            row.state,
            row.decided_by,
            row.decided_at,
            row.note,
            json.loads(row.outcome) if row.outcome else {},
        )


def current_identity() -> str | None:
    """Who is asking, as an entry point authenticated them; None when nobody signed in."""
    named = signed_in_as.get()
    if named:
        return named
    for source in identity_sources:
        try:
            found = source()
        except Exception:  # an entry point's source outside its own context: not this one
            found = None
        if found:
            return found
    return None


@contextlib.contextmanager
def acting_as(account: str) -> Iterator[None]:
    """Run the block as the signed-in `account` (an entry point that checked who it is)."""
    token = signed_in_as.set(account)
    try:
        yield
    finally:
        signed_in_as.reset(token)


def _canonical(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)


class ApprovalStore:
    """Four-eyes requests, their decisions and the deputies, each with its ledger entry."""

    def __init__(self, index: Index, ledger: Ledger) -> None:
        self.index = index
        self.ledger = ledger

    # --- deputies -------------------------------------------------------------------------

    def deputies(self) -> list[dict[str, Any]]:
        """The deputies named now (name, who named them, when)."""
        t = approval_deputies
        with self.index.read() as conn:
            rows = conn.execute(select(t).where(t.c.removed_at.is_(None)).order_by(t.c.name)).all()
        return [{"name": r.name, "added_by": r.added_by, "added_at": r.added_at} for r in rows]

    def deputy_names(self) -> frozenset[str]:
        return frozenset(d["name"] for d in self.deputies())

    def four_eyes_in_force(self) -> bool:
        """Four-eyes is in force while at least one deputy is named."""
        return bool(self.deputies())

    def add_deputy(self, name: str, by: str, now: datetime) -> LedgerEntry | None:
        """Name `name` a deputy (None when already named)."""
        name = name.strip()
        if not name or len(name) > 64:
            raise InvalidInput("a deputy is an account name of 1-64 characters")
        t = approval_deputies
        with self.index.write() as conn:
            named = conn.execute(
                select(t.c.id).where(t.c.name == name, t.c.removed_at.is_(None))
            ).first()
            if named is not None:
                return None
            conn.execute(t.insert().values(name=name, added_by=by, added_at=now))
            return self.ledger.append(
                conn, APPROVAL_KIND, by, "deputy-named", {"deputy": name, "at": now.isoformat()}
            )

    def remove_deputy(self, name: str, by: str, now: datetime) -> LedgerEntry:
        t = approval_deputies
        with self.index.write() as conn:
            changed = conn.execute(
                update(t)
                .where(t.c.name == name.strip(), t.c.removed_at.is_(None))
                .values(removed_at=now, removed_by=by)
            ).rowcount
            if not changed:
                raise NotFound(f"{name!r} is not a named deputy")
            return self.ledger.append(
                conn, APPROVAL_KIND, by, "deputy-removed", {"deputy": name.strip()}
            )

    # --- requests -------------------------------------------------------------------------

    def create(
        self, action: str, params: dict[str, Any], summary: str, requester: str, now: datetime
    ) -> ApprovalRequest:
        """A pending request, ledgered (outcome ``requested``)."""
        t = approval_requests
        with self.index.write() as conn:
            new_id = conn.execute(
                t.insert().values(
                    action=action,
                    params=_canonical(params),
                    summary=summary[:MAX_TEXT],
                    requested_by=requester,
                    requested_at=now,
                    state="pending",
                )
            ).inserted_primary_key[0]
            self.ledger.append(
                conn,
                APPROVAL_KIND,
                requester,
                "requested",
                {"request": int(new_id), "action": action, "params": params, "summary": summary},
            )
            return self._get(conn, int(new_id))

    def get(self, request_id: int) -> ApprovalRequest:
        with self.index.read() as conn:
            return self._get(conn, request_id)

    @staticmethod
    def _get(conn: Connection, request_id: int) -> ApprovalRequest:
        row = conn.execute(
            select(approval_requests).where(approval_requests.c.id == request_id)
        ).first()
        if row is None:
            raise NotFound(f"no four-eyes request {request_id}")
        return ApprovalRequest.from_row(row)

    def requests(self, state: str | None = None, limit: int = 500) -> list[ApprovalRequest]:
        t = approval_requests
        query = select(t).order_by(t.c.id.desc()).limit(limit)
        if state:
            query = query.where(t.c.state == state)
        with self.index.read() as conn:
            return [ApprovalRequest.from_row(r) for r in conn.execute(query)]

    def decide(
        self, request_id: int, state: str, approver: str, note: str, now: datetime
    ) -> ApprovalRequest:
        """Mark a pending request approved or rejected (NotPermitted when it is not pending,
        e.g. another person decided it first); ledgered with both people."""
        t = approval_requests
        with self.index.write() as conn:
            request = self._get(conn, request_id)
            changed = conn.execute(
                update(t)
                .where(t.c.id == request_id, t.c.state == "pending")
                .values(state=state, decided_by=approver, decided_at=now, note=note[:MAX_TEXT])
            ).rowcount
            if not changed:
                raise NotPermitted(f"request {request_id} is {request.state}, not pending")
            self.ledger.append(
                conn,
                APPROVAL_KIND,
                approver,
                state,
                {
                    "request": request_id,
                    "action": request.action,
                    "requested_by": request.requested_by,
                    "decided_by": approver,
                    "note": note[:MAX_TEXT],
                },
            )
            return self._get(conn, request_id)

    def finish(
        self, request: ApprovalRequest, outcome: dict[str, Any], failed: bool
    ) -> ApprovalRequest:
        """Record what carrying out an approved request did (or why it failed)."""
        t = approval_requests
        with self.index.write() as conn:
            conn.execute(
                update(t)
                .where(t.c.id == request.id)
                .values(outcome=_canonical(outcome), state="failed" if failed else "approved")
            )
            self.ledger.append(
                conn,
                APPROVAL_KIND,
                request.decided_by or "",
                "failed" if failed else "carried-out",
                {
                    "request": request.id,
                    "action": request.action,
                    "requested_by": request.requested_by,
                    "approved_by": request.decided_by,
                    "outcome": outcome,
                },
            )
            return self._get(conn, request.id)

    # --- the gate -------------------------------------------------------------------------

    @contextlib.contextmanager
    def carrying_out(self, request: ApprovalRequest) -> Iterator[None]:
        """Let exactly `request`'s change through the gate for the duration of the block."""
        token = _carrying_out.set(request)
        try:
            yield
        finally:
            _carrying_out.reset(token)

    def gate(
        self,
        action: str,
        params: dict[str, Any],
        summary: str,
        needed: bool,
        now: datetime,
    ) -> None:
        """Pass a change, or stop it: when `needed` (governance said it needs a second person)
        and it is not the approved request being carried out, record a pending request of the
        signed-in requester and raise ApprovalPending (NotPermitted when nobody signed in)."""
        if not needed:
            return
        carried = _carrying_out.get()
        if (
            carried is not None
            and carried.action == action
            and _canonical(carried.params) == _canonical(params)
        ):
            return
        requester = current_identity()
        if not requester:
            raise NotPermitted(
                "four-eyes is in force: this change needs a request by a signed-in, named "
                "account (the DPO pages, a bearer token, or `dicomnode approvals request ... "
                "--user NAME`), approved by a second person; a free-text --by is not one"
            )
        raise ApprovalPending(self.create(action, params, summary, requester, now))
