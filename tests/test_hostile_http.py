"""Hostile HTTP clients against a running node on loopback: malformed bearer tokens, sign-in
redirect targets with CR/LF, sessions that must end when their user signs out, STOW bodies of
junk parts (memory and CPU), slow-loris connections, and fuzzing of the token parser and the
multipart reader."""

from __future__ import annotations

import base64
import functools
import io
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomnode.archive.accounts import AccountStore
from dicomnode.config import AuthSettings
from dicomnode.core.errors import InvalidInput
from dicomnode.dicomweb.auth import AuthError, TokenVerifier
from dicomnode.dicomweb.multipart import read_multipart
from tests.conftest import dicomweb_client, dicomweb_url, token_for, wait_until
from tests.test_dpo_pages import PASSWORD, Browser

INTERNALS = ("Traceback", "object has no attribute", 'File "', "sqlalchemy", "SELECT ")


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: these tests are about the HTTP side, not the index."""
    return f"sqlite:///{tmp_path / 'index.sqlite'}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _token(header: object, claims: object, signature: bytes = b"sig") -> str:
    return ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(signature)]
    )


def _assert_no_internals(text: str) -> None:
    for marker in INTERNALS:
        assert marker not in text, f"{marker!r} in the answer: {text[:300]}"


# --- item 9: tokens whose parts are not JSON objects ---------------------------------------


GOOD_CLAIMS = {"iss": "dicomnode", "aud": "dicomnode", "sub": "x", "exp": 4102444800}
BAD_TOKENS = {
    "header is an array": _token([1, 2], GOOD_CLAIMS),
    "header is a number": _token(7, GOOD_CLAIMS),
    "header is a string": _token("RS256", GOOD_CLAIMS),
    "header is null": _token(None, GOOD_CLAIMS),
    "payload is an array": _token({"alg": "RS256"}, ["iss"]),
    "payload is a number": _token({"alg": "RS256"}, 12),
    "alg is a list": _token({"alg": ["RS256"]}, GOOD_CLAIMS),
    "alg is an object": _token({"alg": {"x": 1}}, GOOD_CLAIMS),
    "issuer is an object": _token({"alg": "RS256"}, {"iss": {"a": 1}}),
    "issuer is not latin-1": _token({"alg": "RS256"}, {"iss": "\ud55c\uad6d"}),
    "two parts": "e30.e30",
    "four parts": "e30.e30.e30.e30",
    "not base64": "%%%.***.!!!",
    "not utf-8": ".".join([_b64(b"\xff\xfe"), _b64(b"{}"), "x"]),
    "deep nesting": _token({"alg": "RS256"}, json.loads("[" * 50 + "]" * 50)),
}


@pytest.mark.parametrize("what", sorted(BAD_TOKENS))
def test_a_token_whose_parts_are_not_json_objects_is_refused_with_401(start_node, what):
    node = start_node()
    answer = requests.get(
        f"{dicomweb_url(node)}/studies",
        headers={"Authorization": f"Bearer {BAD_TOKENS[what]}"},
        timeout=30,
    )
    assert answer.status_code == 401, (what, answer.status_code, answer.text[:300])
    _assert_no_internals(answer.text)
    _assert_no_internals(answer.headers.get("WWW-Authenticate", ""))


def test_a_signed_token_with_odd_claim_types_is_refused_or_granted_nothing(start_node):
    """Claims of the wrong type in a token signed by the node's key: exp as a string is
    refused, a scope that is a number or a one-string scp grants no scope made of letters."""
    from joserfc import jwt as joserfc_jwt

    from dicomnode.archive.keys import shared_signing_key

    node = start_node()
    key = shared_signing_key(node.settings.database_url)
    now = int(time.time())
    base = {"iss": "dicomnode", "aud": "dicomnode", "sub": "odd", "iat": now, "exp": now + 600}
    base["purpose_of_use"] = "TREAT"

    def get(claims: dict) -> requests.Response:
        token = joserfc_jwt.encode({"alg": "RS256", "kid": key.thumbprint()}, claims, key)
        return requests.get(
            f"{dicomweb_url(node)}/studies",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )

    for claims in (
        base | {"exp": "soon", "scope": "dicomweb.read"},
        base | {"scope": 12},
        base | {"scp": "dicomweb.read"},  # a string, not a list: read as a space-separated list
        base | {"scope": "dicomweb.read", "extensions": ["ihe_iua"]},
    ):
        answer = get(claims)
        assert answer.status_code < 500, (claims, answer.status_code, answer.text[:300])
        _assert_no_internals(answer.text)
    assert get(base | {"exp": "soon", "scope": "dicomweb.read"}).status_code == 401
    assert get(base | {"scope": 12}).status_code == 403
    assert get(base | {"scp": "dicomweb.read"}).status_code == 200


# --- item 9: CR/LF in the sign-in's next -----------------------------------------------------


def _browser(node) -> Browser:
    return Browser(f"http://127.0.0.1:{node.http_port}")


@pytest.fixture
def dpo_node(start_node):
    node = start_node()
    AccountStore(node.archive.index).add("dpo1", PASSWORD, "dpo", "Kim")
    return node


@pytest.mark.parametrize(
    "target",
    [
        "/governance/\r\nSet-Cookie: planted=1",
        "/governance/\nLocation: https://evil.example/",
        "/governance/\rx",
        "/governance/\x00",
        "/governance/\x7f",
    ],
)
def test_control_characters_in_the_sign_in_next_are_not_followed(dpo_node, target):
    client = _browser(dpo_node)
    token = client.csrf()
    answer = client.post(
        "/governance/signin",
        data={"username": "dpo1", "password": PASSWORD, "csrf_token": token, "next": target},
        follow=False,
    )
    assert answer.status_code == 303, (answer.status_code, answer.text[:300])
    assert answer.headers["Location"].endswith("/governance/")
    assert "planted" not in answer.headers.get("Set-Cookie", "")
    # signed in, the sign-in page sends the browser on: the same check applies
    again = client.get("/governance/signin", params={"next": target}, follow=False)
    assert again.status_code == 302 and again.headers["Location"].endswith("/governance/")
    # not signed in, the page shows the form; the value is escaped, nothing breaks
    form = _browser(dpo_node).get("/governance/signin", params={"next": target}, follow=False)
    assert form.status_code == 200
    _assert_no_internals(form.text)


# --- item 8: signing out ends the session on the server --------------------------------------


def test_a_cookie_kept_after_sign_out_reads_nothing_and_signs_nothing(dpo_node):
    client = _browser(dpo_node)
    assert client.sign_in("dpo1").url.endswith("/governance/")
    kept_cookies = {c.name: c.value for c in client.cookies}
    csrf = client.csrf("/governance/ledger")
    checkpoints = dpo_node.archive.ledger.count()
    assert client.get("/governance/ledger", follow=False).status_code == 200

    signed_out = client.post("/governance/signout", data={"csrf_token": csrf}, follow=False)
    assert signed_out.status_code == 303

    def thief() -> Browser:
        """Someone who copied the cookie before the sign-out (a fresh jar for each request:
        an answer that clears the cookie must not hide what the kept one can do)."""
        copy = _browser(dpo_node)
        for name, value in kept_cookies.items():
            copy.cookies.set(name, value)
        return copy

    page = thief().get("/governance/ledger", follow=False)
    assert page.status_code == 302 and "/governance/signin" in page.headers["Location"]
    assert thief().get("/governance/disclosures.json", follow=False).status_code == 401
    signed = thief().post("/governance/ledger/checkpoint", data={"csrf_token": csrf}, follow=False)
    assert signed.status_code == 401
    assert dpo_node.archive.ledger.count() == checkpoints  # nothing was signed

    # signing in again opens a new session; the old cookie stays refused
    assert client.sign_in("dpo1").url.endswith("/governance/")
    assert client.get("/governance/ledger", follow=False).status_code == 200
    assert thief().get("/governance/ledger", follow=False).status_code == 302


def test_disabling_an_account_ends_its_open_sessions(dpo_node):
    client = _browser(dpo_node)
    assert client.sign_in("dpo1").url.endswith("/governance/")
    assert client.get("/governance/ledger", follow=False).status_code == 200
    AccountStore(dpo_node.archive.index).disable("dpo1")
    answer = client.get("/governance/ledger", follow=False)
    assert answer.status_code == 302 and "/governance/signin" in answer.headers["Location"]


# --- item 5: STOW bodies of junk parts --------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class PeakRss:
    """The highest resident set size of this process (the node runs in it) while in use."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            self._stop.wait(0.005)

    def __enter__(self) -> PeakRss:
        self.base = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base


