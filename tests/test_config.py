"""The settings file: the contract keys, the embedded default, and clear errors naming the key."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from dicomnode.config import Settings, check_settings, read_settings
from dicomnode.config.describe import Heading, describe, keys, remote_port, setting
from dicomnode.config.reader import Reader
from dicomnode.core.enums import DuplicatePolicy
from dicomnode.core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

CONTRACT = """
[node]
ae_title = "DICOMNODE"
data_dir = "dicomnode-data"

[dimse]
host = "127.0.0.1"
port = 11112
max_associations = 16

[http]
host = "127.0.0.1"
port = 8080

[database]
url = "sqlite:///dicomnode-data/index.sqlite"

[[peers]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 11113
allow = ["echo", "store", "find", "move", "get"]
"""


def test_embedded_default_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DICOMNODE_CONFIG", raising=False)
    settings = read_settings()
    assert settings.node.ae_title == "DICOMNODE"
    assert settings.node.data_dir == tmp_path / "dicomnode-data"
    assert (settings.dimse.host, settings.dimse.port) == ("127.0.0.1", 11112)
    assert (settings.http.host, settings.http.port) == ("127.0.0.1", 8080)
    assert settings.database_url == f"sqlite:///{tmp_path / 'dicomnode-data' / 'index.sqlite'}"
    assert settings.peers == ()


def test_contract_keys_are_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "node.toml"
    path.write_text(CONTRACT)
    settings = read_settings(path)
    assert settings.dimse.max_associations == 16
    assert settings.database_url == f"sqlite:///{tmp_path / 'dicomnode-data' / 'index.sqlite'}"
    (peer,) = settings.peers
    assert (peer.name, peer.ae_title, peer.host, peer.port) == ("pacs", "PACS", "127.0.0.1", 11113)
    assert peer.allow == ("echo", "store", "find", "move", "get")
    assert settings.peer_by_ae_title("PACS ") == peer


def test_environment_variable_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "env.toml"
    path.write_text('[node]\nae_title = "FROMENV"\n')
    monkeypatch.setenv("DICOMNODE_CONFIG", str(path))
    assert read_settings().node.ae_title == "FROMENV"


def test_shipped_example_file_is_valid_and_matches_the_defaults(monkeypatch):
    monkeypatch.delenv("DICOMNODE_CONFIG", raising=False)
    assert check_settings(REPO / "config" / "dicomnode.toml") == []
    shipped = read_settings(REPO / "config" / "dicomnode.toml")
    default = read_settings(None)
    sections = [f.name for f in fields(Settings) if "table" in f.metadata]
    assert {"node", "dimse", "http", "database", "logging", "auth", "audit", "dpo"} <= set(sections)
    for section in sections:
        assert getattr(shipped, section) == getattr(default, section), section


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('[node]\ncolour = "blue"\n', "node.colour", "unknown key"),
        ("[dimse]\nport = 'x'\n", "dimse.port", "must be int"),
        ("[dimse]\nport = 70000\n", "dimse.port", "0-65535"),
        ("[dimse]\nmax_associations = 0\n", "dimse.max_associations", "greater than 0"),
        ("[dimse]\nprocesses = 0\n", "dimse.processes", "1-64"),
        ("[dimse]\nrequire_known_peers = 1\n", "dimse.require_known_peers", "must be bool"),
        ('[dimse]\nduplicate_policy = "maybe"\n', "dimse.duplicate_policy", "reject, replace"),
        ('[node]\nae_title = "MUCH_TOO_LONG_AE_TITLE"\n', "node.ae_title", "1-16"),
        ('[database]\nurl = "mysql://x"\n', "database.url", "sqlite:///"),
        ('[[peers]]\nname = "p"\nae_title = "P"\nhost = "h"\n', "peers[0].port", "required"),
        (
            '[[peers]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 1\nallow = ["fly"]\n',
            "peers[0].allow",
            "unknown services",
        ),
        ('[dimse.tls]\ncert_file = "missing.pem"\n', "dimse.tls.cert_file", "file not found"),
        ("[http]\nport = true\n", "http.port", "must be int"),
        ('[audit]\ncolour = "blue"\n', "audit.colour", "unknown key"),
        ('[audit]\nsyslog_protocol = "udp"\n', "audit.syslog_protocol", "tls, tcp"),
        ("[audit]\nsyslog_port = 0\n", "audit.syslog_port", "1-65535"),
        ('[audit]\nca_file = "missing.pem"\n', "audit.ca_file", "file not found"),
        ('[audit]\nsyslog_protocol = "tcp"\nca_file = "x.pem"\n', "audit.ca_file", "only used"),
        (
            '[audit]\nkey_file = "config/dicomnode.toml"\n',
            "audit.key_file",
            "needs audit.cert_file",
        ),
        ("[audit]\nretry_interval = 0\n", "audit.retry_interval", "greater than 0"),
        ("[audit]\nspool_max_age_days = -1\n", "audit.spool_max_age_days", "0 or more"),
        ("[audit]\nenabled = 1\n", "audit.enabled", "must be bool"),
    ],
)
def test_each_problem_names_its_key(tmp_path, text, key, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    problems = check_settings(path)
    assert any(p.key == key and words in str(p) for p in problems), problems
    with pytest.raises(ConfigError) as raised:
        read_settings(path)
    assert raised.value.key in {p.key for p in problems}


def test_two_peers_with_one_ae_title_are_refused(tmp_path):
    peer = '[[peers]]\nname = "{n}"\nae_title = "SAME"\nhost = "h"\nport = 1\n'
    path = tmp_path / "peers.toml"
    path.write_text(peer.format(n="a") + peer.format(n="b"))
    assert any("ae_title 'SAME'" in str(p) for p in check_settings(path))


def test_not_toml_is_reported(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[node\n")
    (problem,) = check_settings(path)
    assert "not valid TOML" in str(problem)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_config_check_command_exit_codes(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(CONTRACT)
    result = _cli("config", "check", str(good))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text('[dimse]\nport = "x"\nduplicate_policy = "maybe"\n[node]\nextra = 1\n')
    result = _cli("config", "check", str(bad))
    assert result.returncode != 0
    for key in ("dimse.port", "dimse.duplicate_policy", "node.extra"):
        assert key in result.stderr
    assert "3 problem(s)" in result.stderr


def test_serve_refuses_a_bad_file_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[dimse]\nport = -1\n")
    result = _cli("serve", "--config", str(bad))
    assert result.returncode == 2
    assert "dimse.port" in result.stderr


def test_audit_defaults_follow_the_protocol_and_the_node(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ca.pem").write_text("not checked here")
    path = tmp_path / "audit.toml"
    path.write_text('[node]\nae_title = "NODE7"\n[audit]\nsyslog_host = "arr.hospital"\n')
    audit = read_settings(path).audit
    assert (audit.syslog_protocol, audit.syslog_port, audit.audit_source_id) == (
        "tls",
        6514,
        "NODE7",
    )
    path.write_text(
        '[audit]\nsyslog_host = "arr"\nsyslog_protocol = "tcp"\naudit_source_id = "SITE-A"\n'
    )
    audit = read_settings(path).audit
    assert (audit.syslog_port, audit.audit_source_id, audit.ca_file) == (514, "SITE-A", None)
    path.write_text('[audit]\nsyslog_host = "arr"\nca_file = "ca.pem"\n')
    assert read_settings(path).audit.ca_file == tmp_path / "ca.pem"


def test_the_dpo_pages_oidc_settings_are_read_together(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are relative to the working directory
    (tmp_path / "secret").write_text("s3cret\n")
    path = tmp_path / "dpo.toml"
    path.write_text(
        "[dpo]\n"
        'oidc_issuer = "https://sso.hospital.example/realms/staff/"\n'
        'oidc_client_id = "dicomnode"\n'
        'oidc_client_secret_file = "secret"\n'
        'oidc_role_claim = "realm_access.roles"\n'
        'oidc_dpo_values = ["dpo"]\n'
        "session_hours = 4\n"
    )
    assert check_settings(path) == []
    dpo = read_settings(path).dpo
    assert dpo.oidc_enabled and dpo.oidc_issuer == "https://sso.hospital.example/realms/staff"
    assert dpo.oidc_client_secret_file == tmp_path / "secret"
    assert (dpo.oidc_dpo_values, dpo.oidc_auditor_values, dpo.session_hours) == (("dpo",), (), 4)
    assert read_settings(None).dpo.secure_cookies and not read_settings(None).dpo.oidc_enabled
    no_roles = tmp_path / "no-roles.toml"
    no_roles.write_text(path.read_text().replace('oidc_dpo_values = ["dpo"]\n', ""))
    assert [p.key for p in check_settings(no_roles)] == ["dpo.oidc_dpo_values"]


# The description table (dicomnode/config/sections.py) is the one list of settings: the shipped
# example, README's reference and the reader all follow it (as datasette derives its docs tests).


def _example_keys() -> set[str]:
    """Every key config/dicomnode.toml shows, set or commented out, as section.name."""
    keys, section = set(), ""
    for line in (REPO / "config" / "dicomnode.toml").read_text().splitlines():
        text = line.lstrip("#").strip() if line.startswith("# [") or line.startswith("[") else line
        if text.startswith("["):
            section = text.strip("[]").split("]")[0]
            if section.startswith("analysis.analyzers."):
                section = "analysis.analyzers.NAME"
            continue
        match = re.match(r"^#? ?([a-z_]+) = ", line)
        if match:
            keys.add(f"{section}.{match.group(1)}")
    return keys


def test_every_setting_is_in_the_shipped_example_and_nothing_else():
    described = {d.key for d in keys(Settings)}
    shown = _example_keys()
    assert len(described) > 100
    assert described - shown == set(), "add these to config/dicomnode.toml"
    assert shown - described == set(), "config/dicomnode.toml shows keys the node does not read"


def test_readme_settings_reference_is_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location(
        "gen_settings_reference", REPO / "tools" / "gen_settings_reference.py"
    )
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    readme = (REPO / "README.md").read_text()
    assert generator.current(readme) == generator.render(), (
        "run python tools/gen_settings_reference.py"
    )
    section = generator.current(readme)
    for d in keys(Settings):
        assert f"| `{d.name}` |" in section, d.key
    for heading in ("[node]", "[dimse.tls]", "[analysis.analyzers.NAME]", "[[peers]]"):
        assert f"#### `{heading}`" in section


def test_every_field_of_a_section_is_described():
    for entry in describe(Settings):
        if isinstance(entry, Heading):
            continue
        assert entry.setting.doc, entry.key
    tables = [Settings] + [
        f.metadata["table"].cls for cls in _sections() for f in fields(cls) if "table" in f.metadata
    ]
    for cls in set(tables):
        for f in fields(cls):
            if cls is Settings and f.name == "source":
                continue
            assert {"setting", "group", "table"} & set(f.metadata), f"{cls.__name__}.{f.name}"


def _sections() -> list[type]:
    found, todo = [], [Settings]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += [f.metadata["table"].cls for f in fields(cls) if "table" in f.metadata]
    return found


@dataclass(frozen=True)
class _NewSection:
    port: int = setting(104, "a port", check=remote_port)
    mode: DuplicatePolicy = setting(DuplicatePolicy.REPLACE, "a choice")
    names: tuple[str, ...] = setting((), "some names")


def test_a_key_is_one_field_read_by_the_generic_reader(tmp_path):
    reader = Reader(tmp_path)
    read = reader.section(_NewSection, {"port": 11112, "mode": "reject", "names": ["a"]}, "new.")
    assert read == _NewSection(11112, DuplicatePolicy.REJECT, ("a",)) and not reader.problems
    assert isinstance(read.mode, DuplicatePolicy)
    assert reader.section(_NewSection, {}, "new.") == _NewSection()
    reader.section(_NewSection, {"port": 0, "mode": "keep", "names": [""], "x": 1}, "new.")
    assert [str(p) for p in reader.problems] == [
        "new.port: must be 1-65535, got 0",
        "new.mode: must be one of reject, replace; got 'keep'",
        "new.names: must be a list of non-empty strings",
        "new.x: unknown key",
    ]


def test_duplicate_policy_is_read_as_its_enum(tmp_path):
    path = tmp_path / "dup.toml"
    path.write_text('[dimse]\nduplicate_policy = "replace"\n')
    policy = read_settings(path).dimse.duplicate_policy
    assert policy is DuplicatePolicy.REPLACE and policy == "replace"
    assert read_settings(None).dimse.duplicate_policy is DuplicatePolicy.REJECT
