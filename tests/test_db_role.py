"""Item 22 on PostgreSQL: the node runs as a role that cannot UPDATE or DELETE the ledger and
consent records, changes restrictions, holds and policy versions only in the columns that
record their end, and has no DDL; the owner role migrates and grants. The node's own work
(ledger entries, consents, a restriction lifted, a hold released) goes through as that role."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import create_engine

from dicomnode.archive.db_roles import grant_app_role
from dicomnode.archive.migrate import migrate

ROLE = "dicomnode_app"


@pytest.fixture
def urls(postgres):
    owner = postgres.create_database()
    migrate(owner)
    engine = create_engine(owner)
    try:
        ran = grant_app_role(engine, ROLE, "app password 'quoted'")
    finally:
        engine.dispose()
    assert ran[0] == f"CREATE ROLE {ROLE} LOGIN PASSWORD ***"
    return owner, owner.replace("postgres@", f"{ROLE}@")


def as_app(app_url: str):
    database = app_url.split("/")[3].split("?")[0]
    host = app_url.split("host=")[1].split("&")[0]
    port = int(app_url.split("port=")[1])
    user = app_url.split("//")[1].split("@")[0]
    return psycopg.connect(host=host, port=port, user=user, dbname=database, autocommit=True)


def test_the_app_role_appends_but_never_rewrites_the_ledger_or_consents(urls, tmp_path):
    from dicomnode.archive import Archive
    from dicomnode.stewardship import Stewardship

    _, app_url = urls
    archive = Archive(tmp_path / "data", app_url)
    try:
        stewardship = Stewardship(archive)
        archive.ledger.record("processing", "node", "allowed", {"note": "as the app role"})
        stewardship.record_consent("P1", "HRESCH", "granted", "dpo:dpo1")
        stewardship.restrict("P1", "dpo:dpo1", "asked")
        stewardship.unrestrict("P1", "dpo:dpo1")  # UPDATE (lifted_at, lifted_by) only
        hold = stewardship.place_hold("dpo:dpo1", "legal", "claim", patient_id="P1")
        stewardship.release_hold(hold.id, "dpo:dpo1")
    finally:
        archive.close()

    refused = (
        "UPDATE ledger_entries SET actor = 'someone else'",
        "DELETE FROM ledger_entries",
        "UPDATE consents SET state = 'granted'",
        "DELETE FROM consents",
        "TRUNCATE ledger_checkpoints",
        "UPDATE restrictions SET reason = 'rewritten'",
        "DELETE FROM legal_holds",
        "UPDATE policy_versions SET source = ''",
        "CREATE TABLE shadow (x integer)",
        "DROP TABLE ledger_entries",
        "ALTER TABLE consents DISABLE TRIGGER ALL",
    )
    with as_app(app_url) as conn:
        for statement in refused:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
        assert conn.execute("SELECT count(*) FROM ledger_entries").fetchone()[0] >= 5
        conn.execute("UPDATE restrictions SET lifted_by = lifted_by")  # its column grant
        conn.execute("DELETE FROM analysis_jobs")  # the node's own work records: allowed


def test_the_command_creates_the_role(postgres, tmp_path):
    import subprocess
    import sys

    from tests.conftest import write_config

    url = postgres.create_database()
    migrate(url)
    config = write_config(tmp_path / "owner.toml", tmp_path / "data", url)
    made = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "db-role", "dicomnode_cli_app", "--config",
         str(config)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "CREATE ROLE dicomnode_cli_app LOGIN" in made.stdout
    assert "GRANT SELECT, INSERT ON ledger_entries TO dicomnode_cli_app" in made.stdout
    app = url.replace("postgres@", "dicomnode_cli_app@")
    with as_app(app) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("DELETE FROM consents")
