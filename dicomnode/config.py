"""The node's settings: one TOML file read once into one frozen, typed object.

Every key is documented in ``config/dicomnode.toml``. With no file the embedded default runs:
SQLite and files under ``./dicomnode-data``, DIMSE on 127.0.0.1:11112, HTTP on 127.0.0.1:8080.
`read_settings` raises ConfigError for the first problem; `check_settings` lists them all.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomnode.core.errors import ConfigError

CONFIG_ENV = "DICOMNODE_CONFIG"
DIMSE_SERVICES = ("echo", "store", "find", "move", "get")
DUPLICATE_POLICIES = ("reject", "replace")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("json", "text")
SYSLOG_PROTOCOLS = ("tls", "tcp")


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = "DICOMNODE"
    data_dir: Path = Path("dicomnode-data")
    quota_bytes: int = 0  # stored objects may take this much; 0 = no quota
    min_free_bytes: int = 256 * 1024**2  # new data is refused when less than this is free
    max_inflated_bytes: int = 128 * 1024**2  # a deflated data set inflating past this: refused
    index_busy_seconds: float = 15.0  # an ingest write waits this long for the index, then 0xA700
    name: str = ""  # this node's name in metrics and logs; empty: the host's name
    drain_seconds: float = 0.0  # on SIGTERM: /healthz answers 503 this long before stopping


@dataclass(frozen=True)
class TLSSettings:
    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: bool = False


@dataclass(frozen=True)
class DimseSettings:
    host: str = "127.0.0.1"
    port: int = 11112
    max_associations: int = 16
    require_known_peers: bool = False
    duplicate_policy: str = "reject"
    max_pdu: int = 0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    store_timeout: float = 30.0
    drain_timeout: float = 30.0
    processes: int = 1  # DIMSE processes: the main one plus N-1 workers it hands connections to
    max_associate_pdu: int = 256 * 1024  # largest PDU other than P-DATA-TF (and before association)
    pdu_timeout: float = 30.0  # seconds a PDU may take from its first byte, plus its length ...
    min_transfer_rate: int = 16 * 1024  # ... at this many bytes per second
    listen_backlog: int = 64  # connections the kernel queues before the node accepts them
    max_pending_connections: int = 32  # accepted connections without an A-ASSOCIATE-RQ yet
    sender_objects_per_minute: int = 20_000  # per calling AE title and address; 0 = no limit
    sender_bytes_per_hour: int = 100 * 1024**3  # per calling AE title and address; 0 = no limit
    proxy_protocol_from: tuple[str, ...] = ()  # balancers (IP or CIDR) that send PROXY v2
    tls: TLSSettings | None = None


@dataclass(frozen=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    threads: int = 8
    cors_origins: tuple[str, ...] = ()
    max_request_bytes: int = 4 * 1024**3
    max_part_bytes: int = 2 * 1024**3
    bulk_data_threshold: int = 1024
    public_url: str = ""
    connection_limit: int = 1000  # open connections; beyond, new ones wait in the backlog
    backlog: int = 1024  # connections the kernel queues before the server accepts them
    channel_timeout: int = 60  # seconds a connection may sit idle between requests
    header_timeout: float = 15.0  # seconds for a request's line and headers to arrive
    min_upload_rate: int = 1024  # bytes/s a request body must keep up, per header_timeout
    max_connections_per_client: int = 256  # from one address; 0: no limit (behind a proxy)
    max_decoded_bytes: int = 1024**3  # largest image (or inflated data set) decoded for an answer
    trusted_proxies: tuple[str, ...] = ()  # X-Forwarded-For honoured from these (IP or CIDR)


@dataclass(frozen=True)
class AuthSettings:
    """Bearer-token checks for every DICOMweb request.

    Tokens are accepted from the node's own signing key (issuer `local_issuer`, audience
    `local_audience`) and, when `issuer` and `jwks_url` are set, from the hospital's OIDC provider.
    """

    local_issuer: str = "dicomnode"
    local_audience: str = "dicomnode"
    issuer: str = ""
    jwks_url: str = ""
    audience: str = ""
    protect_metrics: bool = False
    leeway: int = 30


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = ""  # empty: SQLite file index.sqlite inside data_dir


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "INFO"
    format: str = "json"


@dataclass(frozen=True)
class AnalyzerSettings:
    """One analyzer's switches: run it or not, how long a unit must be quiet before it counts as
    complete, how long one run may take, and its own parameters."""

    enabled: bool = True
    quiet_period: float = 30.0
    timeout: float = 300.0
    params: dict[str, Any] = field(default_factory=dict)
    # The site's clinical-fit rules (ANALYZER_FIT_KEYS: body_parts, anatomic_regions, protocols,
    # excluded_image_types); a key set here replaces the analyzer's default for it.
    fit: dict[str, tuple[str, ...]] = field(default_factory=dict)


ANALYZER_FIT_KEYS = ("body_parts", "anatomic_regions", "protocols", "excluded_image_types")


@dataclass(frozen=True)
class AnalysisSettings:
    enabled: bool = True
    workers: int = 1
    max_attempts: int = 3
    retry_backoff: float = 30.0
    sweep_interval: float = 2.0
    analyzers: tuple[tuple[str, AnalyzerSettings], ...] = ()
    forward_to: tuple[str, ...] = ()  # peer names, or "sender": where results are sent
    lease_grace: float = 60.0  # a running job's lease is its timeout plus this; a job whose
    # worker died is claimed again when the lease runs out

    def analyzer(self, name: str) -> AnalyzerSettings:
        return dict(self.analyzers).get(name, AnalyzerSettings())


@dataclass(frozen=True)
class GovernanceSettings:
    """The governance policy file and the node's governance housekeeping."""

    policy: Path | None = None  # TOML policy; published (with its notice period) at start
    checkpoint_interval: float = 3600.0  # seconds between signed ledger checkpoints; 0 = off
    delivery_interval: float = 2.0  # seconds between looks for due deliveries
    delivery_attempts: int = 5  # tries per delivery (forward, share) before it stays failed
    delivery_backoff: float = 30.0  # seconds before the first retry; doubles each time
    retention_interval: float = 86400.0  # seconds between retention sweeps in serve; 0 = off
    stow_token_files: tuple[tuple[str, Path], ...] = ()  # recipient id -> bearer token file


