"""`migrate`: the index's schema is brought to head by an explicit step, under a lock, never by
opening the archive (which only checks it is current)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import create_engine, text

from dicomnode.archive.migrate import SchemaNotCurrent, check_current, head_revision, migrate


def _versions(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
    finally:
        engine.dispose()


def test_migrate_brings_a_new_database_to_head_and_again_does_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    engine = create_engine(url)
    with pytest.raises(SchemaNotCurrent, match="dicomnode migrate"):
        check_current(engine)
    assert migrate(url) == head_revision()
    check_current(engine)
    assert migrate(url) == head_revision()
    assert _versions(url) == [head_revision()]
    engine.dispose()


def test_a_database_behind_head_is_reported_with_its_revision(tmp_path):
    from dicomnode.archive import migrations

    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    engine = create_engine(url)
    migrations.upgrade(engine, "0007")
    with pytest.raises(SchemaNotCurrent, match=r"revision 0007.*dicomnode migrate"):
        check_current(engine)
    migrate(url)
    check_current(engine)
    engine.dispose()


MIGRATE = "import sys; from dicomnode.archive.migrate import migrate; print(migrate(sys.argv[1]))"


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_two_processes_migrating_at_once_end_at_one_head_without_error(backend, tmp_path, request):
    """Two `migrate` runs start together (two nodes starting): the advisory lock (PostgreSQL)
    or the lock file (SQLite) makes one wait; both succeed, the schema is at head once."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    else:
        url = request.getfixturevalue("postgres").create_database()
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATE, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [run.communicate(timeout=300) for run in runs]
    for run, (out, err) in zip(runs, results, strict=True):
        assert run.returncode == 0, err
        assert out.strip() == head_revision()
    assert _versions(url) == [head_revision()]


def test_opening_an_unmigrated_archive_names_the_command_and_creates_nothing(tmp_path):
    from dicomnode.archive import Archive

    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    with pytest.raises(SchemaNotCurrent, match="dicomnode migrate"):
        Archive(tmp_path / "data", url)
    assert not (tmp_path / "data").exists()  # no folder made as a side effect
    migrate(url)
    archive = Archive(tmp_path / "data", url)
    try:
        assert archive.counts()["instances"] == 0
        assert not (tmp_path / "data").exists()  # folders come with the first write
    finally:
        archive.close()
