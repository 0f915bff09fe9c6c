"""Item 45: the shipped tables are checksum-pinned; a table whose checksum changes without a
changelog entry fails the check (tools/check_tables.py), one with an entry passes it."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "check_tables.py"


def check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), "--root", str(root)], capture_output=True, text=True
    )


def copy_of_the_tables(tmp_path: Path) -> Path:
    manifest = tomllib.loads((ROOT / "dicomnode/governance/data/tables.toml").read_text())
    for relative in [t["file"] for t in manifest["table"]] + [
        "dicomnode/governance/data/tables.toml",
        "dicomnode/governance/data/TABLES-CHANGELOG.md",
    ]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / relative, tmp_path / relative)
    return tmp_path


def test_the_shipped_tables_match_their_pins():
    result = check(ROOT)
    assert result.returncode == 0 and result.stdout == "", result.stdout


def test_a_changed_table_fails_without_a_changelog_entry_and_passes_with_one(tmp_path):
    root = copy_of_the_tables(tmp_path)
    table = root / "dicomnode/governance/codes.py"
    table.write_text(table.read_text() + "\n# a new code\n")
    digest = hashlib.sha256(table.read_bytes()).hexdigest()
    failed = check(root)
    assert failed.returncode == 1
    assert f"codes.py: sha256 {digest} differs from its pin" in failed.stdout

    changelog = root / "dicomnode/governance/data/TABLES-CHANGELOG.md"
    changelog.write_text(changelog.read_text() + f"\n- codes.py: one code added; sha256 {digest}\n")
    passed = check(root)
    assert passed.returncode == 0 and "changed as the changelog says" in passed.stdout
    (root / "dicomnode/governance/deid_private.py").unlink()
    assert check(root).returncode == 1
