"""The settings description table: every section's dataclass, every key declared once.

A key is one field: `name: type = setting(default, "doc", check=...)`. To add a key, add its
field here (and its commented line to config/dicomnode.toml, then run
`python tools/gen_settings_reference.py` for README); to add a section, add its dataclass and
one `section(...)` field to `Settings`. Cross-key checks live in `reader.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomnode.config import describe as d
from dicomnode.config.describe import array, grouped, item, named_sections, section, setting
from dicomnode.core.enums import DuplicatePolicy

DIMSE_SERVICES = ("echo", "store", "find", "move", "get")
DUPLICATE_POLICIES = tuple(p.value for p in DuplicatePolicy)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("json", "text")
SYSLOG_PROTOCOLS = ("tls", "tcp")
ANALYZER_FIT_KEYS = ("body_parts", "anatomic_regions", "protocols", "excluded_image_types")
_NAMES = "must be a list of non-empty strings"


def _strip(value: str) -> str:
    return value.strip()


def _fingerprint(value: str) -> str:
    """A SHA-256 fingerprint as lower-case hex without separators."""
    return value.replace(":", "").replace(" ", "").strip().lower()


def _sha256_fingerprint(value: str) -> str | None:
    hex_digits = _fingerprint(value)
    if value and (len(hex_digits) != 64 or any(c not in "0123456789abcdef" for c in hex_digits)):
        return "must be a SHA-256 fingerprint: 64 hex digits (colons allowed)"
    return None


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = setting(
        "DICOMNODE",
        "the node's own AE title (1-16 printable ASCII characters)",
        check=d.ae_title,
        convert=_strip,
    )
    data_dir: Path = setting(
        Path("dicomnode-data"),
        "blobs, the SQLite index and the node's keys live here",
        check=d.nonempty,
    )
    quota_bytes: int = setting(
        0,
        "stored objects may take this much; beyond it new objects are refused (0xA700, /healthz "
        "503), nothing is deleted to make room; 0 = no quota",
        check=d.non_negative,
    )
    min_free_bytes: int = setting(
        256 * 1024**2, "new objects are refused when the disk has less free", check=d.non_negative
    )
    max_inflated_bytes: int = setting(
        128 * 1024**2,
        "a deflated data set inflating past this is refused (0xC000, STOW-RS part failure)",
        check=d.positive,
    )
    index_busy_seconds: float = setting(
        15.0,
        "an object whose index write waits longer for the index is refused (0xA700 / 503)",
        check=d.positive,
    )
    name: str = setting(
        "", "this node's name: the node label of metrics and log lines; empty: the host's name"
    )
    drain_seconds: float = setting(
        0.0,
        "on SIGTERM: seconds /healthz answers 503 draining while the node still serves, before "
        "it stops accepting (past the balancer's detection window)",
        check=d.non_negative,
    )
    lease_seconds: float = setting(
        30.0,
        "housekeeping that must run once (retention sweeps, ledger checkpoints) runs on the node "
        "holding the leader lease; another node takes over this long after the holder stops",
        check=d.positive,
    )


@dataclass(frozen=True)
class TLSSettings:
    cert_file: Path = setting(
        "", "the node's certificate (PEM)", kind=d.PATH, required=True, must_exist=True
    )
    key_file: Path = setting(
        "", "its private key (PEM)", kind=d.PATH, required=True, must_exist=True
    )
    ca_file: Path | None = setting(
        None,
        "CA that signs the peers' client certificates",
        kind=d.OPTIONAL_PATH,
        must_exist=True,
    )
    require_client_cert: bool = setting(
        False, "true: refuse peers without a certificate from ca_file"
    )


@dataclass(frozen=True)
class DimseSettings:
    host: str = setting(
        "127.0.0.1", 'address to listen on; "0.0.0.0" for every interface', check=d.nonempty
    )
    port: int = setting(
        11112, "0 picks a free port; the chosen port is logged (ready line)", check=d.port
    )
    max_associations: int = setting(
        16, "concurrent associations (per process); more are rejected", check=d.positive
    )
    require_known_peers: bool = setting(
        False, "true: only AE titles listed in [[peers]] may associate"
    )
    duplicate_policy: DuplicatePolicy = setting(
        DuplicatePolicy.REJECT,
        "a DIFFERENT object under a stored SOP Instance UID: reject (0x0111, stored object "
        "kept) or replace; an identical re-send always succeeds",
    )
    max_pdu: int = setting(0, "largest PDU we accept, in bytes; 0 = no limit", check=d.non_negative)
    acse_timeout: float = setting(
        30.0, "seconds to wait for association messages", check=d.positive
    )
    dimse_timeout: float = setting(60.0, "seconds to wait for DIMSE messages", check=d.positive)
    network_timeout: float = setting(
        60.0, "seconds an idle association is kept open", check=d.positive
    )
    store_timeout: float = setting(
        30.0,
        "seconds to wait for each C-STORE sub-operation response of a C-MOVE or C-GET",
        check=d.positive,
    )
    drain_timeout: float = setting(
        30.0, "on SIGTERM: seconds open associations may take to finish", check=d.non_negative
    )
    processes: int = setting(
        1,
        "DIMSE processes: the main one plus N-1 workers it hands connections to",
        check=d.process_count,
    )
    max_associate_pdu: int = setting(
        256 * 1024,
        "largest PDU other than P-DATA-TF, and of any type before an association is agreed; "
        "longer: A-ABORT",
        check=d.at_least(1024),
    )
    pdu_timeout: float = setting(
        30.0, "seconds a PDU may take from its first byte, plus ...", check=d.positive
    )
    min_transfer_rate: int = setting(
        16 * 1024, "... its length at this many bytes/s; slower: A-ABORT", check=d.positive
    )
    listen_backlog: int = setting(
        64, "connections the kernel queues until the node accepts", check=d.positive
    )
    max_pending_connections: int = setting(
        32,
        "accepted connections that have not sent their A-ASSOCIATE-RQ yet; more are closed",
        check=d.positive,
    )
    sender_objects_per_minute: int = setting(
        20_000,
        "C-STOREs per calling AE title and address in any minute; more: 0xA700; 0 = no limit",
        check=d.non_negative,
    )
    sender_bytes_per_hour: int = setting(
        100 * 1024**3,
        "data set bytes per calling AE title and address in any hour; more: 0xA700; 0 = no limit",
        check=d.non_negative,
    )
    proxy_protocol_from: tuple[str, ...] = setting(
        (),
        "load balancers (IP or CIDR) whose connections start with a PROXY protocol v2 header; "
        "[] = no PROXY protocol",
        check=d.networks,
    )
    plain_networks: tuple[str, ...] | None = setting(
        None,
        "networks (IP or CIDR) whose plain TCP associations are accepted; from elsewhere only "
        "TLS: a plain association gets A-ASSOCIATE-RJ and a 110113 alert",
        kind=d.STRINGS,
        check=d.networks,
        shown="every network without [dimse.tls]; none with it",
    )
    tls: TLSSettings | None = section(
        TLSSettings,
        "Optional TLS for DIMSE (DICOM PS3.15 B.1). Without this table DIMSE is plain TCP; "
        "with it the port takes TLS, and plain TCP from dimse.plain_networks.",
        optional=True,
    )

    @property
    def plain_tcp_from(self) -> tuple[str, ...]:
        """The networks whose plain TCP associations are accepted (`plain_networks`, or by
        default every network without TLS and none with it)."""
        if self.plain_networks is not None:
            return self.plain_networks
        return () if self.tls is not None else ("0.0.0.0/0", "::/0")


@dataclass(frozen=True)
class HttpSettings:
    host: str = setting(
        "127.0.0.1", "HTTP (DICOMweb, health, metrics) listen address", check=d.nonempty
    )
    port: int = setting(8080, "0 picks a free port; logged like the DIMSE port", check=d.port)
    threads: int = setting(8, "worker threads of the WSGI server (waitress)", check=d.positive)
    cors_origins: tuple[str, ...] = setting(
        (),
        "browser viewers on other origins that may call DICOMweb",
        hint='must be a list of origins such as "https://viewer.hospital"',
    )
    max_request_bytes: int = setting(
        4 * 1024**3, "largest request body (STOW-RS upload); larger: 413", check=d.positive
    )
    max_part_bytes: int = setting(
        2 * 1024**3, "largest single part of a STOW-RS body; larger: 413", check=d.positive
    )
    bulk_data_threshold: int = setting(
        1024,
        "binary values larger than this (bytes) appear in WADO-RS metadata as BulkDataURIs",
        check=d.positive,
    )
    public_url: str = setting(
        "",
        "the node's URL as clients see it behind a proxy (RetrieveURL, BulkDataURI); empty: "
        "the address each client used",
        check=d.http_url,
    )
    connection_limit: int = setting(
        1000, "open HTTP connections; beyond, new ones wait (backlog)", check=d.positive
    )
    backlog: int = setting(
        1024, "connections the kernel queues before they are accepted", check=d.positive
    )
    channel_timeout: int = setting(
        60, "seconds a connection may stay idle between requests", check=d.positive
    )
    header_timeout: float = setting(
        15.0, "seconds for a request's line and headers to arrive; else closed", check=d.positive
    )
    min_upload_rate: int = setting(
        1024,
        "bytes/s a request body must keep up over each header_timeout window (0: no minimum)",
        check=d.non_negative,
    )
    max_connections_per_client: int = setting(
        256, "connections from one address; more are closed (0: no limit)", check=d.non_negative
    )
    max_decoded_bytes: int = setting(
        1024**3,
        "most bytes decoded for one answer (the frames asked, read by range; a rendered "
        "image's whole object) and largest inflated data set read back; larger: 406",
        check=d.positive,
    )
    trusted_proxies: tuple[str, ...] = setting(
        (),
        "reverse proxies (IP or CIDR) whose X-Forwarded-For names the client; from anyone "
        "else it is ignored",
        check=d.networks,
    )


@dataclass(frozen=True)
class AuthSettings:
    """Bearer-token checks for every DICOMweb request.

    Tokens are accepted from the node's own signing key (issuer `local_issuer`, audience
    `local_audience`) and, when `issuer` and `jwks_url` are set, from the hospital's OIDC provider.
    """

    local_issuer: str = setting("dicomnode", '"iss" of the node\'s own tokens', check=d.nonempty)
    local_audience: str = setting("dicomnode", '"aud" of the node\'s own tokens', check=d.nonempty)
    issuer: str = setting("", "the hospital's OIDC provider; with jwks_url, audience: all or none")
    jwks_url: str = setting("", "its JWKS URL (http(s))")
    audience: str = setting("", "the audience its tokens carry for this node")
    protect_metrics: bool = setting(False, "true: GET /metrics needs a valid token (any scope)")
    leeway: int = setting(30, "seconds of clock skew allowed on exp/nbf", check=d.non_negative)


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = setting(
        "",
        "the index: sqlite:///FILE or postgresql+psycopg://USER@HOST/DB; empty: SQLite file "
        "index.sqlite inside data_dir",
        check=d.database_url,
    )
    migrate_at_start: bool = setting(
        False,
        "`dicomnode serve` brings a SQLite index to this version's schema itself; a PostgreSQL "
        "one only when true (as `dicomnode migrate` does, under its lock), else it refuses a "
        "schema that is not current",
    )


STORAGE_BACKENDS = ("filesystem", "s3")


@dataclass(frozen=True)
class StorageSettings:
    backend: str = setting(
        "filesystem",
        'where blobs live: "filesystem" (under data_dir) or "s3" (an S3-compatible bucket; '
        "the server must honour If-None-Match: *, checked at start)",
        kind=d.choice(STORAGE_BACKENDS),
    )
    endpoint: str = setting("", "s3: the server's URL, http(s)://host:port", check=d.http_url)
    bucket: str = setting("", "s3: the bucket (created beforehand, with fsync on where it can)")
    prefix: str = setting("", "s3: keys go under this prefix (e.g. one per archive)")
    region: str = setting("us-east-1", "s3: the region requests are signed for")
    credentials_file: Path | None = setting(
        None,
        "s3: an AWS-style credentials file ([default] aws_access_key_id, "
        "aws_secret_access_key); never inline",
        kind=d.OPTIONAL_PATH,
        must_exist=True,
    )
    tls_verify: bool = setting(True, "s3 over https: false skips certificate checks (tests only)")
    ca_file: Path | None = setting(
        None,
        "s3 over https: extra CA certificates (PEM) to trust",
        kind=d.OPTIONAL_PATH,
        must_exist=True,
    )
    timeout_seconds: float = setting(
        30.0,
        "s3: a request (its retries included) failing longer is a storage failure (0xA700 / 503)",
        check=d.positive,
    )
    encrypt_at_rest: bool = setting(
        False,
        "true: every blob, held object and cached metadata is encrypted with its study's data "
        "key (AES-256-GCM), and destroying a study destroys its key (crypto-shredding)",
    )
    key_store_url: str = setting(
        "",
        "with encrypt_at_rest: the database of the study data keys, apart from the index "
        "(sqlite:///FILE or postgresql+psycopg://...; one for all nodes); empty: SQLite file "
        "study-keys.sqlite inside data_dir. Back it up apart from the index and the blobs",
        check=d.database_url,
    )
    backup_purge_days: int = setting(
        35,
        "with encrypt_at_rest: a destruction queues a backup purge due this many days later "
        "(every backup of the index holding the study purged or expired by then)",
        check=d.positive,
    )


@dataclass(frozen=True)
class LoggingSettings:
    level: str = setting("INFO", "log level", kind=d.choice(LOG_LEVELS))
    format: str = setting(
        "json", "json: one JSON object per line; text: plain lines", kind=d.choice(LOG_FORMATS)
    )


def _fit_item(doc: str) -> Any:
    return item(
        (),
        doc,
        hint=_NAMES,
        convert=lambda v: tuple(s.strip() for s in v),
        shown="the analyzer's own list",
    )


@dataclass(frozen=True)
class AnalyzerSettings:
    """One analyzer's switches: run it or not, how long a unit must be quiet before it counts as
    complete, how long one run may take, and its own parameters."""

    enabled: bool = setting(True, "false: this analyzer never runs")
    quiet_period: float = setting(
        30.0, "seconds without new instances before a unit is complete", check=d.non_negative
    )
    timeout: float = setting(300.0, "seconds one run may take before it fails", check=d.positive)
    params: dict[str, Any] = setting({}, "the analyzer's own parameters")
    criteria: str = setting(
        "",
        "the site's text of the criteria and procedure of this analyzer's output, disclosed at "
        "/automated-decisions (PIPA 37-2(4)); empty: the analyzer's own text",
    )
    # The site's clinical-fit rules (ANALYZER_FIT_KEYS); a key set here replaces the analyzer's
    # default for it.
    fit: dict[str, tuple[str, ...]] = grouped(
        "which units fit the analyzer clinically",
        body_parts=_fit_item("BodyPartExamined values that fit (replaces the built-in list)"),
        anatomic_regions=_fit_item("Anatomic Region Sequence codes that fit, SCHEME:VALUE"),
        protocols=_fit_item("ProtocolName glob patterns that fit, case-insensitive"),
        excluded_image_types=_fit_item("ImageType values never analysed"),
    )


@dataclass(frozen=True)
class AnalysisSettings:
    enabled: bool = setting(True, "false: nothing is analysed and no workers run")
    workers: int = setting(
        1, "worker threads in serve that run analysis jobs", check=d.non_negative
    )
    max_attempts: int = setting(3, "tries per job before it stays failed", check=d.positive)
    retry_backoff: float = setting(
        30.0, "seconds before the first retry; doubles each time", check=d.non_negative
    )
    sweep_interval: float = setting(
        2.0, "seconds between checks for complete units", check=d.positive
    )
    analyzers: tuple[tuple[str, AnalyzerSettings], ...] = named_sections(
        AnalyzerSettings, "Per analyzer, by name (an entry point of dicomnode.analyzers)."
    )
    forward_to: tuple[str, ...] = setting(
        (),
        'where results (SEG, SR) are sent through the policy: [[peers]] names and/or "sender"',
        hint='must be a list of peer names or "sender"',
    )
    lease_grace: float = setting(
        60.0,
        "a running job's lease is its timeout plus this; a job whose worker died is claimed "
        "again after it",
        check=d.non_negative,
    )

    def analyzer(self, name: str) -> AnalyzerSettings:
        return dict(self.analyzers).get(name, AnalyzerSettings())


@dataclass(frozen=True)
class GovernanceSettings:
    """The governance policy file and the node's governance housekeeping."""

    policy: Path | None = setting(
        None,
        "a policy TOML file, published at start if its version is new",
        kind=d.OPTIONAL_PATH,
        must_exist=True,
    )
    checkpoint_interval: float = setting(
        3600.0, "seconds between signed ledger checkpoints; 0 = off", check=d.non_negative
    )
    delivery_interval: float = setting(
        2.0, "seconds between looks for due deliveries", check=d.positive
    )
    delivery_attempts: int = setting(
        5, "tries per delivery (forward, share) before it stays failed", check=d.positive
    )
    delivery_backoff: float = setting(
        30.0, "seconds before the first retry; doubles each time", check=d.non_negative
    )
    retention_interval: float = setting(
        86400.0, "seconds between retention sweeps in serve; 0 = off", check=d.non_negative
    )
    stow_token_files: tuple[tuple[str, Path], ...] = setting(
        (),
        "bearer token files for recipients reached by STOW-RS, by recipient id",
        kind=d.PATH_TABLE,
        hint='must map recipient ids to files: { lab = "..." }',
        shown="{}",
    )


