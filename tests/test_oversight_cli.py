"""The four-eyes and break-glass commands (item 44): `dicomnode approvals ...` and
`dicomnode break-glass ...` act as a named account signed in with its password or a token the
node issued; once a deputy is named, a free-text --by can no longer erase; nobody approves their
own request; both people are in the ledger."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dicomnode.archive.accounts import AccountStore
from tests.conftest import WORKSTATION, dicomweb_client
from tests.factory import make_ct
from tests.test_dpo_pages import PASSWORD
from tests.test_governance_node import as_file, c_find, policy_text, publish_days_ago

STUDY_1, STUDY_2 = "1.2.826.0.1.1", "1.2.826.0.1.2"


def run(node, *args: str, password: str | None = None) -> subprocess.CompletedProcess:
    """`dicomnode ARGS --config ...`, the password (when given) on standard input."""
    return subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", *args, "--config", str(node.settings.source)],
        input=(password + "\n") if password is not None else None,
        capture_output=True,
        text=True,
        timeout=120,
    )


def as_user(node, user: str, *args: str, password: str = PASSWORD):
    return run(node, *args, "--user", user, "--password-stdin", password=password)


@pytest.fixture
def node(start_node):
    node = start_node(peers=[WORKSTATION])
    publish_days_ago(node, policy_text())
    dicomweb_client(node).store_instances(
        [
            as_file(make_ct(patient_id=p, study_uid=study))
            for p, study in (("P1", STUDY_1), ("P2", STUDY_2))
        ]
    )
    accounts = AccountStore(node.archive.index)
    accounts.add("dpo1", PASSWORD, "dpo")
    accounts.add("dep1", PASSWORD, "auditor")
    return node


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the CLI: any index
def test_four_eyes_from_the_command_line(node, tmp_path):
    listed = run(node, "approvals", "list")
    assert "not in force" in listed.stdout, listed.stderr
    wrong = as_user(node, "dpo1", "approvals", "deputy", "add", "dep1", password="not it at all")
    assert wrong.returncode == 1 and "sign-in refused for dpo1" in wrong.stderr
    named = as_user(node, "dpo1", "approvals", "deputy", "add", "dep1")
    assert named.returncode == 0 and "four-eyes in force" in named.stdout, named.stderr

    free_text = run(node, "subject", "erase", "--patient-id", "P2", "--by", "cli:bob")
    assert free_text.returncode == 1 and "signed-in, named account" in free_text.stderr
    asked = as_user(node, "dpo1", "approvals", "request", "erase", "P2")
    assert asked.returncode == 3 and "pending" in asked.stdout, asked.stdout + asked.stderr
    request_id = int(asked.stdout.split("request ")[1].split(" ")[0])
    assert len(c_find(node, PatientID="P2")[1]) == 1

    own = as_user(node, "dpo1", "approvals", "approve", str(request_id))
    assert own.returncode == 1 and "nobody approves their own request" in own.stderr
    approved = as_user(node, "dep1", "approvals", "approve", str(request_id), "--note", "ok")
    assert approved.returncode == 0, approved.stderr
    assert f"approval-{request_id}" in approved.stdout and "approved by account:dep1" in (
        approved.stdout
    )
    assert c_find(node, PatientID="P2")[1] == []

    # a token the node issued for the account signs it in too
    token = run(node, "token", "create", "--subject", "dpo1", "--scope", "governance.admin")
    assert token.returncode == 0, token.stderr
    token_file = tmp_path / "dpo1.jwt"
    token_file.write_text(token.stdout.strip())
    hold = node.stewardship.place_hold("dpo:dpo1", "legal", "claim 7", patient_id="P1")
    asked = as_user(node, "dep1", "approvals", "request", "release-hold", str(hold.id))
    release_id = int(asked.stdout.split("request ")[1].split(" ")[0])
    rejected = run(node, "approvals", "reject", str(release_id), "--token-file", str(token_file))
    assert rejected.returncode == 0 and "rejected by account:dpo1" in rejected.stdout
    assert node.archive.registry.holds(active_only=True)[0].id == hold.id

    ledger = [e for e in node.archive.ledger.entries() if e.kind == "approval"]
    assert [(e.outcome, e.actor) for e in ledger if e.data.get("request") == request_id] == [
        ("requested", "account:dpo1"),
        ("refused", "account:dpo1"),
        ("approved", "account:dep1"),
        ("carried-out", "account:dep1"),
    ]
    erased = [e for e in node.archive.ledger.entries() if e.kind == "subject"][-1]
    assert erased.actor == "account:dpo1" and erased.outcome == "erased"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the CLI: any index
def test_break_glass_from_the_command_line(node):
    opened = as_user(
        node,
        "dpo1",
        "break-glass",
        "open",
        "er-doctor",
        "P1",
        "--reason",
        "unconscious patient, prior CT needed",
        "--minutes",
        "30",
    )
    assert opened.returncode == 0 and "break-glass-1 for er-doctor" in opened.stdout, opened.stderr
    assert "NOT REVIEWED" in run(node, "break-glass", "list").stdout
    by_auditor = as_user(node, "dep1", "break-glass", "review", "1", "--note", "x")
    assert by_auditor.returncode == 1 and "only a DPO" in by_auditor.stderr
    reviewed = as_user(node, "dpo1", "break-glass", "review", "1", "--note", "justified")
    assert reviewed.returncode == 0, reviewed.stderr
    assert "reviewed by account:dpo1" in run(node, "break-glass", "list").stdout
