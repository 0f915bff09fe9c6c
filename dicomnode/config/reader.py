"""One generic reader for every section of the description table, and the checks that span
several keys."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from dicomnode.config.describe import Setting, Table
from dicomnode.config.sections import (
    AuditSettings,
    AuthSettings,
    DatabaseSettings,
    DpoSettings,
    Settings,
    StorageSettings,
    TLSSettings,
)
from dicomnode.core.errors import ConfigError

_MISSING = object()


class Reader:
    """Walks a TOML table against a section's dataclass, converting values and collecting every
    problem with its key."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.problems: list[ConfigError] = []

    def fail(self, key: str, message: str) -> None:
        self.problems.append(ConfigError(key, message))

    def table(self, data: dict[str, Any], key: str, name: str) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.fail(name, f"must be a table, got {type(value).__name__}")
            return {}
        return value

    def value(self, raw: dict[str, Any], prefix: str, name: str, s: Setting) -> Any:
        """The key's value, converted; its default when absent or wrong (a problem noted)."""
        key = f"{prefix}{name}"
        if name not in raw:
            if s.required:
                where = prefix.rstrip(".")
                self.fail(
                    key, "is required" if "[" in where else f"is required when [{where}] is present"
                )
            return self._default(s)
        value = raw[name]
        if problem := self._problem(value, s):
            self.fail(key, problem)
            return self._default(s)
        value = s.kind.convert(value, self.base)
        return s.convert(value) if s.convert is not None else value

    def _default(self, s: Setting) -> Any:
        if s.required:  # a placeholder: the missing key is already a problem
            return s.kind.convert(s.kind.empty, self.base)
        return self.base / s.default if isinstance(s.default, Path) else s.default

    def _problem(self, value: Any, s: Setting) -> str | None:
        kinds = s.kind.types
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            return f"must be {names}, got {type(value).__name__} {value!r}"
        if s.kind.items:
            values = value.values() if isinstance(value, dict) else value
            if any(not isinstance(v, str) or not v.strip() for v in values):
                return s.hint or "must be a list of non-empty strings"
        for check in (s.kind.check, s.check):
            if check is not None and (message := check(value)):
                return message
        if s.must_exist and value and not (self.base / value).is_file():
            return f"file not found: {self.base / value}"
        return None

    def section(self, cls: type, raw: dict[str, Any], prefix: str) -> Any:
        """An instance of `cls` read from `raw`, the TOML table at `prefix`."""
        values: dict[str, Any] = {}
        known: set[str] = set()
        for f in fields(cls):
            meta = f.metadata
            if "setting" in meta:
                known.add(f.name)
                values[f.name] = self.value(raw, prefix, f.name, meta["setting"])
            elif "group" in meta:
                known |= set(meta["group"])
                values[f.name] = {
                    name: self.value(raw, prefix, name, s)
                    for name, s in meta["group"].items()
                    if name in raw
                }
            elif "table" in meta:
                known.add(f.name)
                values[f.name] = self._inner(meta["table"], raw, f"{prefix}{f.name}")
        for key in raw:
            if key not in known:
                self.fail(f"{prefix}{key}", "unknown key")
        if (finish := _FINISH.get(cls)) is not None:
            finish(self, raw, values)
        return cls(**values)

    def _inner(self, table: Table, raw: dict[str, Any], key: str) -> Any:
        name = key.rsplit(".", 1)[-1]
        if table.shape == "one":
            if table.optional and name not in raw:
                return None
            return self.section(table.cls, self.table(raw, name, key), f"{key}.")
        if table.shape == "named":
            found = []
            for entry, inner in self.table(raw, name, key).items():
                if not isinstance(inner, dict):
                    self.fail(f"{key}.{entry}", "must be a table")
                    continue
                found.append((entry, self.section(table.cls, inner, f"{key}.{entry}.")))
            return tuple(found)
        entries = raw.get(name, [])
        if not isinstance(entries, list):
            self.fail(key, f"must be an array of tables ([[{key}]])")
            return ()
        found = []
        for i, inner in enumerate(entries):
            if not isinstance(inner, dict):
                self.fail(f"{key}[{i}]", "must be a table")
                continue
            found.append(self.section(table.cls, inner, f"{key}[{i}]."))
        return tuple(found)


def _tls(r: Reader, raw: dict[str, Any], values: dict[str, Any]) -> None:
    if values["require_client_cert"] and values["ca_file"] is None:
        r.fail("dimse.tls.require_client_cert", "needs dimse.tls.ca_file to verify clients")