@dataclass(frozen=True)
class AuditSettings:
    """DICOM audit trail messages (PS3.15 A.5): always written to a spool under data_dir and,
    with `syslog_host` set, sent from there to the hospital's audit repository by syslog
    (RFC 5424 over TLS, RFC 5425, or plain TCP, RFC 6587)."""

    enabled: bool = True
    syslog_host: str = ""  # empty: messages stay in the spool
    syslog_port: int = 6514  # 6514 for "tls", 514 for "tcp" unless set
    syslog_protocol: str = "tls"
    ca_file: Path | None = None  # empty: the system's trusted CAs
    cert_file: Path | None = None  # client certificate for mutual TLS
    key_file: Path | None = None
    check_hostname: bool = True
    retry_interval: float = 10.0
    send_timeout: float = 10.0
    spool_max_bytes: int = 1024**3
    spool_max_age_days: int = 0  # 0: no age limit
    audit_source_id: str = ""  # empty: the node's AE title
    enterprise_site_id: str = ""


@dataclass(frozen=True)
class DpoSettings:
    """The DPO's pages at /governance: sign-in (local accounts, the hospital's OIDC provider)
    and the session cookie."""

    session_hours: float = 8.0  # a sign-in lasts at most this long
    secure_cookies: bool = True  # false only to try the pages over plain HTTP off localhost
    local_accounts: bool = True  # false: only the OIDC provider signs users in
    max_failed_signins: int = 5  # failures in a row before an account is locked for a while
    lockout_minutes: float = 15.0
    oidc_issuer: str = ""  # the provider's issuer URL; empty: local accounts only
    oidc_client_id: str = ""
    oidc_client_secret_file: Path | None = None
    oidc_role_claim: str = "roles"  # claim (dotted path, e.g. realm_access.roles) with roles
    oidc_dpo_values: tuple[str, ...] = ()  # claim values that make a user a DPO
    oidc_auditor_values: tuple[str, ...] = ()  # claim values that make a user an auditor
    # the monthly access review: the node's time zone, the working day (local hours, Monday to
    # Friday; anything else is off-hours) and the instance count that makes a retrieval bulk
    review_timezone: str = "UTC"
    review_day_starts: int = 8
    review_day_ends: int = 19
    review_bulk_instances: int = 500

    @property
    def oidc_enabled(self) -> bool:
        return bool(self.oidc_issuer)


@dataclass(frozen=True)
class Peer:
    """A known DICOM AE: who may call us for which services, and where C-MOVE sends to."""

    name: str
    ae_title: str
    host: str
    port: int
    allow: tuple[str, ...] = ("echo", "store", "find", "move", "get")
    tls: bool = False


