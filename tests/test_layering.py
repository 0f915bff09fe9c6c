"""The rooms of ../shared/DESIGN.md hold: lower layers never import higher ones, rooms on one
layer do not import each other, and the pure rooms import nothing that does I/O."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dicomnode"

# room -> layer, as DESIGN.md's table names them
LAYERS = {
    "core": 0,
    "config": 1,
    "governance": 2,
    "archive": 2,
    "intake": 3,
    "egress": 3,
    "stewardship": 3,
    "casework": 3,
    "oversight": 3,
    "records": 3,
    "scp": 4,
    "dicomweb": 4,
    "analysis": 4,
    "wiring": 5,
}
# The wiring room's modules: compose.py builds the rooms, serve/ runs them, cli/ the command.
WIRING = {"compose", "serve", "cli"}
# Third-party packages a pure room may use: core is stdlib + pydicom; governance decides
# without a database, clock or network.
ALLOWED_THIRD_PARTY = {"core": {"pydicom"}, "config": set(), "governance": {"pydicom"}}
# Standard-library modules that reach the clock, files, processes or the network: governance
# decides from what it is handed, so it imports none of them.
IO_MODULES = {
    "os", "io", "shutil", "socket", "ssl", "sqlite3", "subprocess", "select", "tempfile",
    "time", "threading", "asyncio", "http", "urllib.request", "smtplib", "logging",
}  # fmt: skip


def _room(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[0] == "__init__":
        return "package"
    return "wiring" if parts[0] in WIRING else parts[0]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            if node.module == "dicomnode":
                names += [f"dicomnode.{alias.name}" for alias in node.names]
    return names


def _modules() -> list[tuple[Path, str, list[str]]]:
    return [(p, _room(p), _imports(p)) for p in sorted(PACKAGE.rglob("*.py")) if _room(p) in LAYERS]


def test_every_module_belongs_to_a_room():
    rooms = {_room(p) for p in PACKAGE.rglob("*.py")}
    assert rooms <= set(LAYERS) | {"package"}, rooms - set(LAYERS)


def _upward_imports(room: str, imports: list[str]) -> list[str]:
    """The imports of `room` that reach a room on its own layer or above."""
    found = []
    for name in imports:
        parts = name.split(".")
        if parts[0] != "dicomnode" or len(parts) < 2:
            continue
        target = "wiring" if parts[1] in WIRING else parts[1]
        if target in LAYERS and target != room and LAYERS[target] >= LAYERS[room]:
            found.append(name)
    return found


def test_no_room_imports_a_higher_layer_or_a_neighbour():
    violations = [
        f"{path.relative_to(PACKAGE)} ({room}) imports {name}"
        for path, room, imports in _modules()
        for name in _upward_imports(room, imports)
    ]
    assert violations == []


def test_pure_rooms_use_only_the_standard_library_and_allowed_packages():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    violations = []
    for path, room, imports in _modules():
        if room not in ALLOWED_THIRD_PARTY:
            continue
        for name in imports:
            top = name.split(".")[0]
            if top not in stdlib and top != "dicomnode" and top not in ALLOWED_THIRD_PARTY[room]:
                violations.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert violations == []


def _io_imports(imports: list[str]) -> list[str]:
    return [n for n in imports if n in IO_MODULES or n.split(".")[0] in IO_MODULES - {"urllib"}]


def test_governance_does_no_io():
    violations = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path, room, imports in _modules()
        if room == "governance"
        for name in _io_imports(imports)
    ]
    assert violations == []


# Attributes layer 4 never touches: the archive itself, and the archive's ways to a blob's Path
# (readers get streams from egress, analyzers staged copies from the records room).
BLOB_PATHS = {"archive", "blob_file", "held_file"}


def _archive_reaches(path: Path) -> list[str]:
    """Where `path` reaches the archive room: an import of ``dicomnode.archive`` (absolute,
    relative or ``from dicomnode import archive``) or an attribute named ``archive``
    (``ctx.egress.archive``, ``services().archive.index``), with its line number."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: dicomnode/<room>/.../x.py, so level 2 is dicomnode.
                package = path.relative_to(PACKAGE.parent).with_suffix("").parts[: -node.level]
                module = ".".join([*package, module] if module else package)
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Attribute) and node.attr in BLOB_PATHS:
            found.append(f"{node.lineno}: .{node.attr}")
        found += [
            f"{node.lineno}: import {name}"
            for name in names
            if name == "dicomnode.archive" or name.startswith("dicomnode.archive.")
        ][:1]
    return found


def test_layer_four_never_reaches_the_archive():
    """scp, dicomweb and analysis get what they read and write through the layer-3 rooms
    (intake, egress, stewardship, casework, records): no import of dicomnode.archive, and no
    `.archive` attribute (which would reach it through a room's back door)."""
    violations = [
        f"{path.relative_to(PACKAGE)}:{where}"
        for path, room, _ in _modules()
        if LAYERS[room] == 4
        for where in _archive_reaches(path)
    ]
    assert violations == []


def test_the_archive_check_catches_what_it_should():
    root = PACKAGE / "scp"
    probes = {
        "from dicomnode.archive import Archive": ["1: import dicomnode.archive"],
        "import dicomnode.archive.jobs": ["1: import dicomnode.archive.jobs"],
        "from dicomnode import archive": ["1: import dicomnode.archive"],
        "from ..archive.keys import sign_json": ["1: import dicomnode.archive.keys"],
        "from .. import archive": ["1: import dicomnode.archive"],
        "x = ctx.egress.archive.blob_file(i)": ["1: .blob_file", "1: .archive"],
        "audit = services().archive\nfrom dicomnode.core import model": ["1: .archive"],
        "from dicomnode.core.attributes import INDEXED\narchive = 1": [],
        "from dicomnode.archivist import x": [],
        "path = services().egress.gate.blob_file(item)": ["1: .blob_file"],
    }
    for text, expected in probes.items():
        probe = root / "_layering_probe.py"
        try:
            probe.write_text(text + "\n")
            assert _archive_reaches(probe) == expected, text
        finally:
            probe.unlink()


def test_the_check_catches_what_it_should(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from dicomnode.archive import Archive\nfrom dicomnode import egress\nimport os\n"
    )
    imports = _imports(probe)
    assert _upward_imports("core", imports) == ["dicomnode.archive", "dicomnode.egress"]
    assert _upward_imports("intake", imports) == ["dicomnode.egress"]  # a neighbour on layer 3
    assert _upward_imports("scp", imports) == []
    assert _io_imports(imports) == ["os"]
    assert _io_imports(["urllib.parse", "urllib.request", "time", "datetime"]) == [
        "urllib.request",
        "time",
    ]
