"""The node's settings: one TOML file read once into one frozen, typed object.

Every key is declared once, in `sections.py` (its type, default, check and doc), and read by one
generic reader (`reader.py`); `config/dicomnode.toml` and README's settings reference are checked
against that table. With no file the embedded default runs: SQLite and files under
``./dicomnode-data``, DIMSE on 127.0.0.1:11112, HTTP on 127.0.0.1:8080.
`read_settings` raises ConfigError for the first problem; `check_settings` lists them all.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from dicomnode.config.reader import parse
from dicomnode.config.sections import (
    ANALYZER_FIT_KEYS,
    DIMSE_SERVICES,
    DUPLICATE_POLICIES,
    LOG_FORMATS,
    LOG_LEVELS,
    SYSLOG_PROTOCOLS,
    AnalysisSettings,
    AnalyzerSettings,
    AuditSettings,
    AuthSettings,
    DatabaseSettings,
    DimseSettings,
    DpoSettings,
    GovernanceSettings,
    HttpSettings,
    LoggingSettings,
    NodeSettings,
    Peer,
    Settings,
    StorageSettings,
    TLSSettings,
)
from dicomnode.core.errors import ConfigError

__all__ = [
    "ANALYZER_FIT_KEYS",
    "CONFIG_ENV",
    "DIMSE_SERVICES",
    "DUPLICATE_POLICIES",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "SYSLOG_PROTOCOLS",
    "AnalysisSettings",
    "AnalyzerSettings",
    "AuditSettings",
    "AuthSettings",
    "ConfigError",
    "DatabaseSettings",
    "DimseSettings",
    "DpoSettings",
    "GovernanceSettings",
    "HttpSettings",
    "LoggingSettings",
    "StorageSettings",
    "NodeSettings",
    "Peer",
    "Settings",
    "TLSSettings",
    "check_settings",
    "read_settings",
]

CONFIG_ENV = "DICOMNODE_CONFIG"


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"not valid TOML: {e}") from None


def check_settings(path: Path) -> list[ConfigError]:
    """Every problem in the file at `path`, each naming its key; empty when the file is good."""
    try:
        data = _load_toml(path)
    except ConfigError as e:
        return [e]
    return parse(data, Path.cwd())[1]


def read_settings(path: Path | str | None = None) -> Settings:
    """Settings from `path`, else from $DICOMNODE_CONFIG, else the embedded default.

    Relative paths in the file (data_dir, TLS files, a SQLite URL) are relative to the
    working directory, as hospital IT expects from a service started in its own folder.
    """
    if path is None and os.environ.get(CONFIG_ENV):
        path = os.environ[CONFIG_ENV]
    data = _load_toml(Path(path)) if path is not None else {}
    settings, problems = parse(data, Path.cwd())
    if problems:
        raise problems[0]
    if path is not None:
        settings = Settings(**{**settings.__dict__, "source": Path(path)})
    return settings