@dataclass(frozen=True)
class AuditSettings:
    """DICOM audit trail messages (PS3.15 A.5): always written to a spool under data_dir and,
    with `syslog_host` set, sent from there to the hospital's audit repository by syslog
    (RFC 5424 over TLS, RFC 5425, or plain TCP, RFC 6587)."""

    enabled: bool = setting(True, "false: no audit messages are written at all")
    syslog_host: str = setting(
        "", "the repository's host name or address; empty: spool only", convert=_strip
    )
    syslog_port: int = setting(
        6514, "the repository's port", check=d.remote_port, shown='6514 ("tls"), 514 ("tcp")'
    )
    syslog_protocol: str = setting(
        "tls",
        "tls (RFC 5425) or tcp (RFC 6587, only on a trusted network)",
        kind=d.choice(SYSLOG_PROTOCOLS),
    )
    ca_file: Path | None = setting(
        None, "CA of the repository's certificate; empty: the system's CAs", kind=d.OPTIONAL_PATH
    )
    cert_file: Path | None = setting(
        None, "client certificate for mutual TLS (IHE ATNA)", kind=d.OPTIONAL_PATH
    )
    key_file: Path | None = setting(None, "its private key", kind=d.OPTIONAL_PATH)
    check_hostname: bool = setting(True, "the repository's certificate must name syslog_host")
    retry_interval: float = setting(
        10.0, "seconds before retrying; doubles, up to 16 times this", check=d.positive
    )
    send_timeout: float = setting(
        10.0, "seconds to connect, or to have a batch acknowledged", check=d.positive
    )
    spool_max_bytes: int = setting(
        1024**3,
        "past this the OLDEST spooled messages are deleted",
        check=d.positive,
    )
    spool_max_age_days: int = setting(
        0, "spooled messages older than this are deleted; 0: no age limit", check=d.non_negative
    )
    audit_source_id: str = setting(
        "",
        "AuditSourceID of every message; empty: node.ae_title",
        convert=_strip,
        shown="node.ae_title",
    )
    enterprise_site_id: str = setting(
        "", "AuditEnterpriseSiteID, e.g. the hospital's name or OID", convert=_strip
    )


