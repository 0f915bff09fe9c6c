"""README's "Governance checklist" table stays true: it has the 45 items in order, each row
says Y, P (with the gap named) or N, and every test a row names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rows() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Governance checklist\n", 1)[1].split("\n## ", 1)[0]
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in section.splitlines()
        if re.match(r"\| \d+ \|", line)
    ]


def named_tests(cell: str) -> list[tuple[str, str]]:
    found, module = [], None
    for part in re.split(r"[;,]\s*", cell):
        part = part.strip()
        if match := re.match(r"(test_\w+)::(test_\w+)", part):
            module, name = match.groups()
        elif (match := re.match(r"::(test_\w+)", part)) and module:
            name = match.group(1)
        elif re.fullmatch(r"test_\w+", part):
            found.append((part, ""))
            continue
        else:
            continue
        found.append((module, name))
    return found


def test_the_table_has_the_45_items_and_each_test_it_names_exists():
    table = rows()
    assert [int(r[0]) for r in table] == list(range(1, 46))
    for number, _, status, tests in table:
        assert re.match(r"(Y|N|P \(.+\))$", status), (number, status)
        if status == "N":
            assert tests == "—", number
            continue
        named = named_tests(tests)
        assert named, number
        for module, name in named:
            path = ROOT / "tests" / f"{module}.py"
            assert path.is_file(), (number, module)
            if name:
                assert f"def {name}(" in path.read_text(encoding="utf-8"), (number, name)