JUNK_BOUNDARY = "junk-boundary"
STOW_JUNK_TYPE = f'multipart/related; type="application/dicom"; boundary={JUNK_BOUNDARY}'


def _junk_body(parts: int, part_size: int) -> Iterator[bytes]:
    """A STOW-RS body of `parts` junk parts, streamed (chunked): zeros (what made pydicom's
    forced read take ~2 s a part) and random bytes, alternately."""
    zeros, noise = bytes(1 << 20), os.urandom(1 << 20)
    for number in range(parts):
        yield f"--{JUNK_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        filler = zeros if number % 2 == 0 else noise
        for _ in range(part_size // len(filler)):
            yield filler
        yield b"\r\n"
    yield f"--{JUNK_BOUNDARY}--\r\n".encode()


def test_512_mib_of_junk_parts_take_little_memory_and_cpu(start_node):
    node = start_node()
    before = node.archive.counts()
    parts, part_size = 64, 8 << 20  # 512 MiB
    cpu_before = time.process_time()
    with PeakRss() as rss:
        answer = requests.post(
            f"{dicomweb_url(node)}/studies",
            data=_junk_body(parts, part_size),
            headers={"Authorization": f"Bearer {token_for(node)}", "Content-Type": STOW_JUNK_TYPE},
            timeout=600,
        )
    cpu_per_part = (time.process_time() - cpu_before) / parts  # the node's and the client's
    assert answer.status_code == 409, answer.text[:300]
    failed = answer.json()["00081198"]["Value"]
    assert len(failed) == parts
    assert "not a DICOM Part 10 file" in failed[0]["00000902"]["Value"][0]
    assert node.archive.counts() == before
    assert rss.growth < 256 << 20, f"RSS grew by {rss.growth >> 20} MiB"
    print(f"RSS +{rss.growth >> 20} MiB, {cpu_per_part:.3f} s CPU per junk part")
    assert cpu_per_part < 0.25, f"{cpu_per_part:.3f} s of CPU per junk part"


def test_many_small_parts_share_one_spool_file_and_a_bounded_memory(monkeypatch):
    from dicomnode.dicomweb import multipart

    opened = []
    real = multipart.tempfile.TemporaryFile

    def counted(*args: object, **kw: object):
        opened.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(multipart.tempfile, "TemporaryFile", counted)
    small = [bytes([n % 256]) * 100_000 for n in range(100)]  # 10 MB of 100 kB parts
    stream = b"".join(
        [b"--b\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in small]
    )
    parts = read_multipart(io.BytesIO(stream + b"--b--\r\n"), "b", 1 << 20)
    in_memory = sum(p.size for p in parts if p._file is None)
    assert 0 < in_memory <= multipart.REQUEST_IN_MEMORY
    assert len(opened) == 1  # one temporary file for all the parts that did not fit
    assert [p.read() for p in parts] == small
    assert [p.head(10) for p in parts] == [p[:10] for p in small]


# --- item 4: slow connections -----------------------------------------------------------------


class SlowLoris:
    """`count` connections from `source` that each send a request one byte every `interval`
    seconds (`kind` "headers": the request line and headers never end; "body": the headers end,
    the body dribbles; "idle": nothing at all), reopened when the node closes them, until
    `stop()` or `seconds` pass (a bounded loop on one thread)."""

    def __init__(
        self,
        port: int,
        count: int,
        kind: str = "headers",
        source: str = "127.0.0.1",
        interval: float = 0.5,
        seconds: float = 60,
    ) -> None:
        self.port, self.count, self.kind, self.source = port, count, kind, source
        self.interval, self.seconds = interval, seconds
        self.closed_by_node = 0
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.source, 0))
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", self.port))
        self.opened += 1
        if self.kind == "body":
            head = b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
            self._send(sock, head)
        return sock

    @staticmethod
    def _send(sock: socket.socket, data: bytes) -> bool:
        try:
            sock.send(data)
            return True
        except BlockingIOError:
            return True  # not connected yet (waiting in the backlog) or the buffer is full
        except OSError:
            return False

    @staticmethod
    def _closed(sock: socket.socket) -> bool:
        try:
            return sock.recv(4096) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _run(self) -> None:
        socks = [self._open() for _ in range(self.count)]
        dribble = b"GET /healthz HTTP/1.1\r\nX-Slow: " if self.kind == "headers" else b""
        step, deadline = 0, time.monotonic() + self.seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            for index, sock in enumerate(socks):
                if self._closed(sock):
                    self.closed_by_node += 1
                    sock.close()
                    socks[index] = sock = self._open()
                if self.kind == "idle":
                    continue
                byte = dribble[step : step + 1] if step < len(dribble) else b"a"
                if not self._send(sock, byte):
                    self.closed_by_node += 1
                    sock.close()
                    socks[index] = self._open()
            step += 1
            self._stop.wait(self.interval)
        for sock in socks:
            sock.close()

    def __enter__(self) -> SlowLoris:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def _served(node, rounds: int = 4, timeout: float = 15) -> list[float]:
    """A well-behaved client's QIDO-RS search and /healthz, `rounds` times, each on a new
    connection: how long each took (raises when one is not answered in `timeout` seconds)."""
    took = []
    headers = {"Authorization": f"Bearer {token_for(node)}", "Connection": "close"}
    for _ in range(rounds):
        for url, extra in (
            (f"{dicomweb_url(node)}/studies", headers),
            (f"http://127.0.0.1:{node.http_port}/healthz", {"Connection": "close"}),
        ):
            started = time.monotonic()
            answer = requests.get(url, headers=extra, timeout=timeout)
            assert answer.status_code in (200, 204), (url, answer.status_code)
            took.append(time.monotonic() - started)
    return took