_ROLES = 'must be a list of role names such as ["dpo"]'


@dataclass(frozen=True)
class DpoSettings:
    """The DPO's pages at /governance: sign-in (local accounts, the hospital's OIDC provider)
    and the session cookie."""

    session_hours: float = setting(8.0, "a sign-in lasts at most this long", check=d.positive)
    secure_cookies: bool = setting(
        True, "the cookie only travels over HTTPS; false only to try the pages over plain HTTP"
    )
    local_accounts: bool = setting(True, "false: only the OIDC provider signs users in")
    max_failed_signins: int = setting(
        5, "failed sign-ins in a row before the account is locked", check=d.positive
    )
    lockout_minutes: float = setting(15.0, "how long a locked account stays so", check=d.positive)
    oidc_issuer: str = setting(
        "",
        "the OIDC provider's issuer URL; issuer, client id and secret file: all or none",
        check=d.http_url,
        convert=lambda v: v.rstrip("/"),
    )
    oidc_client_id: str = setting("", "the client registered for this node")
    oidc_client_secret_file: Path | None = setting(
        None, "file with the client's secret", kind=d.OPTIONAL_PATH, must_exist=True
    )
    oidc_role_claim: str = setting(
        "roles",
        "claim with the user's roles; a dotted path reaches into objects (realm_access.roles)",
        check=d.nonempty,
    )
    oidc_dpo_values: tuple[str, ...] = setting(
        (), "claim values that make a user a DPO", hint=_ROLES
    )
    oidc_auditor_values: tuple[str, ...] = setting(
        (), "claim values that make a user an auditor", hint=_ROLES
    )
    review_timezone: str = setting(
        "UTC", "the node's time zone for the monthly review, e.g. Asia/Seoul", check=d.zone
    )
    review_day_starts: int = setting(
        8, "local hour the working day (Monday to Friday) starts", check=d.hour
    )
    review_day_ends: int = setting(19, "local hour it ends; outside: off-hours", check=d.hour)
    review_bulk_instances: int = setting(
        500, "a retrieval of this many instances or more is bulk", check=d.positive
    )

    @property
    def oidc_enabled(self) -> bool:
        return bool(self.oidc_issuer)


