"""Importing the archive package (or a light module of it) loads neither SQLAlchemy nor Alembic:
`Archive` is imported when first named (archive/__init__.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _loaded_after(statement: str) -> dict[str, bool]:
    code = (
        "import json, sys\n"
        f"{statement}\n"
        "print(json.dumps({m: m in sys.modules for m in ('sqlalchemy', 'alembic')}))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(run.stdout)


@pytest.mark.parametrize(
    "statement",
    ["import dicomnode.archive", "import dicomnode.archive.blobstore"],
)
def test_the_archive_package_loads_no_database_library(statement):
    assert _loaded_after(statement) == {"sqlalchemy": False, "alembic": False}


def test_the_keys_module_loads_no_migration_machinery():
    """keys.py reads the key store in the index (SQLAlchemy is its own import); it never loads
    Alembic or the Archive."""
    assert _loaded_after("import dicomnode.archive.keys")["alembic"] is False


def test_naming_archive_loads_it():
    loaded = _loaded_after("from dicomnode.archive import Archive")
    assert loaded["sqlalchemy"] is True