def test_a_slow_loris_of_150_connections_does_not_keep_clients_out(start_node):
    """150 connections dribbling their headers (waitress's limit of 100 held QIDO-RS and
    /healthz off until the attack stopped)."""
    node = start_node(http={"header_timeout": 2})
    assert max(_served(node, rounds=1)) < 5
    with SlowLoris(node.http_port, 150, "headers", seconds=60) as attack:
        wait_until(lambda: attack.opened >= 150, 10, "the attack's connections")
        took = _served(node)
        wait_until(lambda: attack.closed_by_node >= 150, 20, "the node to close slow ones")
    assert max(took) < 10, took


@pytest.mark.parametrize("kind", ["headers", "body", "idle"])
def test_slow_connections_past_the_limit_are_closed_at_their_deadline(start_node, kind):
    """Three times the connection limit in slow connections of one kind, reopened as soon as
    the node closes them: the deadlines free the slots, and a well-behaved client gets one."""
    limit = 20
    node = start_node(
        http={
            "connection_limit": limit,
            "header_timeout": 2,
            "min_upload_rate": 1024,
            "max_connections_per_client": 0,
        }
    )
    with SlowLoris(node.http_port, 3 * limit, kind, interval=0.25, seconds=60) as attack:
        wait_until(lambda: attack.opened >= 3 * limit, 10, "the attack's connections")
        took = _served(node, rounds=1)
        wait_until(lambda: attack.closed_by_node >= limit, 20, "the node to close slow ones")
    assert max(took) < 10, took