@dataclass(frozen=True)
class Peer:
    """A known DICOM AE: who may call us for which services, and where C-MOVE sends to."""

    name: str = setting(
        "", "the node's own name for the peer (unique)", required=True, check=d.nonempty
    )
    ae_title: str = setting(
        "",
        "the peer's AE title (unique), matched on the calling AE",
        required=True,
        check=d.ae_title,
        convert=_strip,
    )
    host: str = setting(
        "", "where C-MOVE sends this peer's images", required=True, check=d.nonempty
    )
    port: int = setting(0, "its port", kind=d.INT, required=True, check=d.port)
    allow: tuple[str, ...] = setting(
        DIMSE_SERVICES, "services this peer may request", check=d.services(DIMSE_SERVICES)
    )
    tls: bool = setting(False, "true: C-MOVE to this peer uses TLS (trusting dimse.tls.ca_file)")
    certificate_name: str = setting(
        "",
        "binds the AE title to a client certificate: it must call over TLS with a certificate "
        'whose subject CN or subjectAltName is this; "" = not bound by name',
        convert=_strip,
    )
    certificate_fingerprint: str = setting(
        "",
        'binds it to the client certificate with this SHA-256 fingerprint (hex); "" = not bound '
        "by fingerprint",
        check=_sha256_fingerprint,
        convert=_fingerprint,
    )
    intake_tags: tuple[str, ...] = setting(
        (), 'access tags given to every study this peer sends (e.g. ["hospital-a"])'
    )
    access_tags: tuple[str, ...] = setting(
        (),
        "when set: this peer's C-FIND and C-MOVE see only studies carrying one of these tags; "
        "[] = not restricted by tags",
    )

    @property
    def certificate_bound(self) -> bool:
        """Whether the peer's AE title is bound to a client certificate."""
        return bool(self.certificate_name or self.certificate_fingerprint)


