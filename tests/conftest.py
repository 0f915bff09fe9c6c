"""Shared fixtures: a real node on loopback (in-process or as a `dicomnode serve` process),
on SQLite and on a PostgreSQL server the tests start themselves."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AddressInformation

from dicomnode.archive.migrate import migrate
from dicomnode.config import Peer, read_settings

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def associate_rq(port: int, max_length: int = 16384) -> bytes:
    """An encoded A-ASSOCIATE-RQ from RAWSCU to DICOMNODE at `port`, for tests that speak the
    protocol by hand: CT Image Storage (Explicit VR Little Endian) on presentation context 1,
    Verification on context 3, and `max_length` as the largest PDU it receives."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = "RAWSCU"
    primitive.called_ae_title = "DICOMNODE"
    primitive.calling_presentation_address = AddressInformation("127.0.0.1", 0)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", port)
    store_context = build_context(CTImageStorage, ExplicitVRLittleEndian)
    store_context.context_id = 1
    echo_context = build_context(Verification)
    echo_context.context_id = 3
    primitive.presentation_context_definition_list = [store_context, echo_context]
    limit = MaximumLengthNotification()
    limit.maximum_length_received = max_length
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.8.498.1"
    primitive.user_information = [limit, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def wait_until(
    predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition"
) -> object:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --- PostgreSQL, started once per test session ------------------------------------------


@dataclass
class PostgresServer:
    socket_dir: Path
    port: int

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def create_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user="postgres",
            dbname="postgres",
            autocommit=True,
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_postgres_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster on a Unix socket (initdb + pg_ctl from the machine)."""
    for tool in ("initdb", "pg_ctl"):
        assert shutil.which(tool), (
            f"{tool} is required for the PostgreSQL tests (.ci/run installs it)"
        )
    # Outside pytest's private temp folder, which the postgres user may not enter.
    base = Path(tempfile.mkdtemp(prefix="dicomnode-pg-"))
    data, sockets = base / "data", base / "sock"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    subprocess.run(
        _as_postgres_user(
            ["initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]
        ),
        check=True,
        capture_output=True,
    )
    options = f"-k {sockets} -p {port} -c listen_addresses='' -c fsync=off -c max_connections=200"
    subprocess.run(
        _as_postgres_user(
            ["pg_ctl", "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "start"]
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield PostgresServer(sockets, port)
    finally:
        subprocess.run(
            _as_postgres_user(["pg_ctl", "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
        )


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The index URL for one test: a SQLite file, or a fresh database on the test PostgreSQL,
    migrated to head (`dicomnode migrate`) as an operator does before opening it."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    else:
        url = request.getfixturevalue("postgres").create_database()
    migrate(url)
    return url


def open_archive(data_dir: Path, database_url: str, **options):
    """An Archive on a database migrated first (opening one only checks the schema)."""
    from dicomnode.archive import Archive

    migrate(database_url)
    return Archive(data_dir, database_url, **options)


def drop_append_only_triggers(engine) -> None:
    """Remove the triggers that keep the ledger and consents append-only, as someone with the
    database owner's rights could, so that a test can tamper with them."""
    from sqlalchemy import text

    from dicomnode.archive.schema import APPEND_ONLY_TABLES

    with engine.begin() as conn:
        for table in APPEND_ONLY_TABLES:
            if engine.dialect.name == "sqlite":
                conn.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_update"))
                conn.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_delete"))
            else:
                conn.execute(text(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}"))
                conn.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}"))


# --- the node ---------------------------------------------------------------------------


def write_config(
    path: Path,
    data_dir: Path,
    database_url: str,
    peers: list[Peer] = (),
    extra: str = "",
    http: dict | None = None,
    **dimse: object,
) -> Path:
    """A TOML settings file with free-port defaults for tests; `extra` is appended TOML
    (tables other than [node], [dimse], [http] and [database], e.g. [auth])."""
    lines = [
        "[node]",
        'ae_title = "DICOMNODE"',
        f'data_dir = "{data_dir}"',
        "min_free_bytes = 0",  # a test machine's disk may be small; test_retention checks it
        "[dimse]",
        'host = "127.0.0.1"',
        f"port = {dimse.pop('port', 0)}",
        f"drain_timeout = {dimse.pop('drain_timeout', 10)}",
    ]
    for key, value in dimse.items():
        lines.append(f"{key} = {json.dumps(value)}")
    lines += ["[http]", 'host = "127.0.0.1"', "port = 0"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in (http or {}).items()]
    lines += ["[database]", f'url = "{database_url}"', "migrate_at_start = true"]
    for peer in peers:
        lines += [
            "[[peers]]",
            f'name = "{peer.name}"',
            f'ae_title = "{peer.ae_title}"',
            f'host = "{peer.host}"',
            f"port = {peer.port}",
            f"allow = {json.dumps(list(peer.allow))}",
        ]
    if extra:
        lines.append(extra)
    path.write_text("\n".join(lines) + "\n")
    return path


# --- the S3 store: the `s3` marker -------------------------------------------------------
# In these modules the PostgreSQL variant of a test that starts a node runs with its blobs in
# SeaweedFS (the at-scale combination), unless it reads blob files on disk: the DIMSE, DICOMweb
# and governance paths once on S3, at no extra run (`pytest -m s3` selects them).
S3_MODULES = ("test_dimse_dcmtk", "test_dicomweb", "test_governance_node")
S3_STAY_ON_FILES: dict[str, str] = {  # test -> why it keeps the filesystem store
    "test_storescu_files_are_stored_as_received_in_every_transfer_syntax": "reads blob files",
    **dict.fromkeys(
        (  # test_dicomweb: "nothing stored changed" compares the blob files on disk
            "test_identical_resend_succeeds_and_stores_nothing_new",
            "test_different_object_under_a_stored_sop_instance_uid_is_refused",
            "test_delete_instance_series_and_study",
            "test_delete_needs_the_delete_scope_and_a_matching_path",
            "test_truncated_multipart_body_is_400_and_stores_nothing",
            "test_wrong_boundary_in_content_type_is_400",
            "test_non_dicom_part_fails_with_a_failure_reason",
            "test_content_type_not_multipart_is_415",
            "test_invalid_uid_in_the_path_is_400",
            "test_part_over_max_part_bytes_is_413_and_stores_nothing",
            "test_a_transport_keeps_what_it_sent_when_one_object_cannot_be_prepared",
        ),
        "compares blob files on disk",
    ),
    "test_metadata_at_every_level_with_bulk_data_uris": "counts cached metadata files",
}


def s3_variant(item: pytest.Item) -> bool:
    """Whether `item` is the S3 variant (see S3_MODULES)."""
    callspec = getattr(item, "callspec", None)
    return (
        item.module.__name__.rsplit(".", 1)[-1] in S3_MODULES
        and callspec is not None
        and callspec.params.get("database_url") == "postgres"
        and "start_node" in getattr(item, "fixturenames", ())
        and getattr(item, "originalname", item.name) not in S3_STAY_ON_FILES
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if s3_variant(item):
            item.add_marker(pytest.mark.s3)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """How many tests ran on the S3 store, how many of those were skipped, and which tests of
    the S3 modules kept the filesystem store."""
    stats = terminalreporter.stats
    ran = [r for key in ("passed", "failed", "error") for r in stats.get(key, ()) if _on_s3(r)]
    skipped = [r for r in stats.get("skipped", ()) if _on_s3(r)]
    if ran or skipped:
        terminalreporter.write_line(
            f"s3: {len({r.nodeid for r in ran})} tests ran with the S3 store, "
            f"{len({r.nodeid for r in skipped})} skipped; {len(S3_STAY_ON_FILES)} tests of "
            f"{', '.join(S3_MODULES)} keep the filesystem (they read blob files: S3_STAY_ON_FILES)"
        )


def _on_s3(report) -> bool:
    return getattr(report, "when", "") in ("call", "setup") and "s3" in getattr(
        report, "keywords", {}
    )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """SeaweedFS on loopback for the session's S3 variants (one bucket, fsync=true)."""
    from tests.realclients.seaweedfs import start_seaweedfs

    server = start_seaweedfs(tmp_path_factory.mktemp("s3-server"))
    yield server
    server.kill()


def storage_toml(request: pytest.FixtureRequest) -> str:
    """The [storage] section for the requesting test: S3 under a fresh prefix for an S3
    variant, else nothing (the filesystem)."""
    if not s3_variant(request.node):
        return ""
    server = request.getfixturevalue("s3_server")
    return "\n".join(
        [
            "[storage]",
            'backend = "s3"',
            f'endpoint = "{server.endpoint}"',
            'bucket = "dicomnode"',
            f'prefix = "t-{uuid.uuid4().hex[:12]}"',
            f'credentials_file = "{server.credentials_file}"',
        ]
    )


@pytest.fixture
def start_node(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str
) -> Iterator[Callable[..., object]]:
    """Start an in-process Node on free loopback ports (blobs on S3 for an S3 variant);
    stopped after the test."""
    storage = storage_toml(request)
    from dicomnode.serve import Node

    nodes: list[Node] = []

    def start(
        peers: list[Peer] = (), extra: str = "", http: dict | None = None, **dimse: object
    ) -> Node:
        config = write_config(
            tmp_path / f"node{len(nodes)}.toml",
            tmp_path / "data",
            database_url,
            peers,
            extra="\n".join(part for part in (storage, extra) if part),
            http=http,
            **dimse,
        )
        node = Node(read_settings(config))
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


WORKSTATION = Peer(
    "workstation", "WORKSTATION", "127.0.0.1", 0, ("echo", "store", "find", "move", "get")
)


@dataclass
class ServeProcess:
    """`dicomnode serve` in its own process, its log in a file."""

    process: subprocess.Popen
    log_path: Path

    def ready_event(self) -> dict:
        for line in self.log_path.read_text().splitlines():
            if '"event": "ready"' in line:
                return json.loads(line)
        return {}

    @property
    def dimse_port(self) -> int:
        return int(self.ready_event()["dimse_port"])

    @property
    def http_port(self) -> int:
        return int(self.ready_event()["http_port"])

    def log_events(self, event: str) -> list[dict]:
        return [
            json.loads(line)
            for line in self.log_path.read_text().splitlines()
            if line.startswith("{") and f'"event": "{event}"' in line
        ]

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def serve(
    config: Path, log_path: Path, env: dict | None = None, timeout: float = 60
) -> ServeProcess:
    """Run `dicomnode serve --config CONFIG` and wait until it logs that it is ready (killed
    when it is not ready within `timeout` seconds)."""
    log_file = log_path.open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(config)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env or os.environ.copy(),
    )
    served = ServeProcess(process, log_path)

    def ready() -> bool:
        assert process.poll() is None, f"dicomnode serve exited early:\n{log_path.read_text()}"
        return bool(served.ready_event())

    try:
        wait_until(ready, timeout, "dicomnode serve to log that it is ready")
    except BaseException:
        process.kill()
        process.wait(10)
        raise
    return served


@pytest.fixture
def serve_node(tmp_path: Path, database_url: str) -> Iterator[Callable[..., ServeProcess]]:
    processes: list[ServeProcess] = []

    def start(peers: list[Peer] = (), config: Path | None = None, **dimse: object) -> ServeProcess:
        config = config or write_config(
            tmp_path / "serve.toml", tmp_path / "data", database_url, peers, **dimse
        )
        served = serve(config, tmp_path / f"serve{len(processes)}.log")
        processes.append(served)
        return served

    yield start
    for served in processes:
        if served.process.poll() is None:
            served.terminate(signal.SIGKILL)


@functools.cache
def dcmtk_tool(name: str) -> str:
    """The path of dcmtk's `name` (pynetdicom installs Python apps with the same names, which
    may come first on PATH): the first executable on PATH that is a compiled program."""
    for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin"]:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            with candidate.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    return str(candidate)
    raise AssertionError(f"dcmtk's {name} is required; .ci/run installs the dcmtk package")


def send_concurrently(port: int, folders: list) -> None:
    """One storescu per folder, all at once; each must succeed."""
    senders = [
        subprocess.Popen(
            [dcmtk_tool("storescu"), "-aec", "DICOMNODE", "-aet", f"SENDER{i}"]
            + ["127.0.0.1", str(port), "+sd", str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=DCMTK_ENV,
        )
        for i, folder in enumerate(folders)
    ]
    try:
        outputs = [sender.communicate(timeout=180)[0] for sender in senders]
    finally:
        for sender in senders:
            if sender.poll() is None:
                sender.kill()
    for sender, output in zip(senders, outputs, strict=True):
        assert sender.returncode == 0, output


def start_module_node(request, tmp_path_factory, name: str, peers: list):
    """A started Node for a module-scoped fixture parametrised "sqlite"/"postgres" (the
    caller stops it): one index per back end, shared by the module's tests."""
    from dicomnode.config import read_settings
    from dicomnode.serve import Node

    folder = tmp_path_factory.mktemp(name)
    url = (
        f"sqlite:///{folder / 'index.sqlite'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres").create_database()
    )
    node = Node(read_settings(write_config(folder / "node.toml", folder / "data", url, peers)))
    node.start()
    return node


def cli(node, *args: str) -> subprocess.CompletedProcess:
    """Run a `dicomnode` command against `node`'s settings, as hospital IT would."""
    return subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", *args, "--config", str(node.settings.source)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_dcmtk(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a dcmtk tool with TCP_NODELAY on; returns the completed process (output as text)."""
    return subprocess.run(
        [dcmtk_tool(args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=DCMTK_ENV,
    )


# --- a dcmtk storescp as the C-MOVE destination -----------------------------------------


@dataclass
class StoreSCP:
    ae_title: str
    port: int
    folder: Path
    process: subprocess.Popen

    @property
    def peer(self) -> Peer:
        return Peer("pacs-b", self.ae_title, "127.0.0.1", self.port, ("echo", "store"))

    def received(self, settled: float = 0.0) -> list[Dataset]:
        """What storescp has written (see `read_folder`)."""
        return read_folder(self.folder, settled)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """Start a dcmtk storescp (by default it accepts only uncompressed transfer syntaxes)."""
    started: list[StoreSCP] = []

    def start(ae_title: str = "STORESCP", port: int | None = None) -> StoreSCP:
        port = port or free_port()
        folder = tmp_path / f"storescp{len(started)}"
        folder.mkdir()
        with (tmp_path / f"storescp{len(started)}.log").open("wb") as log:
            process = subprocess.Popen(
                [dcmtk_tool("storescp"), "-aet", ae_title, "-od", str(folder), str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=DCMTK_ENV,
            )
        scp = StoreSCP(ae_title, port, folder, process)
        started.append(scp)

        def answers() -> bool:
            assert process.poll() is None, "storescp exited early"
            return run_dcmtk("echoscu", "-aec", ae_title, "127.0.0.1", str(port)).returncode == 0

        wait_until(answers, 30, "storescp to answer C-ECHO")
        return scp

    yield start
    for scp in started:
        scp.process.terminate()
        scp.process.wait(10)


def read_folder(folder: Path, settled: float = 0.0) -> list[Dataset]:
    """Every DICOM file in `folder`, read fully and then removed (so the folder can be reused).
    With `settled`, files written to in the last `settled` seconds are left for the next call
    (for polling while storescp receives: it writes under the final name)."""
    datasets = []
    young = time.time() - settled
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.stat().st_mtime > young:
            continue
        datasets.append(pydicom.dcmread(path))
        path.unlink()
    return datasets


# --- DICOMweb ---------------------------------------------------------------------------

ALL_SCOPES = ("dicomweb.read", "dicomweb.write", "dicomweb.delete")


def token_for(
    node,
    scopes=ALL_SCOPES,
    subject: str = "tester",
    expires_in: int = 600,
    purpose: str | None = None,
) -> str:
    """A bearer token signed by `node`'s own key, stating `purpose`, else (as `dicomnode token
    create` does) the purpose the policy in force gives `subject`."""
    from dicomnode.archive.keys import shared_signing_key
    from dicomnode.dicomweb.auth import issue_token
    from dicomnode.governance.decisions import token_purpose

    key = shared_signing_key(node.settings.database_url)
    if purpose is None and hasattr(node, "stewardship"):
        purpose = token_purpose(node.stewardship.policy_status().in_force, subject) or None
    return issue_token(key, node.settings.auth, subject, list(scopes), expires_in, purpose)


def dicomweb_url(node) -> str:
    return f"http://127.0.0.1:{node.http_port}/dicomweb"


def dicomweb_client(node, scopes=ALL_SCOPES):
    """A dicomweb-client DICOMwebClient for `node`, as a PACS or script would use it."""
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(
        dicomweb_url(node), headers={"Authorization": f"Bearer {token_for(node, scopes)}"}
    )
