"""The database role the node runs as on PostgreSQL (checklist item 22): it may read and add
everything, change and delete only what the node's work changes, and never change or delete
the ledger or consent records, nor alter the schema. The owner role (the one `dicomnode
migrate` runs as) creates it and grants it these rights; the node's ``database_url`` then
names the app role.

- ``ledger_entries``, ``ledger_checkpoints``, ``consents``, ``consent_provisions``: SELECT,
  INSERT only (append-only by privilege, besides the triggers);
- ``restrictions``, ``legal_holds``, ``policy_versions``: SELECT, INSERT and UPDATE of the
  columns that record their end (lifted, released, first in force) only;
- every other table: SELECT, INSERT, UPDATE, DELETE; sequences: USAGE, SELECT;
- no CREATE on the schema (no DDL), not the owner of any table.
"""

from __future__ import annotations

import re

from sqlalchemy import Engine, inspect, text

APPEND_ONLY = ("ledger_entries", "ledger_checkpoints", "consents", "consent_provisions")
COLUMN_UPDATES = {
    "restrictions": ("lifted_at", "lifted_by"),
    "legal_holds": ("released_at", "released_by"),
    "policy_versions": ("activated_at",),
}
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def grant_app_role(owner: Engine, role: str, password: str | None = None) -> list[str]:
    """Create `role` (LOGIN, with `password` when given) if it does not exist and give it the
    app's rights on every table of the index (run as the owner, after migrating). Returns the
    statements run (the password shown as ***)."""
    if owner.dialect.name != "postgresql":
        raise ValueError("database roles are a PostgreSQL matter (SQLite has none)")
    if not _NAME.fullmatch(role):
        raise ValueError(f"a role name is lower-case letters, digits and _: {role!r}")
    tables = sorted(inspect(owner).get_table_names())
    statements = [
        f"GRANT USAGE ON SCHEMA public TO {role}",
        f"REVOKE CREATE ON SCHEMA public FROM {role}",
        f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}",
    ]
    for table in tables:
        if table in APPEND_ONLY:
            statements.append(f"GRANT SELECT, INSERT ON {table} TO {role}")
        elif table in COLUMN_UPDATES:
            columns = ", ".join(COLUMN_UPDATES[table])
            statements.append(f"GRANT SELECT, INSERT, UPDATE ({columns}) ON {table} TO {role}")
        else:
            statements.append(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {role}")
    with owner.begin() as conn:
        exists = conn.execute(
            text("SELECT 1 FROM pg_roles WHERE rolname = :role"), {"role": role}
        ).first()
        if not exists:
            create = f"CREATE ROLE {role} LOGIN"
            if password:  # a literal (DDL takes no parameters); quotes doubled
                create += " PASSWORD '" + password.replace("'", "''") + "'"
            conn.exec_driver_sql(create)
        for statement in statements:
            conn.exec_driver_sql(statement)
    return (
        [f"CREATE ROLE {role} LOGIN" + (" PASSWORD ***" if password else "")] if not exists else []
    ) + statements