# VRs whose value is not text to compare: sequences and binary data
_NOT_TEXT_VRS = ("SQ", "UN", "OB", "OD", "OF", "OL", "OV", "OW")


def _attribute_values(value: dict[str, Any]) -> str | None:
    """A problem with an access tag rule's `match` table (DICOM keyword = value or values)."""
    from dicomnode.core.elements import reader_for  # pydicom's dictionary, loaded when used

    for keyword, expected in value.items():
        try:
            vr = reader_for(keyword).vr
        except ValueError:
            return f"{keyword!r} is not a DICOM keyword"
        if vr.startswith(_NOT_TEXT_VRS):
            return f"{keyword} ({vr}) holds no text value to compare"
        values = expected if isinstance(expected, list) else [expected]
        if not values or any(not isinstance(v, str) or not v.strip() for v in values):
            return f"{keyword} must be a non-empty string or a list of them"
    return None


def _values_by_keyword(value: dict[str, Any], base: Path) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (keyword, tuple(v.strip() for v in (values if isinstance(values, list) else [values])))
        for keyword, values in sorted(value.items())
    )


ATTRIBUTE_VALUES = d.Kind(
    "table: DICOM keyword = string or list of strings",
    (dict,),
    _values_by_keyword,
    empty={},
    check=_attribute_values,
)


