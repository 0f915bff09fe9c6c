"""State several nodes share through the index (issue 20 item 2): the key store, DPO sessions
and the sign-in lockout, the leader lease, governance wake-ups over LISTEN/NOTIFY, and moments
stamped by the database's clock. Nodes are separate `Archive`s (own engines, own data_dirs)
on one real PostgreSQL, started together from threads; SQLite where one host is the point."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from joserfc.jwk import RSAKey
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicomnode.analysis.plugin import AnalysisResult, Analyzer, Selector
from dicomnode.analysis.runner import AnalysisService
from dicomnode.archive import Archive, leases, migrations, schema
from dicomnode.archive.accounts import SessionStore, SigninThrottle
from dicomnode.archive.jobs import JobStore
from dicomnode.archive.keys import KeyStore, sign_json, verify_json
from dicomnode.core.model import Level, Source
from dicomnode.records.workbench import Workbench
from tests.conftest import open_archive, wait_until
from tests.factory import make_ct, part10
from tests.test_analysis import text_report


def together(work, count: int) -> list:
    """Run `work(i)` for i in range(count) from threads released at one moment; the results."""
    barrier = threading.Barrier(count)
    results: list = [None] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(10)
            results[i] = work(i)
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


@pytest.fixture
def pg_url(postgres) -> str:
    return postgres.create_database()


@pytest.fixture
def nodes(tmp_path: Path, pg_url: str):
    """Open `count` archives on one PostgreSQL database, each with its own data_dir (the
    migrations run once first: Alembic's context is per process, not per thread); closed
    after the test."""
    opened: list[Archive] = []

    def open_nodes(count: int = 2, url: str = pg_url) -> list[Archive]:
        made = [open_archive(tmp_path / f"node{len(opened) + i}", url) for i in range(count)]
        opened.extend(made)
        return made

    yield open_nodes
    for archive in opened:
        archive.close()


# --- the key store --------------------------------------------------------------------------


def test_nodes_starting_together_get_the_same_secrets_and_verify_each_others_tokens(
    nodes, tmp_path
):
    archives = nodes(3)
    stores = [KeyStore(a.index, tmp_path / f"node{i}") for i, a in enumerate(archives)]
    secrets = together(
        lambda i: (
            stores[i].signing_key().as_pem(private=True),
            stores[i].deid_secret(),
            stores[i].session_secret(),
        ),
        3,
    )
    assert secrets[0] == secrets[1] == secrets[2]
    pem, deid, session = secrets[0]
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----") and len(deid) == len(session) == 32
    assert deid != session
    token = sign_json(stores[0].signing_key(), {"sub": "node-1", "n": 7})
    assert verify_json(stores[1].signing_key(), token) == {"sub": "node-1", "n": 7}
    with archives[0].engine.connect() as conn:
        rows = conn.execute(select(schema.node_secrets.c.name, schema.node_secrets.c.origin))
        assert sorted(rows) == [
            ("deid-secret", "generated"),
            ("session-secret", "generated"),
            ("signing-key", "generated"),
        ]
    for i in range(3):  # nothing written to the data_dirs
        assert not (tmp_path / f"node{i}" / "keys").exists()


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
def test_keys_left_in_data_dir_are_imported_on_first_start(tmp_path, database_url, caplog):
    old = tmp_path / "old"  # what a node of the previous version left behind
    (old / "keys").mkdir(parents=True)
    old_key = RSAKey.generate_key(2048, private=True)
    (old / "keys" / "signing-key.pem").write_bytes(old_key.as_pem(private=True))
    old_deid = bytes(range(32))
    (old / "keys" / "deid-secret").write_bytes(old_deid)
    archive = Archive(old, database_url)
    try:
        store = KeyStore(archive.index, old)
        assert store.signing_key().thumbprint() == old_key.thumbprint()
        assert store.deid_secret() == old_deid
        token = sign_json(old_key, {"before": "upgrade"})  # made before the upgrade: still good
        assert verify_json(store.signing_key(), token) == {"before": "upgrade"}
        # a second node whose data_dir holds other keys uses the shared ones, and says so
        other = tmp_path / "other"
        (other / "keys").mkdir(parents=True)
        other_pem = RSAKey.generate_key(2048, private=True).as_pem(private=True)
        (other / "keys" / "signing-key.pem").write_bytes(other_pem)
        second = KeyStore(archive.index, other)
        assert second.signing_key().thumbprint() == old_key.thumbprint()
        assert any(getattr(r, "origin", "") == "ignored-file" for r in caplog.records)
        origins = dict(
            archive.engine.connect()
            .execute(select(schema.node_secrets.c.name, schema.node_secrets.c.origin))
            .all()
        )
        assert origins == {"signing-key": "imported", "deid-secret": "imported"}
    finally:
        archive.close()


def test_a_stored_secret_too_short_is_refused(nodes):
    (archive,) = nodes(1)
    with archive.index.write() as conn:
        conn.execute(
            schema.node_secrets.insert().values(
                name="deid-secret", value=b"short", origin="generated", created_at=datetime.now(UTC)
            )
        )
    with pytest.raises(ValueError, match="deid-secret holds 5 bytes"):
        KeyStore(archive.index).deid_secret()


# --- DPO sessions and the lockout -------------------------------------------------------------


def test_a_session_opened_on_one_node_is_open_on_the_other_until_ended_there(nodes):
    one, two = nodes(2)
    first, second = SessionStore(one.index, 3600), SessionStore(two.index, 3600)
    sid = first.open("dpo1", "local")
    assert second.is_open(sid) and first.is_open(sid)
    assert not second.is_open("0" * 64) and not second.is_open("../etc") and not second.is_open(7)
    second.end(sid)
    assert not first.is_open(sid) and not second.is_open(sid)
    with one.engine.connect() as conn:  # the table holds digests, never a usable session id
        kept = conn.execute(select(schema.dpo_sessions.c.id_sha256)).scalars().all()
        assert sid not in kept
    a, b = first.open("dpo1", "local"), first.open("dpo1", "oidc")
    assert second.end_all("dpo1", "local") == 1
    assert not first.is_open(a) and first.is_open(b)


def test_a_session_older_than_its_lifetime_is_closed_on_every_node(nodes):
    one, two = nodes(2)
    sid = SessionStore(one.index, 1).open("dpo1", "local")
    assert SessionStore(two.index, 1).is_open(sid)
    wait_until(lambda: not SessionStore(two.index, 1).is_open(sid), 5, "the session to expire")
    SessionStore(one.index, 1).open("aud1", "local")  # opening prunes the expired ones
    with one.engine.connect() as conn:
        assert conn.execute(select(schema.dpo_sessions.c.username)).scalars().all() == ["aud1"]


def test_failed_sign_ins_on_every_node_count_toward_one_lockout(nodes):
    archives = nodes(3)
    throttles = [SigninThrottle(a.index, max_failures=5, lockout=60) for a in archives]
    results = [throttles[i % 3].failed("DPO1", f"10.0.0.{i}") for i in range(4)]
    assert results == [False] * 4 and not throttles[2].locked("dpo1", "10.9.9.9")
    assert throttles[1].failed("dpo1", "10.0.0.4") is True  # the 5th, on another node
    assert all(t.locked("dpo1", "10.9.9.9") for t in throttles)
    assert not throttles[0].locked("aud1", "10.9.9.9")  # another name, another address
    throttles[2].succeeded("dpo1")  # (an administrator's reset works the same way)
    assert not throttles[0].locked("dpo1", "10.9.9.9")


def test_concurrent_failures_from_many_nodes_are_all_counted(nodes):
    archives = nodes(4)
    throttles = [SigninThrottle(a.index, max_failures=1000, lockout=60) for a in archives]
    together(lambda i: [throttles[i].failed("dpo1", f"10.1.{i}.{n}") for n in range(10)], 4)
    with archives[0].engine.connect() as conn:
        t = schema.signin_failures
        count = conn.execute(select(t.c.failures).where(t.c.key == "user:dpo1")).scalar()
    assert count == 40


def test_an_address_is_locked_after_four_times_the_limit_and_a_lock_runs_out(nodes):
    one, two = nodes(2)
    first, second = SigninThrottle(one.index, 2, 1), SigninThrottle(two.index, 2, 1)
    locks = [(first if n % 2 else second).failed(f"user{n}", "10.2.0.1") for n in range(8)]
    assert locks == [False] * 7 + [True]  # 8 names, one address: the address is locked
    assert first.locked("someone-else", "10.2.0.1") and not first.locked("someone", "10.2.0.2")
    wait_until(lambda: not second.locked("someone-else", "10.2.0.1"), 5, "the lock to run out")
    assert first.failed("user2", "10.2.0.3") is True  # its 2nd (the 1st was on the other node)
    wait_until(lambda: not first.locked("user2", "10.2.0.4"), 5, "the name's lock to run out")
    assert second.failed("user2", "10.2.0.5") is False  # a lock that ran out starts again


# --- the leader lease -----------------------------------------------------------------------


def test_three_contenders_one_holder_and_a_takeover_after_the_holder_stops_renewing(nodes):
    archives = nodes(3)
    contenders = [
        leases.LeaderLease(a.index, "housekeeping", f"node-{i}", seconds=1.5)
        for i, a in enumerate(archives)
    ]
    granted = together(lambda i: contenders[i].try_acquire(), 3)
    assert sorted(granted) == [False, False, True]
    holder = granted.index(True)
    with archives[0].index.read() as conn:
        assert leases.lease_holder(conn, "housekeeping") == f"node-{holder}"
    others = [c for i, c in enumerate(contenders) if i != holder]
    for _ in range(3):  # the holder renews; nobody else gets it meanwhile
        assert contenders[holder].try_acquire()
        assert not any(c.try_acquire() for c in others)
        time.sleep(0.3)
    stopped = time.monotonic()  # the holder stops renewing (its node hangs or died)
    winner = wait_until(
        lambda: next((c for c in others if c.try_acquire()), None), 10, "a takeover"
    )
    assert time.monotonic() - stopped >= 1.0  # not before its lease expired
    assert not contenders[holder].try_acquire() and not contenders[holder].held()
    assert sum(1 for c in contenders if c.try_acquire()) == 1 and winner.held()


def test_a_released_lease_is_taken_at_once_and_renewing_keeps_it(nodes):
    one, two = nodes(2)
    first = leases.LeaderLease(one.index, "checkpoints", "node-a", seconds=0.9)
    second = leases.LeaderLease(two.index, "checkpoints", "node-b", seconds=0.9)
    first.start()  # renews every 0.3 s in its own thread
    try:
        assert first.held()
        for _ in range(8):  # 2.4 s: longer than the lease, kept by renewals
            assert not second.try_acquire()
            time.sleep(0.3)
    finally:
        first.stop()  # gives it up
    assert not first.held() and second.try_acquire()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_lease_on_sqlite(tmp_path, database_url):
    archive = Archive(tmp_path / "data", database_url)
    try:
        a = leases.LeaderLease(archive.index, "housekeeping", "a", seconds=0.6)
        b = leases.LeaderLease(archive.index, "housekeeping", "b", seconds=0.6)
        assert a.try_acquire() and not b.try_acquire()
        wait_until(b.try_acquire, 5, "b to take the expired lease")
        assert not a.try_acquire()
    finally:
        archive.close()


# --- governance wake-ups ----------------------------------------------------------------------


def test_a_restriction_written_on_one_node_reaches_the_others_cache_at_once(nodes):
    one, two = nodes(2)
    assert two.registry.governed_facts(["P7"])["P7"].restricted is False  # cached now
    started = time.monotonic()
    one.registry.restrict("P7", "", "data subject asked", "dpo", datetime.now(UTC))
    one.registry.forget_cached()  # what stewardship does after the write (announces it)
    wait_until(lambda: two.registry.governed_facts(["P7"])["P7"].restricted, 2, "the wake-up")
    assert time.monotonic() - started < 1.0  # well inside the 5 s the cache would have lasted
    one.registry.unrestrict("P7", "dpo", datetime.now(UTC))
    one.registry.forget_cached()
    wait_until(lambda: not two.registry.governed_facts(["P7"])["P7"].restricted, 2, "lifted")


def test_an_archive_closed_stops_its_listener_and_frees_its_connection(tmp_path, pg_url):
    archive = open_archive(tmp_path / "closing", pg_url)
    archive.registry.governed_facts(["P1"])  # the first cached read starts the listener
    thread = archive.registry._wakeups._thread
    assert thread is not None and thread.is_alive()
    archive.close()
    wait_until(lambda: not thread.is_alive(), 5, "the listener to stop with its archive")


def test_a_listener_that_lost_its_connection_reconnects_and_drops_the_cache(nodes, postgres):
    from dicomnode.archive import notify

    one, two = nodes(2)
    woken: list[str] = []
    listener = notify.Listener(two.engine, "test_channel", woken.append)
    listener.start()
    try:
        notify.announce(one.engine, "test_channel", "first")
        wait_until(lambda: "first" in woken, 5, "the first wake-up")
        with one.engine.begin() as conn:  # the listener's connection is cut
            from sqlalchemy import text

            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
                )
            )
        wait_until(lambda: "" in woken, 10, "the wake-up after reconnecting")
        notify.announce(one.engine, "test_channel", "second")
        wait_until(lambda: "second" in woken, 5, "a wake-up on the new connection")
    finally:
        listener.stop()


# --- the database's clock -------------------------------------------------------------------


def test_last_received_at_is_stamped_by_the_database_clock(nodes):
    (archive,) = nodes(1)
    jobs = JobStore(archive.index)
    skewed = datetime.now(UTC) - timedelta(hours=3)  # a node whose clock is 3 h behind
    jobs.note_received("ct-lung", "1.2.3", "1.2", "P1", skewed)
    jobs.note_received("ct-lung", "1.2.3", "1.2", "P1", skewed)
    with archive.index.read() as conn:
        stamped = conn.execute(select(schema.analysis_units.c.last_received_at)).scalar_one()
        db_clock = leases.db_now(conn)
    assert abs((db_clock - stamped).total_seconds()) < 60
    quiet = {"ct-lung": timedelta(seconds=30)}  # judged on the database's clock as well
    assert jobs.ready_units(quiet, datetime.now(UTC)) == []
    later = datetime.now(UTC) + timedelta(seconds=31)
    assert jobs.ready_units(quiet, later) == [("ct-lung", "1.2.3", "quiet-period")]


def test_the_migrations_have_one_head():
    from sqlalchemy import create_engine

    script = ScriptDirectory.from_config(migrations.alembic_config(create_engine("sqlite://")))
    assert len(script.get_heads()) == 1
    assert "0009" in {r.revision for r in script.walk_revisions()}


# --- a job whose node dies mid-run --------------------------------------------------------------


class _Report(Analyzer):
    """Files one Basic Text SR per series, under the analysis's deterministic UIDs."""

    name = "cluster-report"
    version = "1.0"
    selector = Selector(modalities=frozenset({"CT"}))
    unit = "series"
    output_sop_classes = frozenset({"1.2.840.10008.5.1.4.1.1.88.11"})

    def analyze(self, unit, context):
        report = text_report(unit, context, f"{len(unit.paths)} images")
        return AnalysisResult([report], {"images": len(unit.paths)})


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_job_whose_node_died_mid_run_is_claimed_again_and_its_result_filed_once(start_node):
    extra = "[analysis]\nenabled = false\nlease_grace = 0\n"
    extra += '[analysis.analyzers."cluster-report"]\ntimeout = 1\n'
    one, two = start_node(extra=extra), start_node(extra=extra)  # one PostgreSQL, one volume
    services = [
        AnalysisService(
            n.settings.analysis,
            Workbench(n.archive),
            n.intake,
            n.egress,
            {"cluster-report": _Report},
        )
        for n in (one, two)
    ]
    one.intake.subscribe(services[0].on_stored)
    study, series = generate_uid(), generate_uid()
    for n in (1, 2, 3):
        ct = make_ct(study_uid=study, series_uid=series, instance_number=n, size=8, seed=n)
        one.intake.receive_part10(part10(ct), Source("dimse", "MODALITY"))
    (job_id,) = services[0].request(study)
    # node one claims the job, files its result, and dies before recording the job done
    jobs = services[0].jobs
    claimed = jobs.claim("node-one-worker", datetime.now(UTC), timedelta(seconds=1))
    assert claimed.id == job_id and claimed.state == "running"
    outputs, _ = services[0]._run(claimed, _Report())
    assert services[1].run_one("node-two-worker") is None  # its lease has not run out yet
    done = wait_until(lambda: services[1].run_one("node-two-worker"), 10, "the lapsed claim")
    assert (done.id, done.state, done.attempts) == (job_id, "done", 2)
    assert done.as_dict()["outputs"] == outputs  # the same deterministic UIDs
    reports = two.archive.find_instances(Level.IMAGE, (("StudyInstanceUID", study),))
    assert sorted(r.sop_class_uid for r in reports).count("1.2.840.10008.5.1.4.1.1.88.11") == 1
    assert len(reports) == 4  # three images, one report: filed once
    assert services[0].run_one("node-one-worker") is None  # nothing left for the one back


# --- whole nodes on one PostgreSQL --------------------------------------------------------------


@pytest.fixture
def two_nodes(tmp_path, pg_url):
    """Two in-process nodes on one PostgreSQL, each with its own data_dir (nothing shared on
    disk); `extra` TOML for both. Stopped after the test."""
    from dicomnode.config import read_settings
    from dicomnode.serve import Node
    from tests.conftest import write_config

    started: list = []

    def start(extra: str = "") -> list:
        for i in range(2):
            config = write_config(
                tmp_path / f"node{i}.toml", tmp_path / f"data{i}", pg_url, extra=extra
            )
            node = Node(read_settings(config))
            node.start()
            started.append(node)
        return started

    yield start
    for node in started:
        node.stop()


def test_a_token_signed_by_one_node_is_honoured_by_the_other(two_nodes):
    import requests

    from dicomnode.dicomweb.auth import issue_token
    from tests.conftest import dicomweb_url

    one, two = two_nodes()
    assert one.signing_key.thumbprint() == two.signing_key.thumbprint()
    token = issue_token(one.signing_key, one.settings.auth, "viewer", ["dicomweb.read"], 600)
    for node in (one, two):
        answer = requests.get(
            dicomweb_url(node) + "/studies",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
    forged = issue_token(
        RSAKey.generate_key(2048, private=True), one.settings.auth, "viewer", ["dicomweb.read"], 600
    )
    answer = requests.get(
        dicomweb_url(two) + "/studies", headers={"Authorization": f"Bearer {forged}"}, timeout=30
    )
    assert answer.status_code == 401


def test_a_dpo_signed_in_on_one_node_is_signed_in_on_the_other_until_signing_out_there(two_nodes):
    from dicomnode.archive.accounts import AccountStore
    from tests.test_dpo_pages import PASSWORD, Browser

    one, two = two_nodes()
    AccountStore(one.archive.index).add("dpo1", PASSWORD, "dpo")
    first = Browser(f"http://127.0.0.1:{one.http_port}")
    signed = first.sign_in("dpo1")
    assert signed.status_code == 200 and signed.url.endswith("/governance/"), signed.text[:300]
    second = Browser(f"http://127.0.0.1:{two.http_port}")
    second.cookies.update(first.cookies)  # the balancer sent the next request to node two
    page = second.get("/governance/ledger")
    assert page.status_code == 200 and not page.url.split("?")[0].endswith("/signin")
    token = second.csrf("/governance/ledger")  # the CSRF token is in the shared session too
    assert second.post("/governance/signout", data={"csrf_token": token}).status_code == 200
    kept = Browser(f"http://127.0.0.1:{one.http_port}")
    kept.cookies.update(first.cookies)  # the cookie as it was before signing out
    assert kept.get("/governance/ledger").url.split("?")[0].endswith("/signin")


def test_failed_sign_ins_on_both_nodes_lock_the_account_on_both(two_nodes):
    from dicomnode.archive.accounts import AccountStore
    from tests.test_dpo_pages import PASSWORD, Browser

    one, two = two_nodes()
    AccountStore(one.archive.index).add("dpo1", PASSWORD, "dpo")
    browsers = [Browser(f"http://127.0.0.1:{n.http_port}") for n in (one, two)]
    limit = one.settings.dpo.max_failed_signins
    for attempt in range(limit):  # alternating nodes, as a balancer would
        assert browsers[attempt % 2].sign_in("dpo1", "wrong password!!").status_code == 401
    for browser in browsers:  # the right password now, on either node: locked
        assert browser.sign_in("dpo1").status_code == 429


def test_two_housekeepers_sweep_once_per_interval_and_the_other_takes_over(two_nodes):
    one, two = two_nodes("[governance]\nretention_interval = 0.2\ncheckpoint_interval = 0\n")
    calls: dict[int, int] = {0: 0, 1: 0}
    for i, node in enumerate((one, two)):
        real = node.stewardship.retention_sweep

        def counted(*args, _i=i, _real=real, **kwargs):
            calls[_i] += 1
            return _real(*args, **kwargs)

        node.stewardship.retention_sweep = counted
    wait_until(lambda: sum(calls.values()) >= 8, 30, "eight sweeps")
    holder = 0 if calls[0] else 1
    assert calls[1 - holder] == 0  # only the lease's holder swept
    started, before = time.monotonic(), calls[holder]
    time.sleep(1.0)
    assert calls[holder] - before <= (time.monotonic() - started) / 0.2 + 1  # once per interval
    (one, two)[holder].housekeeping.stop()  # the holder stops (and gives the lease up)
    wait_until(lambda: calls[1 - holder] >= 3, 30, "the other node to sweep")


# --- temporary files on a blob volume several hosts share ---------------------------------------


def test_another_hosts_temporary_files_are_left_until_a_day_old(tmp_path):
    import os
    import subprocess
    import sys

    from dicomnode.archive import blobs

    store = blobs.FileBlobStore(tmp_path / "blobs", tmp_path / "placing")
    mine = store.temporary_path()
    assert mine.name.startswith(f"{os.getpid()}@") and "@" in mine.name[len(str(os.getpid())) + 1 :]
    store.tmp.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)  # a process of this host that no longer runs
    files = {
        "other-host-writing": store.tmp / f"{os.getpid() + 1}@host-b.example@7.part",
        "other-host-same-pid": store.tmp / f"{os.getpid()}@host-b.example@8.part",
        "other-host-old": store.tmp / f"{dead_pid}@host-b.example@9.part",
        "this-host-dead": store.tmp / f"{dead_pid}@{blobs._HOST}@1.part",
        "before-hosts-dead": store.tmp / f"{dead_pid}-3.part",
    }
    for path in files.values():
        path.write_bytes(b"half a file")
    day_ago = time.time() - blobs.FOREIGN_TEMPORARY_SECONDS - 60
    os.utime(files["other-host-old"], (day_ago, day_ago))
    assert store.discard_partial_writes() == 3
    left = {name for name, path in files.items() if path.exists()}
    assert left == {"other-host-writing", "other-host-same-pid"}  # host A spares host B's writes


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_restriction_recorded_on_one_node_refuses_on_the_other_at_once(start_node):
    from tests.test_governance_node import policy_text, publish_days_ago, wado

    one, two = start_node(), start_node()  # one PostgreSQL, one blob volume
    publish_days_ago(one, policy_text())
    study = "1.2.826.0.1.77"
    ct = make_ct(patient_id="P1", study_uid=study)
    one.intake.receive_part10(part10(ct), Source("dimse", "MODALITY"))
    assert wado(two, study, subject="ohif").status_code == 200  # node two's cache: P1 is free
    one.stewardship.restrict("P1", "dpo", "data subject request 2026-31")
    started = time.monotonic()
    wait_until(lambda: wado(two, study, subject="ohif").status_code == 403, 5, "the refusal")
    assert time.monotonic() - started < 2.0  # not the 5 s the cache would have lasted
    one.stewardship.unrestrict("P1", "dpo")
    wait_until(lambda: wado(two, study, subject="ohif").status_code == 200, 2, "lifted at once")


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_consent_withdrawn_on_one_node_refuses_a_share_on_the_other_at_once(start_node):
    from tests.test_governance_node import (
        governance_api,
        policy_text,
        publish_days_ago,
        research_pacs,
    )

    one, two = (start_node(peers=[research_pacs()]) for _ in range(2))  # one PostgreSQL
    publish_days_ago(one, policy_text())
    study = "1.2.826.0.1.78"
    one.intake.receive_part10(part10(make_ct(patient_id="P1", study_uid=study)), Source("cli"))
    one.stewardship.record_consent("P1", "HRESCH", "granted", "dpo", evidence_ref="form 1")

    def share_on_two() -> dict:
        return governance_api(two, "POST", "/shares", json={"recipient": "lab", "study": study})

    first = share_on_two()
    assert first.status_code < 300 and first.json()["state"] != "denied"  # node two caches it
    one.stewardship.record_consent("P1", "HRESCH", "withdrawn", "dpo", evidence_ref="call")
    started = time.monotonic()
    refused = share_on_two()
    assert refused.status_code == 403 and refused.json()["state"] == "denied"
    assert time.monotonic() - started < 2.0  # at once, not after node two's 5 s cache
    (denial,) = [e for e in two.archive.ledger.entries() if e.kind == "denial"]
    assert "consent:P1:HRESCH:v2" in denial.data["reason"]
