"""Check the shipped machine-readable tables against their pins (checklist item 45).

    python tools/check_tables.py [--root DIR]

Exit status 0 when every table's SHA-256 equals its pin in
dicomnode/governance/data/tables.toml, or differs but TABLES-CHANGELOG.md has an entry naming
the file and its new checksum (then the pin is to be updated); 1 otherwise, each problem on
its own line. Comparing with upstream (a new DICOM edition, HL7 terminology) is a manual step
documented in README."""

from __future__ import annotations

import argparse
import hashlib
import sys
import tomllib
from pathlib import Path

MANIFEST = "dicomnode/governance/data/tables.toml"
CHANGELOG = "dicomnode/governance/data/TABLES-CHANGELOG.md"


def problems(root: Path) -> list[str]:
    """What is wrong with the tables under `root` (empty: nothing)."""
    tables = tomllib.loads((root / MANIFEST).read_text(encoding="utf-8"))["table"]
    changelog = (root / CHANGELOG).read_text(encoding="utf-8")
    found = []
    for table in tables:
        path = root / table["file"]
        if not path.is_file():
            found.append(f"{table['file']}: missing")
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest == table["sha256"]:
            continue
        named = any(
            table["file"].rsplit("/", 1)[-1] in line and digest in line
            for line in changelog.splitlines()
        )
        if named:
            found.append(f"{table['file']}: changed as the changelog says; pin sha256 {digest}")
        else:
            found.append(
                f"{table['file']}: sha256 {digest} differs from its pin {table['sha256']} "
                f"and {CHANGELOG} has no entry naming the file and this checksum"
            )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent))
    args = parser.parse_args(argv)
    found = problems(Path(args.root))
    for line in found:
        print(line)
    return 1 if any("no entry" in line or "missing" in line for line in found) else 0


if __name__ == "__main__":
    sys.exit(main())