@dataclass(frozen=True)
class AccessTagRule:
    """Gives its tag to the study of every arriving object that meets all its conditions."""

    tag: str = setting(
        "", "the access tag given (1-64 letters, digits, . _ -)", required=True, check=d.access_tag
    )
    sender: str = setting(
        "",
        'only objects sent by this calling AE title or [[peers]] name; "" = from any sender',
        convert=_strip,
    )
    match: tuple[tuple[str, tuple[str, ...]], ...] = setting(
        (),
        "only objects whose attribute (DICOM keyword) has exactly this value or one of these "
        'values, e.g. { InstitutionName = "Hospital A" }; compared as text without surrounding '
        "spaces, several values as one text joined by \\, never as a pattern (* is a "
        "character); an absent or empty attribute never matches",
        kind=ATTRIBUTE_VALUES,
        shown="{}",
    )


@dataclass(frozen=True)
class Settings:
    node: NodeSettings = section(NodeSettings, "The node itself.")
    dimse: DimseSettings = section(DimseSettings, "The DIMSE listener.")
    http: HttpSettings = section(HttpSettings, "The HTTP server (DICOMweb, health, metrics).")
    database: DatabaseSettings = section(DatabaseSettings, "The index.")
    storage: StorageSettings = section(StorageSettings, "Where blobs live.")
    logging: LoggingSettings = section(LoggingSettings, "Log lines on stderr.")
    auth: AuthSettings = section(AuthSettings, "Bearer tokens (JWT) for DICOMweb.")
    analysis: AnalysisSettings = section(AnalysisSettings, "Analysis jobs.")
    governance: GovernanceSettings = section(
        GovernanceSettings, "The governance policy and the node's governance housekeeping."
    )
    audit: AuditSettings = section(AuditSettings, "DICOM audit trail messages (PS3.15 A.5).")
    dpo: DpoSettings = section(DpoSettings, "The DPO's pages at /governance.")
    peers: tuple[Peer, ...] = array(
        Peer, "Known DICOM peers: who may call for which services, where C-MOVE sends."
    )
    access_tag_rules: tuple[AccessTagRule, ...] = array(
        AccessTagRule,
        "Study access tags by the arriving object (item 41): every rule whose conditions all "
        "hold gives its tag, besides the sending peer's intake_tags; a rule names sender, match "
        "or both.",
    )
    source: Path | None = None  # the file these settings came from

    @property
    def database_url(self) -> str:
        """The index URL; the default is a SQLite file inside data_dir."""
        return self.database.url or f"sqlite:///{self.node.data_dir / 'index.sqlite'}"

    def peer_by_ae_title(self, ae_title: str) -> Peer | None:
        return next((p for p in self.peers if p.ae_title == ae_title.strip()), None)
