"""Checklist item 43: DIMSE from outside the hospital LAN only over TLS, and AE titles bound to
client certificates.

One node on loopback speaks TLS and plain TCP on its one DIMSE port; ``plain_networks`` is
10.0.0.0/8, so loopback counts as outside the LAN. Certificates are made here with
`cryptography` (a hospital CA, the node's server certificate, client certificates). Clients
are dcmtk's echoscu and storescu, pynetdicom with an ssl context, and a balancer's PROXY v2
header sent by hand. Each refusal must be an A-ASSOCIATE-RJ with its reason, a 110113
Security Alert (Node Authentication), aggregated per source and minute, and a log line.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicomnode.config import check_settings, read_settings
from dicomnode.serve import Node
from tests.conftest import associate_rq, run_dcmtk, write_config
from tests.factory import write_series
from tests.test_audit_alerts import event_id, outcome_text, spooled
from tests.test_proxy import answer, connect_from, proxy_v2

BALANCER = "127.0.0.2"  # a listed load balancer (PROXY protocol v2)
LAN = "10.0.0.0/8"  # plain_networks: loopback is outside it
PLAIN_REFUSED = "plain TCP from 127.0.0.1, outside dimse.plain_networks"
REJECTED_NO_REASON = (0x01, 0x01, 0x01)  # permanent, DICOM UL service-user, no reason given
REJECTED_CALLING_AE = (0x01, 0x01, 0x03)  # ... calling AE title not recognized


# --- certificates ---------------------------------------------------------------------------


def _write(folder: Path, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _issue(
    subject: str,
    issuer: x509.Name | None,
    signer: ec.EllipticCurvePrivateKey | None,
    alt_names: list[x509.GeneralName] = (),
    usage: x509.ObjectIdentifier | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A key and a certificate for `subject`, signed by `signer` (None: a self-signed CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=signer is None, path_length=None), critical=True)
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return key, builder.sign(signer or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The hospital CA, the node's certificate, and three client certificates from the CA:
    the CT scanner's (bound by name), the workstation's (bound by fingerprint), a spare one."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, ca = _issue("hospital-ca", None, None)
    found: dict[str, object] = {"ca": _write(folder, "ca", ca_key, ca)[0]}
    server = _issue(
        "localhost",
        ca.subject,
        ca_key,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    found["server"] = _write(folder, "server", *server)
    for client, alt_names in (
        ("ct-scanner", [x509.DNSName("ct-scanner.radiology.hospital.example")]),
        ("workstation", []),
        ("spare", []),
    ):
        key, cert = _issue(client, ca.subject, ca_key, alt_names, ExtendedKeyUsageOID.CLIENT_AUTH)
        found[client] = _write(folder, client, key, cert)
        found[f"{client}-sha256"] = cert.fingerprint(hashes.SHA256()).hex()
    return found


# --- the node -------------------------------------------------------------------------------


def _colons(fingerprint: str) -> str:
    """A fingerprint as certificate viewers show it: upper case, colon-separated."""
    return ":".join(fingerprint[i : i + 2] for i in range(0, len(fingerprint), 2)).upper()


def _config(folder: Path, pki: dict[str, object]) -> Path:
    server_cert, server_key = pki["server"]
    peers = [
        ("ct", "CTSCANNER", 'certificate_name = "ct-scanner.radiology.hospital.example"'),
        ("workstation", "WORKSTATION",
         f'certificate_fingerprint = "{_colons(pki["workstation-sha256"])}"'),
        ("viewer", "VIEWER", ""),
    ]  # fmt: skip
    extra = [
        "[dimse.tls]",
        f'cert_file = "{server_cert}"',
        f'key_file = "{server_key}"',
        f'ca_file = "{pki["ca"]}"',
    ]
    for name, ae_title, binding in peers:
        extra += ["[[peers]]", f'name = "{name}"', f'ae_title = "{ae_title}"']
        extra += ['host = "127.0.0.1"', "port = 104", 'allow = ["echo", "store"]', binding]
    return write_config(
        folder / "node.toml",
        folder / "data",
        f"sqlite:///{folder / 'index.sqlite'}",
        extra="\n".join(extra),
        acse_timeout=2,
        plain_networks=[LAN],
        proxy_protocol_from=[BALANCER],
    )


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, object]):
    node = Node(read_settings(_config(tmp_path_factory.mktemp("tls-binding"), pki)))
    node.start()
    yield node
    node.stop()


def associate(node: Node, pki: dict[str, object], calling: str, certificate: str | None = None):
    """An association from pynetdicom over TLS presenting `certificate` (a client's name in
    `pki`, or None: no client certificate)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    if certificate is not None:
        context.load_cert_chain(*pki[certificate])
    return _ae(calling).associate(
        "127.0.0.1", node.dimse.port, ae_title="DICOMNODE", tls_args=(context, "localhost")
    )