@dataclass(frozen=True)
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    dimse: DimseSettings = field(default_factory=DimseSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    governance: GovernanceSettings = field(default_factory=GovernanceSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    dpo: DpoSettings = field(default_factory=DpoSettings)
    peers: tuple[Peer, ...] = ()
    source: Path | None = None  # the file these settings came from

    @property
    def database_url(self) -> str:
        """The index URL; the default is a SQLite file inside data_dir."""
        return self.database.url or f"sqlite:///{self.node.data_dir / 'index.sqlite'}"

    def peer_by_ae_title(self, ae_title: str) -> Peer | None:
        return next((p for p in self.peers if p.ae_title == ae_title.strip()), None)


class _Reader:
    """Walks a TOML table, converting values and collecting every problem with its key."""

    def __init__(self) -> None:
        self.problems: list[ConfigError] = []

    def fail(self, key: str, message: str) -> None:
        self.problems.append(ConfigError(key, message))

    def table(self, data: dict[str, Any], key: str) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            self.fail(key, f"must be a table, got {type(value).__name__}")
            return {}
        return value

    def unknown(self, table: dict[str, Any], prefix: str, known: set[str]) -> None:
        for key in table:
            if key not in known:
                self.fail(f"{prefix}{key}", "unknown key")

    def value(
        self,
        table: dict[str, Any],
        prefix: str,
        key: str,
        kind: type | tuple[type, ...],
        default: Any,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        if key not in table:
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = False if isinstance(value, bool) and bool not in kinds else isinstance(value, kinds)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            self.fail(f"{prefix}{key}", f"must be {names}, got {type(value).__name__} {value!r}")
            return default
        if check is not None and (message := check(value)):
            self.fail(f"{prefix}{key}", message)
            return default
        return value


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else f"must be 0-65535 (0 picks a free port), got {value}"


def _process_count(value: int) -> str | None:
    return None if 1 <= value <= 64 else f"must be 1-64, got {value}"


def _positive(value: float) -> str | None:
    return None if value > 0 else f"must be greater than 0, got {value}"


def _at_least(minimum: int) -> Callable[[int], str | None]:
    def check(value: int) -> str | None:
        return None if value >= minimum else f"must be at least {minimum}"

    return check


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be 0 or more, got {value}"


def _ae_title(value: str) -> str | None:
    if not 1 <= len(value.strip()) <= 16:
        return f"must be 1-16 characters, got {value!r}"
    if "\\" in value or any(ord(c) < 32 or ord(c) > 126 for c in value):
        return f"must be printable ASCII without backslash, got {value!r}"
    return None


def _one_of(options: tuple[str, ...]) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in options else f"must be one of {', '.join(options)}; got {value!r}"

    return check


def _http_url(value: str) -> str | None:
    if not value or value.startswith(("http://", "https://")):
        return None
    return f"must be an http(s) URL such as https://pacs-gw.hospital/, got {value!r}"


def _networks(value: list[Any]) -> str | None:
    """IP addresses or networks, e.g. ["10.0.0.5", "10.1.0.0/24"]."""
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except (TypeError, ValueError):
            return f"must be a list of IP addresses or networks (CIDR), got {item!r}"
    return None


def _nonempty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _parse(data: dict[str, Any], base: Path) -> tuple[Settings, list[ConfigError]]:
    r = _Reader()
    r.unknown(
        data,
        "",
        {
            "node",
            "dimse",
            "http",
            "database",
            "logging",
            "auth",
            "analysis",
            "governance",
            "audit",
            "dpo",
            "peers",
        },
    )

    t = r.table(data, "node")
    r.unknown(t, "node.", set(NodeSettings.__dataclass_fields__))
    data_dir = Path(r.value(t, "node.", "data_dir", str, "dicomnode-data", _nonempty))
    n = NodeSettings()
    node = NodeSettings(
        ae_title=r.value(t, "node.", "ae_title", str, "DICOMNODE", _ae_title).strip(),
        data_dir=data_dir if data_dir.is_absolute() else (base / data_dir),
        quota_bytes=r.value(t, "node.", "quota_bytes", int, n.quota_bytes, _non_negative),
        min_free_bytes=r.value(t, "node.", "min_free_bytes", int, n.min_free_bytes, _non_negative),
        max_inflated_bytes=r.value(
            t, "node.", "max_inflated_bytes", int, n.max_inflated_bytes, _positive
        ),
        index_busy_seconds=float(
            r.value(t, "node.", "index_busy_seconds", (int, float), n.index_busy_seconds, _positive)
        ),
        name=r.value(t, "node.", "name", str, n.name),
        drain_seconds=float(
            r.value(t, "node.", "drain_seconds", (int, float), n.drain_seconds, _non_negative)
        ),
    )

    t = r.table(data, "dimse")
    known = {f.name for f in DimseSettings.__dataclass_fields__.values()}
    r.unknown(t, "dimse.", known)
    tls = None
    if "tls" in t:
        tt = r.table(t, "tls")
        r.unknown(tt, "dimse.tls.", {"cert_file", "key_file", "ca_file", "require_client_cert"})
        cert = r.value(tt, "dimse.tls.", "cert_file", str, "", _nonempty)
        key = r.value(tt, "dimse.tls.", "key_file", str, "", _nonempty)
        ca = r.value(tt, "dimse.tls.", "ca_file", str, "")
        for name, value in (("cert_file", cert), ("key_file", key), ("ca_file", ca)):
            if name != "ca_file" and not value:
                r.fail(f"dimse.tls.{name}", "is required when [dimse.tls] is present")
            elif value and not (base / value).is_file():
                r.fail(f"dimse.tls.{name}", f"file not found: {base / value}")
        require_client = r.value(tt, "dimse.tls.", "require_client_cert", bool, False)
        if require_client and not ca:
            r.fail("dimse.tls.require_client_cert", "needs dimse.tls.ca_file to verify clients")
        tls = TLSSettings(
            cert_file=base / cert,
            key_file=base / key,
            ca_file=(base / ca) if ca else None,
            require_client_cert=require_client,
        )
    d = DimseSettings()
    dimse = DimseSettings(
        host=r.value(t, "dimse.", "host", str, d.host, _nonempty),
        port=r.value(t, "dimse.", "port", int, d.port, _port),
        max_associations=r.value(
            t, "dimse.", "max_associations", int, d.max_associations, _positive
        ),
        require_known_peers=r.value(t, "dimse.", "require_known_peers", bool, False),
        duplicate_policy=r.value(
            t, "dimse.", "duplicate_policy", str, d.duplicate_policy, _one_of(DUPLICATE_POLICIES)
        ),
        max_pdu=r.value(t, "dimse.", "max_pdu", int, d.max_pdu, _non_negative),
        acse_timeout=float(
            r.value(t, "dimse.", "acse_timeout", (int, float), d.acse_timeout, _positive)
        ),
        dimse_timeout=float(
            r.value(t, "dimse.", "dimse_timeout", (int, float), d.dimse_timeout, _positive)
        ),
        network_timeout=float(
            r.value(t, "dimse.", "network_timeout", (int, float), d.network_timeout, _positive)
        ),
        store_timeout=float(
            r.value(t, "dimse.", "store_timeout", (int, float), d.store_timeout, _positive)
        ),
        drain_timeout=float(
            r.value(t, "dimse.", "drain_timeout", (int, float), d.drain_timeout, _non_negative)
        ),
        processes=r.value(t, "dimse.", "processes", int, d.processes, _process_count),
        max_associate_pdu=r.value(
            t, "dimse.", "max_associate_pdu", int, d.max_associate_pdu, _at_least(1024)
        ),
        pdu_timeout=float(
            r.value(t, "dimse.", "pdu_timeout", (int, float), d.pdu_timeout, _positive)
        ),
        min_transfer_rate=r.value(
            t, "dimse.", "min_transfer_rate", int, d.min_transfer_rate, _positive
        ),
        listen_backlog=r.value(t, "dimse.", "listen_backlog", int, d.listen_backlog, _positive),
        max_pending_connections=r.value(
            t, "dimse.", "max_pending_connections", int, d.max_pending_connections, _positive
        ),
        sender_objects_per_minute=r.value(
            t,
            "dimse.",
            "sender_objects_per_minute",
            int,
            d.sender_objects_per_minute,
            _non_negative,
        ),
        sender_bytes_per_hour=r.value(
            t, "dimse.", "sender_bytes_per_hour", int, d.sender_bytes_per_hour, _non_negative
        ),
        proxy_protocol_from=tuple(r.value(t, "dimse.", "proxy_protocol_from", list, [], _networks)),
        tls=tls,
    )

    t = r.table(data, "http")
    h = HttpSettings()
    r.unknown(t, "http.", set(HttpSettings.__dataclass_fields__))
    origins = r.value(t, "http.", "cors_origins", list, [])
    if any(not isinstance(o, str) or not o for o in origins):
        r.fail("http.cors_origins", 'must be a list of origins such as "https://viewer.hospital"')
        origins = []
    http = HttpSettings(
        host=r.value(t, "http.", "host", str, h.host, _nonempty),
        port=r.value(t, "http.", "port", int, h.port, _port),
        threads=r.value(t, "http.", "threads", int, h.threads, _positive),
        cors_origins=tuple(origins),
        max_request_bytes=r.value(
            t, "http.", "max_request_bytes", int, h.max_request_bytes, _positive
        ),
        max_part_bytes=r.value(t, "http.", "max_part_bytes", int, h.max_part_bytes, _positive),
        bulk_data_threshold=r.value(
            t, "http.", "bulk_data_threshold", int, h.bulk_data_threshold, _positive
        ),
        public_url=r.value(t, "http.", "public_url", str, h.public_url, _http_url),
        connection_limit=r.value(
            t, "http.", "connection_limit", int, h.connection_limit, _positive
        ),
        backlog=r.value(t, "http.", "backlog", int, h.backlog, _positive),
        channel_timeout=r.value(t, "http.", "channel_timeout", int, h.channel_timeout, _positive),
        header_timeout=float(
            r.value(t, "http.", "header_timeout", (int, float), h.header_timeout, _positive)
        ),
        min_upload_rate=r.value(
            t, "http.", "min_upload_rate", int, h.min_upload_rate, _non_negative
        ),
        max_connections_per_client=r.value(
            t,
            "http.",
            "max_connections_per_client",
            int,
            h.max_connections_per_client,
            _non_negative,
        ),
        max_decoded_bytes=r.value(
            t, "http.", "max_decoded_bytes", int, h.max_decoded_bytes, _positive
        ),
        trusted_proxies=tuple(r.value(t, "http.", "trusted_proxies", list, [], _networks)),
    )

    t = r.table(data, "auth")
    a = AuthSettings()
    r.unknown(t, "auth.", set(AuthSettings.__dataclass_fields__))
    auth = AuthSettings(
        local_issuer=r.value(t, "auth.", "local_issuer", str, a.local_issuer, _nonempty),
        local_audience=r.value(t, "auth.", "local_audience", str, a.local_audience, _nonempty),
        issuer=r.value(t, "auth.", "issuer", str, a.issuer),
        jwks_url=r.value(t, "auth.", "jwks_url", str, a.jwks_url),
        audience=r.value(t, "auth.", "audience", str, a.audience),
        protect_metrics=r.value(t, "auth.", "protect_metrics", bool, a.protect_metrics),
        leeway=r.value(t, "auth.", "leeway", int, a.leeway, _non_negative),
    )
    external = [k for k in ("issuer", "jwks_url", "audience") if getattr(auth, k)]
    if external and len(external) < 3:
        missing = sorted({"issuer", "jwks_url", "audience"} - set(external))
        r.fail(f"auth.{missing[0]}", "issuer, jwks_url and audience are needed together for OIDC")
    if auth.jwks_url and not auth.jwks_url.startswith(("https://", "http://")):
        r.fail("auth.jwks_url", f"must be an http(s) URL, got {auth.jwks_url!r}")

    t = r.table(data, "database")
    r.unknown(t, "database.", {"url"})

    def _db_url(value: str) -> str | None:
        if not value or value.startswith(("sqlite:///", "postgresql+psycopg://", "postgresql://")):
            return None
        return f"must start with sqlite:/// or postgresql+psycopg://, got {value!r}"

    url = r.value(t, "database.", "url", str, "", _db_url)
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        url = f"sqlite:///{base / url.removeprefix('sqlite:///')}"
    database = DatabaseSettings(url=url)

    t = r.table(data, "logging")
    r.unknown(t, "logging.", {"level", "format"})
    logging_settings = LoggingSettings(
        level=r.value(t, "logging.", "level", str, "INFO", _one_of(LOG_LEVELS)),
        format=r.value(t, "logging.", "format", str, "json", _one_of(LOG_FORMATS)),
    )

    t = r.table(data, "analysis")
    r.unknown(t, "analysis.", set(AnalysisSettings.__dataclass_fields__))
    an = AnalysisSettings()
    analyzers = []
    for name, table in r.table(t, "analyzers").items():
        prefix = f"analysis.analyzers.{name}."
        if not isinstance(table, dict):
            r.fail(prefix.rstrip("."), "must be a table")
            continue
        r.unknown(
            table,
            prefix,
            (set(AnalyzerSettings.__dataclass_fields__) - {"fit"}) | set(ANALYZER_FIT_KEYS),
        )
        d = AnalyzerSettings()
        fit = {}
        for key in ANALYZER_FIT_KEYS:
            if key in table:
                values = table[key]
                if not isinstance(values, list) or not all(
                    isinstance(v, str) and v.strip() for v in values
                ):
                    r.fail(f"{prefix}{key}", "must be a list of non-empty strings")
                    continue
                fit[key] = tuple(v.strip() for v in values)
        analyzers.append(
            (
                name,
                AnalyzerSettings(
                    enabled=r.value(table, prefix, "enabled", bool, d.enabled),
                    quiet_period=float(
                        r.value(
                            table,
                            prefix,
                            "quiet_period",
                            (int, float),
                            d.quiet_period,
                            _non_negative,
                        )
                    ),
                    timeout=float(
                        r.value(table, prefix, "timeout", (int, float), d.timeout, _positive)
                    ),
                    params=r.value(table, prefix, "params", dict, {}),
                    fit=fit,
                ),
            )
        )
    forward_to = r.value(t, "analysis.", "forward_to", list, [])
    if any(not isinstance(name, str) or not name for name in forward_to):
        r.fail("analysis.forward_to", 'must be a list of peer names or "sender"')
        forward_to = []
    analysis = AnalysisSettings(
        enabled=r.value(t, "analysis.", "enabled", bool, an.enabled),
        forward_to=tuple(forward_to),
        workers=r.value(t, "analysis.", "workers", int, an.workers, _non_negative),
        max_attempts=r.value(t, "analysis.", "max_attempts", int, an.max_attempts, _positive),
        retry_backoff=float(
            r.value(t, "analysis.", "retry_backoff", (int, float), an.retry_backoff, _non_negative)
        ),
        sweep_interval=float(
            r.value(t, "analysis.", "sweep_interval", (int, float), an.sweep_interval, _positive)
        ),
        lease_grace=float(
            r.value(t, "analysis.", "lease_grace", (int, float), an.lease_grace, _non_negative)
        ),
        analyzers=tuple(analyzers),
    )

    t = r.table(data, "audit")
    r.unknown(t, "audit.", set(AuditSettings.__dataclass_fields__))
    au = AuditSettings()
    protocol = r.value(
        t, "audit.", "syslog_protocol", str, au.syslog_protocol, _one_of(SYSLOG_PROTOCOLS)
    )
    audit_files: dict[str, Path | None] = {}
    for name in ("ca_file", "cert_file", "key_file"):
        value = r.value(t, "audit.", name, str, "")
        audit_files[name] = (base / value) if value else None
        if value and protocol != "tls":
            r.fail(f"audit.{name}", 'is only used with syslog_protocol = "tls"')
        elif value and not (base / value).is_file():
            r.fail(f"audit.{name}", f"file not found: {base / value}")
    if audit_files["key_file"] and not audit_files["cert_file"]:
        r.fail("audit.key_file", "needs audit.cert_file, the certificate it belongs to")

    def _syslog_port(value: int) -> str | None:
        return None if 1 <= value <= 65535 else f"must be 1-65535, got {value}"

    audit = AuditSettings(
        enabled=r.value(t, "audit.", "enabled", bool, au.enabled),
        syslog_host=r.value(t, "audit.", "syslog_host", str, au.syslog_host).strip(),
        syslog_port=r.value(
            t, "audit.", "syslog_port", int, 6514 if protocol == "tls" else 514, _syslog_port
        ),
        syslog_protocol=protocol,
        ca_file=audit_files["ca_file"],
        cert_file=audit_files["cert_file"],
        key_file=audit_files["key_file"],
        check_hostname=r.value(t, "audit.", "check_hostname", bool, au.check_hostname),
        retry_interval=float(
            r.value(t, "audit.", "retry_interval", (int, float), au.retry_interval, _positive)
        ),
        send_timeout=float(
            r.value(t, "audit.", "send_timeout", (int, float), au.send_timeout, _positive)
        ),
        spool_max_bytes=r.value(t, "audit.", "spool_max_bytes", int, au.spool_max_bytes, _positive),
        spool_max_age_days=r.value(
            t, "audit.", "spool_max_age_days", int, au.spool_max_age_days, _non_negative
        ),
        audit_source_id=(
            r.value(t, "audit.", "audit_source_id", str, au.audit_source_id).strip()
            or node.ae_title
        ),
        enterprise_site_id=r.value(
            t, "audit.", "enterprise_site_id", str, au.enterprise_site_id
        ).strip(),
    )

    peers: list[Peer] = []
    raw_peers = data.get("peers", [])
    if not isinstance(raw_peers, list):
        r.fail("peers", "must be an array of tables ([[peers]])")
        raw_peers = []
    for i, p in enumerate(raw_peers):
        prefix = f"peers[{i}]."
        if not isinstance(p, dict):
            r.fail(f"peers[{i}]", "must be a table")
            continue
        r.unknown(p, prefix, {"name", "ae_title", "host", "port", "allow", "tls"})
        for required in ("name", "ae_title", "host", "port"):
            if required not in p:
                r.fail(f"{prefix}{required}", "is required")
        allow = r.value(p, prefix, "allow", list, list(DIMSE_SERVICES))
        bad = [s for s in allow if s not in DIMSE_SERVICES]
        if bad:
            r.fail(f"{prefix}allow", f"unknown services {bad}; use {', '.join(DIMSE_SERVICES)}")
        peers.append(
            Peer(
                name=r.value(p, prefix, "name", str, f"peer{i}", _nonempty),
                ae_title=r.value(p, prefix, "ae_title", str, "", _ae_title).strip(),
                host=r.value(p, prefix, "host", str, "", _nonempty),
                port=r.value(p, prefix, "port", int, 0, _port),
                allow=tuple(s for s in allow if s in DIMSE_SERVICES),
                tls=r.value(p, prefix, "tls", bool, False),
            )
        )
    for kind in ("name", "ae_title"):
        seen = [getattr(p, kind) for p in peers]
        for value in {v for v in seen if seen.count(v) > 1}:
            r.fail("peers", f"two peers share the {kind} {value!r}")
    for name in analysis.forward_to:
        if name != "sender" and name not in {p.name for p in peers}:
            r.fail("analysis.forward_to", f"{name!r} is not the name of a [[peers]] entry")

    t = r.table(data, "governance")
    g = GovernanceSettings()
    r.unknown(t, "governance.", set(GovernanceSettings.__dataclass_fields__))
    policy_file = r.value(t, "governance.", "policy", str, "")
    if policy_file and not (base / policy_file).is_file():
        r.fail("governance.policy", f"file not found: {base / policy_file}")
    tokens = r.value(t, "governance.", "stow_token_files", dict, {})
    if any(not isinstance(v, str) or not v for v in tokens.values()):
        r.fail("governance.stow_token_files", 'must map recipient ids to files: { lab = "..." }')
        tokens = {}
    governance = GovernanceSettings(
        policy=(base / policy_file) if policy_file else None,
        checkpoint_interval=float(
            r.value(
                t,
                "governance.",
                "checkpoint_interval",
                (int, float),
                g.checkpoint_interval,
                _non_negative,
            )
        ),
        delivery_interval=float(
            r.value(
                t, "governance.", "delivery_interval", (int, float), g.delivery_interval, _positive
            )
        ),
        delivery_attempts=r.value(
            t, "governance.", "delivery_attempts", int, g.delivery_attempts, _positive
        ),
        delivery_backoff=float(
            r.value(
                t,
                "governance.",
                "delivery_backoff",
                (int, float),
                g.delivery_backoff,
                _non_negative,
            )
        ),
        stow_token_files=tuple((k, base / v) for k, v in sorted(tokens.items())),
        retention_interval=float(
            r.value(
                t,
                "governance.",
                "retention_interval",
                (int, float),
                g.retention_interval,
                _non_negative,
            )
        ),
    )

    dpo = _parse_dpo(r, r.table(data, "dpo"), base)

    settings = Settings(
        node=node,
        dimse=dimse,
        http=http,
        database=database,
        logging=logging_settings,
        auth=auth,
        analysis=analysis,
        governance=governance,
        audit=audit,
        dpo=dpo,
        peers=tuple(peers),
    )
    return settings, r.problems


def _zone(value: str) -> str | None:
    """A problem with an IANA time zone name such as Asia/Seoul, or None."""
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(value)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        return f"is not a time zone name such as Asia/Seoul: {value!r}"
    return None


def _hour(value: int) -> str | None:
    return None if 0 <= value <= 24 else f"must be an hour from 0 to 24, got {value}"


def _parse_dpo(r: _Reader, t: dict[str, Any], base: Path) -> DpoSettings:
    d = DpoSettings()
    r.unknown(t, "dpo.", set(DpoSettings.__dataclass_fields__))
    values: dict[str, tuple[str, ...]] = {}
    for key in ("oidc_dpo_values", "oidc_auditor_values"):
        listed = r.value(t, "dpo.", key, list, [])
        if any(not isinstance(v, str) or not v for v in listed):
            r.fail(f"dpo.{key}", 'must be a list of role names such as ["dpo"]')
            listed = []
        values[key] = tuple(listed)
    secret_file = r.value(t, "dpo.", "oidc_client_secret_file", str, "")
    dpo = DpoSettings(
        session_hours=float(
            r.value(t, "dpo.", "session_hours", (int, float), d.session_hours, _positive)
        ),
        secure_cookies=r.value(t, "dpo.", "secure_cookies", bool, d.secure_cookies),
        local_accounts=r.value(t, "dpo.", "local_accounts", bool, d.local_accounts),
        max_failed_signins=r.value(
            t, "dpo.", "max_failed_signins", int, d.max_failed_signins, _positive
        ),
        lockout_minutes=float(
            r.value(t, "dpo.", "lockout_minutes", (int, float), d.lockout_minutes, _positive)
        ),
        oidc_issuer=r.value(t, "dpo.", "oidc_issuer", str, "", _http_url).rstrip("/"),
        oidc_client_id=r.value(t, "dpo.", "oidc_client_id", str, ""),
        oidc_client_secret_file=(base / secret_file) if secret_file else None,
        oidc_role_claim=r.value(t, "dpo.", "oidc_role_claim", str, d.oidc_role_claim, _nonempty),
        oidc_dpo_values=values["oidc_dpo_values"],
        oidc_auditor_values=values["oidc_auditor_values"],
        review_timezone=r.value(t, "dpo.", "review_timezone", str, d.review_timezone, _zone),
        review_day_starts=r.value(t, "dpo.", "review_day_starts", int, 8, _hour),
        review_day_ends=r.value(t, "dpo.", "review_day_ends", int, 19, _hour),
        review_bulk_instances=r.value(
            t, "dpo.", "review_bulk_instances", int, d.review_bulk_instances, _positive
        ),
    )
    if dpo.review_day_starts >= dpo.review_day_ends:
        r.fail("dpo.review_day_ends", "must be later than review_day_starts")
    named = [k for k in ("oidc_issuer", "oidc_client_id", "oidc_client_secret_file") if t.get(k)]
    if named and len(named) < 3:
        missing = sorted({"oidc_issuer", "oidc_client_id", "oidc_client_secret_file"} - set(named))
        r.fail(
            f"dpo.{missing[0]}",
            "oidc_issuer, oidc_client_id and oidc_client_secret_file "
            "are needed together for sign-in through the hospital's OIDC provider",
        )
    if dpo.oidc_client_secret_file is not None and not dpo.oidc_client_secret_file.is_file():
        r.fail("dpo.oidc_client_secret_file", f"file not found: {dpo.oidc_client_secret_file}")
    if dpo.oidc_issuer and not (dpo.oidc_dpo_values or dpo.oidc_auditor_values):
        r.fail("dpo.oidc_dpo_values", "name the role claim values that make a user a DPO")
    if not dpo.local_accounts and not dpo.oidc_issuer:
        r.fail("dpo.local_accounts", "false needs an OIDC provider (dpo.oidc_issuer)")
    return dpo


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
    return _parse(data, Path.cwd())[1]


def read_settings(path: Path | str | None = None) -> Settings:
    """Settings from `path`, else from $DICOMNODE_CONFIG, else the embedded default.

    Relative paths in the file (data_dir, TLS files, a SQLite URL) are relative to the
    working directory, as hospital IT expects from a service started in its own folder.
    """
    if path is None and os.environ.get(CONFIG_ENV):
        path = os.environ[CONFIG_ENV]
    data = _load_toml(Path(path)) if path is not None else {}
    settings, problems = _parse(data, Path.cwd())
    if problems:
        raise problems[0]
    if path is not None:
        settings = Settings(**{**settings.__dict__, "source": Path(path)})
    return settings