def _auth(r: Reader, raw: dict[str, Any], values: dict[str, Any]) -> None:
    external = [k for k in ("issuer", "jwks_url", "audience") if values[k]]
    if external and len(external) < 3:
        missing = sorted({"issuer", "jwks_url", "audience"} - set(external))
        r.fail(f"auth.{missing[0]}", "issuer, jwks_url and audience are needed together for OIDC")
    url = values["jwks_url"]
    if url and not url.startswith(("https://", "http://")):
        r.fail("auth.jwks_url", f"must be an http(s) URL, got {url!r}")


def _database(r: Reader, raw: dict[str, Any], values: dict[str, Any]) -> None:
    url = values["url"]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        url = f"sqlite:///{r.base / url.removeprefix('sqlite:///')}"
    values["url"] = url


def _storage(r: Reader, raw: dict[str, Any], values: dict[str, Any]) -> None:
    if values["backend"] != "s3":
        return
    for name in ("endpoint", "bucket", "credentials_file"):
        if not values[name]:
            r.fail(f"storage.{name}", 'is needed with backend = "s3"')


def _audit(r: Reader, raw: dict[str, Any], values: dict[str, Any]) -> None:
    protocol = values["syslog_protocol"]
    if "syslog_port" not in raw:
        values["syslog_port"] = 6514 if protocol == "tls" else 514
    for name in ("ca_file", "cert_file", "key_file"):
        if not raw.get(name) or values[name] is None:
            continue
        if protocol != "tls":
            r.fail(f"audit.{name}", 'is only used with syslog_protocol = "tls"')
        elif not values[name].is_file():
            r.fail(f"audit.{name}", f"file not found: {values[name]}")
    if values["key_file"] and not values["cert_file"]:
        r.fail("audit.key_file", "needs audit.cert_file, the certificate it belongs to")


def _dpo(r: Reader, raw: dict[str, Any], values: dict[str, Any]) -> None:
    if values["review_day_starts"] >= values["review_day_ends"]:
        r.fail("dpo.review_day_ends", "must be later than review_day_starts")
    together = ("oidc_issuer", "oidc_client_id", "oidc_client_secret_file")
    named = [k for k in together if raw.get(k)]
    if named and len(named) < 3:
        missing = sorted(set(together) - set(named))
        r.fail(
            f"dpo.{missing[0]}",
            "oidc_issuer, oidc_client_id and oidc_client_secret_file "
            "are needed together for sign-in through the hospital's OIDC provider",
        )
    if values["oidc_issuer"] and not (values["oidc_dpo_values"] or values["oidc_auditor_values"]):
        r.fail("dpo.oidc_dpo_values", "name the role claim values that make a user a DPO")
    if not values["local_accounts"] and not values["oidc_issuer"]:
        r.fail("dpo.local_accounts", "false needs an OIDC provider (dpo.oidc_issuer)")


def _across(r: Reader, raw: dict[str, Any], values: dict[str, Any]) -> None:
    """Checks and defaults that span sections."""
    audit = values["audit"]
    if not audit.audit_source_id:
        values["audit"] = replace(audit, audit_source_id=values["node"].ae_title)
    peers = values["peers"]
    for kind in ("name", "ae_title"):
        seen = [getattr(p, kind) for p in peers]
        for value in {v for v in seen if seen.count(v) > 1}:
            r.fail("peers", f"two peers share the {kind} {value!r}")
    tls = values["dimse"].tls
    for i, peer in enumerate(peers):
        if peer.certificate_bound and (tls is None or tls.ca_file is None):
            key = "certificate_name" if peer.certificate_name else "certificate_fingerprint"
            r.fail(f"peers[{i}].{key}", "needs [dimse.tls] with ca_file to verify certificates")
    for name in values["analysis"].forward_to:
        if name != "sender" and name not in {p.name for p in peers}:
            r.fail("analysis.forward_to", f"{name!r} is not the name of a [[peers]] entry")
    for i, rule in enumerate(values["access_tag_rules"]):
        key = f"access_tag_rules[{i}]"
        if not (rule.sender or rule.match or any(p.key.startswith(key) for p in r.problems)):
            r.fail(key, "names neither sender nor match: it would give its tag to every study")


# Checks that span several keys of one section, run before its dataclass is built.
_FINISH: dict[type, Callable[[Reader, dict[str, Any], dict[str, Any]], None]] = {
    TLSSettings: _tls,
    AuthSettings: _auth,
    DatabaseSettings: _database,
    StorageSettings: _storage,
    AuditSettings: _audit,
    DpoSettings: _dpo,
    Settings: _across,
}


def parse(data: dict[str, Any], base: Path) -> tuple[Settings, list[ConfigError]]:
    """Settings from a TOML document (relative paths against `base`), and every problem."""
    r = Reader(base)
    return r.section(Settings, data, ""), r.problems