def associate_plain(node: Node, calling: str):
    return _ae(calling).associate("127.0.0.1", node.dimse.port, ae_title="DICOMNODE")


def _ae(calling: str) -> AE:
    ae = AE(calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    return ae


def rejection(assoc) -> tuple[int, int, int]:
    """The A-ASSOCIATE-RJ's result, source and reason, as the client received them."""
    assert assoc.is_rejected, "the association was not rejected"
    answer = assoc.acceptor.primitive
    return answer.result, answer.result_source, answer.diagnostic


def echo_and_release(assoc) -> int:
    assert assoc.is_established
    try:
        return assoc.send_c_echo().Status
    finally:
        assoc.release()


def alerts(node: Node, text: str) -> list:
    """The 110113 messages spooled so far whose outcome says `text`."""
    return [d for d in spooled(node) if event_id(d) == "110113" and text in outcome_text(d)]


def participants(document) -> list[tuple[str, str]]:
    """Each active participant's UserID and address (the refused caller is one of them)."""
    return [
        (p.get("UserID"), p.get("NetworkAccessPointID")) for p in document.iter("ActiveParticipant")
    ]


def dcmtk_tls(pki: dict[str, object], client: str) -> list[str]:
    cert, key = pki[client]
    return ["+tls", str(key), str(cert), "+cf", str(pki["ca"])]


# --- the tests ------------------------------------------------------------------------------


def test_item_43_plain_dimse_from_outside_is_refused_and_audited(node, pki, tmp_path, caplog):
    """A plain association from outside plain_networks is rejected, audited and logged; the same
    client over TLS with the certificate its AE title is bound to is accepted."""
    caplog.set_level(logging.INFO, logger="dicomnode")
    port = str(node.dimse.port)
    stored = node.archive.counts()["instances"]

    # The CT scanner over plain TCP from 127.0.0.1, outside plain_networks: dcmtk, then
    # pynetdicom twice (one minute's burst from one source).
    plain = run_dcmtk("echoscu", "-aet", "CTSCANNER", "-aec", "DICOMNODE", "127.0.0.1", port)
    assert plain.returncode != 0
    assert "Association Rejected" in plain.stdout + plain.stderr, plain.stdout + plain.stderr
    for _ in range(2):
        assert rejection(associate_plain(node, "CTSCANNER")) == REJECTED_NO_REASON
    files = write_series(tmp_path / "in", 2, size=16)
    plain_store = run_dcmtk(
        "storescu", "-aet", "CTSCANNER", "-aec", "DICOMNODE", "127.0.0.1", port, *map(str, files)
    )
    assert plain_store.returncode != 0
    assert node.archive.counts()["instances"] == stored

    # The same scanner over TLS with the certificate its AE title is bound to.
    tls = dcmtk_tls(pki, "ct-scanner")
    secure = run_dcmtk("echoscu", "-aet", "CTSCANNER", "-aec", "DICOMNODE", *tls, "127.0.0.1", port)
    assert secure.returncode == 0, secure.stdout + secure.stderr
    sent = run_dcmtk(
        "storescu", "-aet", "CTSCANNER", "-aec", "DICOMNODE", *tls,
        "127.0.0.1", port, *map(str, files),
    )  # fmt: skip
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert node.archive.counts()["instances"] == stored + 2
    assert echo_and_release(associate(node, pki, "CTSCANNER", "ct-scanner")) == 0x0000

    # Four refusals from one source within a minute: the first alert at once, the other three
    # in one message carrying their count.
    refused = alerts(node, PLAIN_REFUSED)
    assert len(refused) == 2, [outcome_text(d) for d in refused]
    assert "(3 times within a minute)" in outcome_text(refused[1])
    for document in refused:
        assert [c.get("csd-code") for c in document.iter("EventTypeCode")] == ["110126"]
        assert ("CTSCANNER", "127.0.0.1") in participants(document)
    logged = [
        r
        for r in caplog.records
        if getattr(r, "outcome", None) == "rejected" and PLAIN_REFUSED in getattr(r, "reason", "")
    ]
    assert len(logged) == 4 and all(r.caller == "CTSCANNER" for r in logged)


def test_a_certificate_bound_to_another_ae_title_is_rejected_and_audited(node, pki):
    # The workstation's certificate (bound by fingerprint) is accepted for WORKSTATION only.
    assert echo_and_release(associate(node, pki, "WORKSTATION", "workstation")) == 0x0000
    assert rejection(associate(node, pki, "WORKSTATION", "ct-scanner")) == REJECTED_CALLING_AE
    assert rejection(associate(node, pki, "CTSCANNER", "workstation")) == REJECTED_CALLING_AE
    # ... and a bound certificate is no pass for an AE title bound to none.
    assert rejection(associate(node, pki, "VIEWER", "workstation")) == REJECTED_CALLING_AE
    dcmtk = run_dcmtk(
        "echoscu", "-aet", "WORKSTATION", "-aec", "DICOMNODE", *dcmtk_tls(pki, "ct-scanner"),
        "127.0.0.1", str(node.dimse.port),
    )  # fmt: skip
    assert dcmtk.returncode != 0 and "Association Rejected" in dcmtk.stdout + dcmtk.stderr

    mismatches = alerts(node, "WORKSTATION is bound to another client certificate")
    assert len(mismatches) == 2  # pynetdicom's at once, dcmtk's held for the minute
    for mismatch in mismatches:
        assert pki["ct-scanner-sha256"] in outcome_text(mismatch)
        assert ("WORKSTATION", "127.0.0.1") in participants(mismatch)
    assert alerts(node, "CTSCANNER is bound to another client certificate")
    [elsewhere] = alerts(node, "the client certificate is bound to WORKSTATION, not VIEWER")
    assert [c.get("csd-code") for c in elsewhere.iter("EventTypeCode")] == ["110126"]


def test_a_bound_ae_title_without_its_certificate_is_rejected(node, pki):
    assert rejection(associate(node, pki, "CTSCANNER")) == REJECTED_CALLING_AE  # TLS, no cert
    assert rejection(associate(node, pki, "CTSCANNER", "spare")) == REJECTED_CALLING_AE
    assert alerts(node, "CTSCANNER is bound to a client certificate and came over TLS without")
    # Unbound AE titles need no certificate over TLS; a certificate bound to nobody is fine.
    assert echo_and_release(associate(node, pki, "VIEWER")) == 0x0000
    assert echo_and_release(associate(node, pki, "VIEWER", "spare")) == 0x0000


def test_plain_tcp_is_judged_by_the_address_a_balancer_names(node):
    """Behind a balancer the node sees the balancer's address; the PROXY v2 header names the
    modality's, and that one decides whether plain TCP is allowed."""
    port = node.dimse.port
    with connect_from(BALANCER, port) as inside:  # a modality on the LAN
        inside.sendall(proxy_v2("10.1.2.3", 40001) + associate_rq(port))
        assert answer(inside)[:1] == b"\x02"  # A-ASSOCIATE-AC
        inside.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
        assert answer(inside)[:1] == b"\x06"
    with connect_from(BALANCER, port) as outside:  # a modality outside it
        outside.sendall(proxy_v2("192.0.2.7", 40002) + associate_rq(port))
        refused = answer(outside)
    assert refused[:1] == b"\x03" and tuple(refused[7:10]) == REJECTED_NO_REASON
    [alert] = alerts(node, "plain TCP from 192.0.2.7, outside dimse.plain_networks")
    assert ("RAWSCU", "192.0.2.7") in participants(alert)


def test_a_binding_needs_a_ca_to_verify_and_a_fingerprint_is_sha256(tmp_path, pki):
    config = write_config(tmp_path / "node.toml", tmp_path / "data", "sqlite:///i.sqlite")
    assert read_settings(config).dimse.plain_tcp_from == ("0.0.0.0/0", "::/0")  # no TLS: all
    peer = '[[peers]]\nname = "ct"\nae_title = "CT"\nhost = "127.0.0.1"\nport = 104\n'
    without_tls = config.read_text() + peer + 'certificate_name = "ct-scanner"\n'
    config.write_text(without_tls)
    assert [str(p) for p in check_settings(config)] == [
        "peers[0].certificate_name: needs [dimse.tls] with ca_file to verify certificates"
    ]
    config.write_text(without_tls.replace("certificate_name", "certificate_fingerprint"))
    assert [p.key for p in check_settings(config)] == ["peers[0].certificate_fingerprint"]
    assert "64 hex digits" in str(check_settings(config)[0])
    good = _config(tmp_path, pki)
    settings = read_settings(good)
    assert (
        settings.peer_by_ae_title("WORKSTATION").certificate_fingerprint
        == (pki["workstation-sha256"])
    )
    assert settings.dimse.plain_tcp_from == (LAN,)
