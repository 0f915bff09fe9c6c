"""`dicomnode approvals` (four-eyes, item 44), `dicomnode break-glass` and
`dicomnode fhir-consent` (items 4, 5).

Deciding a request, naming deputies and asking for a change act as a named account, signed in
with its password (typed, or one line of standard input) or with a bearer token the node
issued for that account (``--token-file``): never a free-text ``--by``. The other commands'
``--by`` stays what it was for the embedded single-user node (no deputy named, so four-eyes is
not in force); once it is, a change that needs a second person is refused from a free-text
actor and asked for here instead.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any

from dicomnode.cli.common import command, print_json, with_archive, with_services
from dicomnode.core.errors import NotPermitted


def _sign_in(args: argparse.Namespace, node: Any) -> tuple[str, bool]:
    """The signed-in account as the gates name it (``account:<name>``) and whether it is a
    DPO; NotPermitted when the password or token does not sign it in."""
    from dicomnode.archive.accounts import AccountStore

    accounts = AccountStore(node.archive.index)
    if args.token_file:
        from dicomnode.archive.keys import KeyStore
        from dicomnode.dicomweb.auth import AuthError, TokenVerifier

        settings = node.settings
        key = KeyStore(node.archive.index, settings.node.data_dir).signing_key()
        verifier = TokenVerifier(settings.auth, key)
        token = Path(args.token_file).read_text(encoding="utf-8").strip()
        try:
            principal = verifier.verify(f"Bearer {token}")
        except AuthError as e:
            raise NotPermitted(f"sign-in refused: {e}") from None
        if "governance.admin" not in principal.scopes:
            raise NotPermitted("sign-in refused: the token lacks the governance.admin scope")
        account = accounts.get(principal.subject)
        if args.user and args.user != principal.subject:
            raise NotPermitted("sign-in refused: the token is not --user's")
        return f"account:{principal.subject}", bool(
            account and account.active and account.role == "dpo"
        )
    if not args.user:
        raise NotPermitted("sign in: --user NAME (and the password), or --token-file")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {args.user}: ")
    account, why = accounts.authenticate(args.user, password)
    if account is None:
        raise NotPermitted(f"sign-in refused for {args.user} ({why})")
    return f"account:{account.username}", account.role == "dpo"


def _approvals(node: Any) -> Any:
    from dicomnode.oversight.approvals import Approvals

    return Approvals(node.stewardship, node.intake)


def _print_request(request: Any) -> None:
    decided = f" -> {request.state} by {request.decided_by}" if request.decided_by else ""
    print(
        f"{request.ref}  {request.action:<15} {request.state:<9} by {request.requested_by} "
        f"at {request.requested_at:%Y-%m-%d %H:%M}{decided}  {request.summary}"
    )


@with_services
def _list(args: argparse.Namespace, node: Any) -> None:
    work = _approvals(node)
    print(f"four-eyes is {'in force' if work.in_force() else 'not in force (no deputy named)'}")
    for request in work.requests(args.state):
        _print_request(request)


@with_services
def _show(args: argparse.Namespace, node: Any) -> None:
    print_json(_approvals(node).request(args.id).as_dict())


@with_services
def _decide(args: argparse.Namespace, node: Any) -> None:
    from dicomnode.oversight.approvals import acting_as

    me, is_dpo = _sign_in(args, node)
    work = _approvals(node)
    with acting_as(me):
        if args.decision == "approve":
            request = work.approve(args.id, me, is_dpo, args.note or "")
        else:
            request = work.reject(args.id, me, is_dpo, args.note or "")
    _print_request(request)
    if request.outcome:
        print_json(request.outcome)


@with_services
def _deputy(args: argparse.Namespace, node: Any) -> int:
    from dicomnode.oversight.approvals import ApprovalPending

    work = _approvals(node)
    if args.deputy_command == "list":
        for deputy in work.deputies():
            print(f"{deputy['name']:<24} named by {deputy['added_by']} at {deputy['added_at']}")
        return 0
    me, is_dpo = _sign_in(args, node)
    if args.deputy_command == "add":
        named = work.name_deputy(args.name, me, is_dpo)
        print(f"deputy {args.name} {'named' if named else 'was already named'}; four-eyes in force")
        return 0
    try:
        work.remove_deputy(args.name, me, is_dpo)
    except ApprovalPending as pending:
        print(f"pending: {pending}")
        return 3
    print(f"deputy {args.name} removed")
    return 0


@with_services
def _request(args: argparse.Namespace, node: Any) -> int:
    """Ask for a change as the signed-in account: done at once without four-eyes, else a
    pending request (exit status 3)."""
    from dicomnode.oversight.approvals import ApprovalPending, acting_as

    me, _ = _sign_in(args, node)
    try:
        with acting_as(me):
            if args.action == "erase":
                outcome = node.stewardship.erase_subject(args.target, me, issuer=args.issuer)
                print(outcome.reason)
            elif args.action == "release-hold":
                print(f"released {node.stewardship.release_hold(int(args.target), me).ref}")
            elif args.action == "release-held":
                print(f"released {len(node.intake.release_held(args.target, me))} objects")
            else:
                source = Path(args.target).read_text(encoding="utf-8")
                published, _ = node.stewardship.publish_policy(source, me, args.reason or "")
                print(f"published {published.version}; in force from {published.effective_at}")
    except ApprovalPending as pending:
        print(f"pending: {pending}")
        return 3
    return 0


def _sign_in_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--user", help="the account that acts (its password is asked for)")
    parser.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    parser.add_argument(
        "--token-file",
        help="a bearer token with the governance.admin scope whose subject is the account",
    )
    return parser


# --- break-glass ------------------------------------------------------------------------------


def _break_glass(node: Any) -> Any:
    from dicomnode.egress.break_glass import BreakGlass

    return BreakGlass(node.egress, lambda: node.stewardship.clock())


@with_services
def _bg_open(args: argparse.Namespace, node: Any) -> None:
    me, _ = _sign_in(args, node)
    grant = _break_glass(node).open(
        args.requester,
        args.patient_id,
        f"{args.reason} (opened by {me})",
        args.minutes,
        issuer=args.issuer or "",
        study_uid=args.study or "",
    )
    print(f"{grant.ref} for {grant.requester}: patient {grant.patient_id} until {grant.expires_at}")


@with_services
def _bg_list(args: argparse.Namespace, node: Any) -> None:
    for grant, review in _break_glass(node).grants():
        reviewed = (
            f"reviewed by {review['reviewed_by']}" if review["reviewed_at"] else "NOT REVIEWED"
        )
        print(
            f"{grant.ref:<16} {grant.requester:<16} {grant.patient_id:<16} until "
            f"{grant.expires_at:%Y-%m-%d %H:%M}  {reviewed}  {grant.reason}"
        )


@with_services
def _bg_review(args: argparse.Namespace, node: Any) -> None:
    me, is_dpo = _sign_in(args, node)
    _break_glass(node).review(args.id, me, args.note or "", is_dpo)
    print(f"break-glass-{args.id} reviewed by {me}")


# --- consents as FHIR R4 Consent ------------------------------------------------------------


@with_services
def _fhir_import(args: argparse.Namespace, node: Any) -> int:
    from dicomnode.oversight.consents import ConsentInterchange

    me, _ = _sign_in(args, node)
    text = Path(args.file).read_text(encoding="utf-8")
    result = ConsentInterchange(node.stewardship).import_text(text, me)
    for ref in result["recorded"]:
        print(f"recorded {ref}")
    for problem in result["problems"]:
        print(f"resource {problem['resource']} refused: {problem['problem']}", file=sys.stderr)
    return 1 if result["problems"] else 0


@with_services
def _fhir_export(args: argparse.Namespace, node: Any) -> None:
    import json

    from dicomnode.oversight.consents import ConsentInterchange

    bundle = ConsentInterchange(node.stewardship).export(args.patient_id)
    text = json.dumps(bundle, ensure_ascii=False, indent=2)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"{len(bundle['entry'])} consents written to {args.out}")
    else:
        print(text)


@with_archive
def _db_role(args: argparse.Namespace, archive: Any) -> None:
    """Run as the database owner (the settings' database_url names it), after migrating."""
    from dicomnode.archive.db_roles import grant_app_role

    password = sys.stdin.readline().rstrip("\r\n") if args.password_stdin else None
    for statement in grant_app_role(archive.engine, args.name, password):
        print(statement)


def add_parsers(commands: Any) -> None:
    """approvals list/show/approve/reject/request/deputy; break-glass open/list/review."""
    approvals = commands.add_parser("approvals", help="four-eyes: a second person approves")
    sub = approvals.add_subparsers(dest="approvals_command", required=True)
    listing = command(sub, "list", _list, "requests, newest first")
    listing.add_argument("--state", choices=("pending", "approved", "rejected", "failed"))
    command(sub, "show", _show, "one request as JSON").add_argument("id", type=int)
    for decision in ("approve", "reject"):
        parser = _sign_in_options(
            command(sub, decision, _decide, f"{decision} a request (not your own)")
        )
        parser.set_defaults(decision=decision)
        parser.add_argument("id", type=int)
        parser.add_argument("--note", help="why")
    ask = _sign_in_options(command(sub, "request", _request, "ask for a change"))
    ask.add_argument("action", choices=("erase", "release-hold", "release-held", "publish"))
    ask.add_argument("target", help="Patient ID, hold number, Study Instance UID or policy file")
    ask.add_argument("--issuer", help="the Patient ID's issuer (erase)")
    ask.add_argument("--reason", help="the publication's reason (publish)")
    deputy = sub.add_parser("deputy", help="the DPO's named deputies")
    deputies = deputy.add_subparsers(dest="deputy_command", required=True)
    command(deputies, "list", _deputy, "the deputies named now")
    for name in ("add", "remove"):
        parser = _sign_in_options(command(deputies, name, _deputy, f"{name} a deputy (DPO)"))
        parser.add_argument("name", help="the deputy's account name")

    glass = commands.add_parser("break-glass", help="emergency access grants")
    gsub = glass.add_subparsers(dest="break_glass_command", required=True)
    opened = _sign_in_options(command(gsub, "open", _bg_open, "open a grant for a clinician"))
    opened.add_argument("requester", help="who will retrieve (token subject or AE title)")
    opened.add_argument("patient_id")
    opened.add_argument("--reason", required=True, help="the emergency, in words")
    opened.add_argument("--minutes", type=int, default=60)
    opened.add_argument("--issuer")
    opened.add_argument("--study", help="one study only")
    command(gsub, "list", _bg_list, "every grant and its review")

    db_role = command(
        commands,
        "db-role",
        _db_role,
        "create the PostgreSQL role the node runs as (no UPDATE/DELETE of the ledger, no DDL)",
    )
    db_role.add_argument("name", help="the role, e.g. dicomnode_app")
    db_role.add_argument(
        "--password-stdin", action="store_true", help="its password from standard input"
    )

    consents = commands.add_parser("fhir-consent", help="consents as HL7 FHIR R4 Consent")
    csub = consents.add_subparsers(dest="fhir_consent_command", required=True)
    imported = _sign_in_options(
        command(csub, "import", _fhir_import, "record the consents of a Bundle/NDJSON file")
    )
    imported.add_argument("file")
    exported = command(csub, "export", _fhir_export, "a Bundle of every consent version")
    exported.add_argument("--patient-id", help="one patient's only (matched exactly)")
    exported.add_argument("--out", help="write to this file (default: standard output)")
    review = _sign_in_options(command(gsub, "review", _bg_review, "the DPO reviews a grant"))
    review.add_argument("id", type=int)
    review.add_argument("--note")