def test_connections_from_one_address_past_its_limit_are_closed_at_once(start_node):
    node = start_node(http={"max_connections_per_client": 10, "header_timeout": 30})
    with SlowLoris(node.http_port, 40, "headers", source="127.0.0.2", seconds=60) as attack:
        wait_until(lambda: attack.closed_by_node >= 30, 20, "connections past the limit closed")
        took = _served(node)  # from 127.0.0.1
    assert max(took) < 5, took


# --- fuzzing: the token parser and the multipart reader -----------------------------------------
# Each target is bounded by its example count (about 10-40 s here; CI's limit is ~60 s a target).
# For a longer run by hand: DICOMNODE_FUZZ_EXAMPLES=20000 pytest tests/test_hostile_http.py -k fuzz

FUZZ_EXAMPLES = int(os.environ.get("DICOMNODE_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@functools.cache
def _fuzz_verifier() -> tuple[TokenVerifier, object]:
    from joserfc.jwk import RSAKey

    key = RSAKey.generate_key(2048, private=True)
    return TokenVerifier(AuthSettings(), key), key


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
claim_values = json_values | st.sampled_from(
    ["dicomweb.read", "dicomnode", "", 2**63, -1, 1e308, [], {}, ["dicomweb.read"]]
)


def _verify_answers(token: str) -> None:
    """verify() either gives a principal or refuses with AuthError, nothing else."""
    verifier, _ = _fuzz_verifier()
    try:
        principal = verifier.verify(f"Bearer {token}")
    except AuthError as refused:
        text = str(refused)
        assert len(text) < 400 and "Traceback" not in text
        text.encode("latin-1")  # it may go into the WWW-Authenticate header
        return
    assert isinstance(principal.subject, str)
    assert all(isinstance(scope, str) for scope in principal.scopes)


@settings(FUZZ, max_examples=FUZZ_EXAMPLES or 1500)
@given(
    token=st.one_of(
        st.text(max_size=200),
        st.lists(st.text(alphabet="AZaz09-_=.%", max_size=40), min_size=1, max_size=5).map(
            ".".join
        ),
        st.tuples(json_values, json_values, st.binary(max_size=64)).map(
            lambda t: _token(t[0], t[1], t[2])
        ),
        st.tuples(
            st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit"]), claim_values),
            st.dictionaries(
                st.sampled_from(["iss", "aud", "sub", "exp", "nbf", "scope", "scp"]), claim_values
            ),
        ).map(lambda t: _token(t[0], t[1])),
    )
)
def test_fuzz_the_token_parser_refuses_or_accepts_never_crashes(token):
    _verify_answers(token)


@settings(FUZZ, max_examples=FUZZ_EXAMPLES or 1000)
@given(
    claims=st.fixed_dictionaries(
        {
            "iss": st.just("dicomnode"),
            "aud": st.just("dicomnode") | claim_values,
            "sub": st.just("fuzz") | claim_values,
            "exp": st.just(4102444800) | claim_values,
        },
        optional={
            name: claim_values
            for name in ("nbf", "iat", "scope", "scp", "purpose_of_use", "extensions")
        },
    ),
    header=st.dictionaries(st.sampled_from(["typ", "cty", "crit", "x"]), claim_values, max_size=2),
)
def test_fuzz_signed_tokens_with_claims_of_any_type(claims, header):
    """Tokens signed by the node's key (so the claims' checks after the signature run too)."""
    from joserfc import jwt as joserfc_jwt
    from joserfc.errors import JoseError

    _, key = _fuzz_verifier()
    try:
        token = joserfc_jwt.encode({**header, "alg": "RS256"}, claims, key)
    except (JoseError, ValueError, TypeError):
        return  # joserfc would not sign it; nothing to send
    _verify_answers(token)


fuzz_boundary = st.sampled_from(["b", "b0undary", "--", "a b", "\u20ac", "x" * 201, ""])
body_pieces = st.sampled_from(
    [
        b"--b\r\n",
        b"--b--\r\n",
        b"--b0undary\r\n",
        b"\r\n--b",
        b"\r\n\r\n",
        b"Content-Type: application/dicom\r\n",
        b"\r\n",
        b"--",
        b"x" * 70_000,
    ]
) | st.binary(max_size=64)


@settings(FUZZ, max_examples=FUZZ_EXAMPLES or 2000)
@given(
    pieces=st.lists(body_pieces, max_size=16),
    boundary=fuzz_boundary,
    step=st.integers(min_value=1, max_value=4096),
    limit=st.integers(min_value=1, max_value=200_000),
)
def test_fuzz_the_multipart_reader_parses_or_refuses_never_crashes(pieces, boundary, step, limit):
    """Any body, boundary, chunking and part limit: parts whose sizes add up to no more than
    the body, or InvalidInput (PartTooLarge is one); never another exception."""
    data = b"".join(pieces)
    step = max(step, len(data) // 256)  # a byte at a time through 70 kB only makes it slow

    class Trickle(io.RawIOBase):
        def __init__(self) -> None:
            self.at = 0

        def read(self, size: int = -1) -> bytes:
            chunk = data[self.at : self.at + min(step, size if size >= 0 else step)]
            self.at += len(chunk)
            return chunk

    try:
        parts = read_multipart(Trickle(), boundary, limit)
    except InvalidInput:
        return
    assert sum(part.size for part in parts) <= len(data)
    for part in parts:
        assert part.size <= limit
        assert len(part.read()) == part.size
        assert part.head(8) == part.read()[:8]


def test_clients_that_do_not_read_their_answers_do_not_hold_every_thread(start_node, caplog):
    """12 clients (the node has 8 threads) ask for a 32 MiB instance and read nothing: each
    held a worker thread for good once waitress buffered 16 MiB of its answer, and QIDO-RS
    waited in the queue; now they are closed after a header_timeout window without progress."""
    from pydicom import dcmread

    from tests.factory import make_ct, part10

    caplog.set_level(logging.INFO, "dicomnode.http")
    node = start_node(http={"header_timeout": 2})
    big = make_ct(size=4096)  # 32 MiB of pixels
    dicomweb_client(node).store_instances([dcmread(io.BytesIO(part10(big)))])
    path = (
        f"/dicomweb/studies/{big.StudyInstanceUID}/series/{big.SeriesInstanceUID}"
        f"/instances/{big.SOPInstanceUID}"
    )
    request = (
        f"GET {path} HTTP/1.1\r\nHost: node\r\n"
        'Accept: multipart/related; type="application/dicom"\r\n'
        f"Authorization: Bearer {token_for(node)}\r\n\r\n"
    ).encode()
    readers = []
    try:
        for _ in range(node.settings.http.threads + 4):
            reader = socket.create_connection(("127.0.0.1", node.http_port), timeout=10)
            reader.sendall(request)
            readers.append(reader)
        took = _served(node, rounds=2)

        def closed_unread() -> int:
            return sum("answer not read" in r.getMessage() for r in caplog.records)

        wait_until(lambda: closed_unread() >= len(readers), 30, "every non-reader closed")
    finally:
        for reader in readers:
            reader.close()
    assert max(took) < 10, took


def _file_meta_then_zeros(size: int) -> bytes:
    """A Part 10 preamble, `DICM` and a valid File Meta group, then `size` bytes of zeros: it
    passes the cheap check, and its "data set" is a million (0000,0000) elements."""
    from pydicom.filewriter import write_file_meta_info

    from tests.factory import make_ct

    buffer = io.BytesIO()
    buffer.write(bytes(128) + b"DICM")
    write_file_meta_info(buffer, make_ct().file_meta, enforce_standard=True)
    return buffer.getvalue() + bytes(size)


def test_a_valid_file_header_over_zeros_is_refused_at_its_first_element(start_node):
    node = start_node()
    before = node.archive.counts()
    part = _file_meta_then_zeros(8 << 20)
    body = (
        b"".join(
            f"--{JUNK_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + part
            + b"\r\n"
            for _ in range(4)
        )
        + f"--{JUNK_BOUNDARY}--\r\n".encode()
    )
    cpu_before = time.process_time()
    answer = requests.post(
        f"{dicomweb_url(node)}/studies",
        data=body,
        headers={"Authorization": f"Bearer {token_for(node)}", "Content-Type": STOW_JUNK_TYPE},
        timeout=300,
    )
    cpu_per_part = (time.process_time() - cpu_before) / 4  # the node's and the client's
    assert answer.status_code == 409, answer.text[:300]
    failed = answer.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0xC000] * 4
    assert "command element (0000,0000)" in failed[0]["00000902"]["Value"][0]
    assert node.archive.counts() == before
    print(f"{cpu_per_part:.3f} s CPU per part")
    assert cpu_per_part < 0.5, f"{cpu_per_part:.3f} s of CPU per part (was ~2.2 s)"
