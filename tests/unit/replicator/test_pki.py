"""The operators' CA, site certificates, and mutual TLS 1.3 between sites."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import socket
import ssl
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dvx_dr.errors import AlreadyExistsError, UserError
from dvx_dr.replicator.pki import init_ca, issue_site, site_name_from_cert
from dvx_dr.replicator.tls import (
    PeerRejected,
    check_own_certificate,
    check_peer,
    client_context,
    peer_site_from_ssl_object,
    server_context,
)
from tests.conftest import cli_env

HOSTS = ["127.0.0.1", "localhost", "::1"]


@dataclass(frozen=True)
class PKI:
    ca: Path  # the operators' CA: site-a, site-b, site-c
    rogue: Path  # another CA, which also issued a "site-b"

    def files(self, site: str, directory: Path | None = None) -> tuple[Path, Path, Path]:
        d = directory or self.ca
        return d / f"{site}.crt", d / f"{site}.key", d / "ca.crt"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    ca = tmp_path_factory.mktemp("ca")
    rogue = tmp_path_factory.mktemp("rogue")
    init_ca(ca)
    init_ca(rogue, name="someone else's CA")
    for site in ("site-a", "site-b", "site-c"):
        issue_site(ca, site, HOSTS)
    issue_site(rogue, "site-b", HOSTS)
    return PKI(ca, rogue)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the CA and the certificates -------------------------------------------------------------


def test_init_ca_writes_a_ca_certificate_and_a_private_key(tmp_path: Path) -> None:
    cert_path = init_ca(tmp_path / "pki", name="Test CA", days=30)

    assert cert_path == tmp_path / "pki" / "ca.crt"
    cert = _load(cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Test CA"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign is True
    cert.verify_directly_issued_by(cert)  # self-signed
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=30) <= lifetime <= dt.timedelta(days=30, minutes=10)

    key_path = tmp_path / "pki" / "ca.key"
    assert _mode(key_path) == 0o600
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.public_key() == cert.public_key()
    assert sorted(p.name for p in (tmp_path / "pki").iterdir()) == ["ca.crt", "ca.key"]


def test_init_ca_refuses_to_overwrite_an_existing_ca(tmp_path: Path) -> None:
    init_ca(tmp_path)
    key_before = (tmp_path / "ca.key").read_bytes()

    with pytest.raises(AlreadyExistsError, match="already exists"):
        init_ca(tmp_path)
    # A key without its certificate is what an init-ca killed between the two leaves: it is
    # kept (it may be the only copy of a real CA's key), and the message says how to go on.
    (tmp_path / "ca.crt").unlink()
    with pytest.raises(AlreadyExistsError,
                       match="exists without ca.crt, as an interrupted 'dvx-dr pki init-ca' "
                             "leaves it: remove .*ca.key and run it again"):
        init_ca(tmp_path)

    assert (tmp_path / "ca.key").read_bytes() == key_before
    assert not (tmp_path / "ca.crt").exists()  # the refused call wrote nothing


def test_init_ca_refuses_a_name_too_long_for_a_certificate_before_writing(tmp_path: Path
                                                                         ) -> None:
    for name in ("x" * 65, "é" * 40):  # 65 and 80 bytes
        with pytest.raises(UserError, match="CA name: at most 64 bytes in UTF-8"):
            init_ca(tmp_path / "ca", name=name)
        assert not (tmp_path / "ca").exists()
    init_ca(tmp_path / "ca", name="é" * 32)


def test_issue_site_writes_a_leaf_certificate_naming_the_site(pki: PKI) -> None:
    cert = _load(pki.ca / "site-a.crt")
    ca = _load(pki.ca / "ca.crt")

    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-a"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["dvx-dr://site/site-a"]
    assert san.get_values_for_type(x509.DNSName) == ["site-a", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc
    assert _mode(pki.ca / "site-a.key") == 0o600
    assert site_name_from_cert(cert) == "site-a"


def test_site_certificate_never_outlives_its_ca(tmp_path: Path) -> None:
    init_ca(tmp_path, days=10)
    cert_path, _ = issue_site(tmp_path, "site-a", ["10.0.0.1"], days=825)
    assert _load(cert_path).not_valid_after_utc == _load(tmp_path / "ca.crt").not_valid_after_utc


def test_issue_site_refuses_to_overwrite(pki: PKI) -> None:
    before = (pki.ca / "site-a.key").read_bytes()
    with pytest.raises(AlreadyExistsError, match="site-a.crt already exists"):
        issue_site(pki.ca, "site-a", ["127.0.0.1"])
    assert (pki.ca / "site-a.key").read_bytes() == before


def test_issue_site_without_a_ca_says_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"ca\.crt: no such file; create the CA first with "
                                        r"'dvx-dr pki init-ca "):
        issue_site(tmp_path, "site-a", ["127.0.0.1"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["Site-A", "-site", "site_a", "", "a" * 64, "site a", "é"])
def test_invalid_site_names_are_refused_with_the_rule(tmp_path: Path, name: str) -> None:
    init_ca(tmp_path)
    with pytest.raises(UserError, match="lowercase letters, digits and hyphens"):
        issue_site(tmp_path, name, ["127.0.0.1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key"]


@pytest.mark.parametrize("name", ["a", "0", "site-1", "a" * 63, "dr-"])
def test_valid_site_names_are_accepted(tmp_path: Path, name: str) -> None:
    init_ca(tmp_path)
    cert_path, _ = issue_site(tmp_path, name, ["127.0.0.1"])
    assert site_name_from_cert(_load(cert_path)) == name


@pytest.mark.parametrize("hosts", [[], ["bad host"], ["under_score.example"], ["-x.example"]])
def test_issue_site_rejects_missing_or_malformed_hosts(tmp_path: Path, hosts: list[str]) -> None:
    init_ca(tmp_path)
    with pytest.raises(UserError, match="host"):
        issue_site(tmp_path, "site-a", hosts)


def _self_signed(
    cn: str | None, uris: list[str] | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if uris is not None:
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(key, hashes.SHA256()), key


@pytest.mark.parametrize(
    ("cn", "uris", "expected"),
    [
        ("site-x", None, "site-x"),  # no SAN: fall back to the CN
        ("site-x", ["https://example.com/"], "site-x"),  # a URI that is not ours: CN
        ("ignored", ["dvx-dr://site/site-y"], "site-y"),  # the URI wins over the CN
        ("Not A Site", None, None),
        (None, None, None),
        ("site-x", ["dvx-dr://site/Bad_Name"], None),
        ("site-x", ["dvx-dr://site/site-y", "dvx-dr://site/site-z"], None),  # ambiguous
    ],
)
def test_site_name_from_cert(cn: str | None, uris: list[str] | None, expected: str | None) -> None:
    cert, _ = _self_signed(cn, uris)
    assert site_name_from_cert(cert) == expected


# --- mutual TLS ------------------------------------------------------------------------------


@dataclass
class Handshake:
    server_peer: str | None = None  # the site name check_peer accepted on the server side
    server_error: BaseException | None = None
    client_peer: str | None = None  # the site name the client saw on the server's certificate
    client_error: BaseException | None = None
    version: str | None = None


def _handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    allowed: set[str],
    server_hostname: str = "127.0.0.1",
) -> Handshake:
    """Run one TLS handshake over a socketpair; the server checks the peer against allowed."""
    result = Handshake()
    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(10)
    client_sock.settimeout(10)

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(server_sock, server_side=True) as tls:
                result.version = tls.version()
                result.server_peer = check_peer(tls, allowed)
                tls.sendall(b"ok")
                tls.recv(1)  # wait for the client to close
        except (OSError, PeerRejected) as exc:
            result.server_error = exc
        finally:
            server_sock.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(client_sock, server_hostname=server_hostname) as tls:
            result.client_peer = peer_site_from_ssl_object(tls)
            # In TLS 1.3 the server's verdict on the client certificate arrives after the
            # client's handshake is done: read to learn it.
            if tls.recv(2) != b"ok":
                raise ConnectionError("the server closed the connection")
    except OSError as exc:
        result.client_error = exc
    finally:
        client_sock.close()
        thread.join(10)
    assert not thread.is_alive()
    return result


def test_mutual_tls13_handshake_accepts_a_configured_peer(pki: PKI) -> None:
    server = server_context(*pki.files("site-a"))
    client = client_context(*pki.files("site-b"))
    for context in (server, client):  # the certificates pass OpenSSL's strict checks too
        context.verify_flags |= ssl.VERIFY_X509_STRICT

    result = _handshake(server, client, allowed={"site-b", "site-c"})

    assert result.server_error is None and result.client_error is None
    assert result.version == "TLSv1.3"
    assert result.server_peer == "site-b"
    assert result.client_peer == "site-a"


def test_handshake_over_tcp_with_asyncio(pki: PKI) -> None:
    """The way aiohttp uses the contexts: a server socket on 127.0.0.1 and an asyncio client."""
    server_ctx = server_context(*pki.files("site-a"))
    client_ctx = client_context(*pki.files("site-b"))
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(check_peer(writer.get_extra_info("ssl_object"), {"site-b"}))
        writer.write(b"hello\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def main() -> tuple[bytes, str | None]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
            line = await reader.readline()
            peer = peer_site_from_ssl_object(writer.get_extra_info("ssl_object"))
            writer.close()
            await writer.wait_closed()
        return line, peer

    line, peer = asyncio.run(asyncio.wait_for(main(), 20))
    assert line == b"hello\n"
    assert peer == "site-a"
    assert seen == ["site-b"]


def test_client_certificate_from_another_ca_is_rejected(pki: PKI) -> None:
    server = server_context(*pki.files("site-a"))
    rogue_cert, rogue_key, _ = pki.files("site-b", pki.rogue)
    client = client_context(rogue_cert, rogue_key, pki.ca / "ca.crt")  # trusts our CA

    result = _handshake(server, client, allowed={"site-b"})

    assert isinstance(result.server_error, ssl.SSLCertVerificationError)
    assert result.server_peer is None
    assert "unknown ca" in str(result.client_error)


def test_server_certificate_from_another_ca_is_rejected(pki: PKI) -> None:
    rogue_cert, rogue_key, _ = pki.files("site-b", pki.rogue)
    server = server_context(rogue_cert, rogue_key, pki.ca / "ca.crt")
    client = client_context(*pki.files("site-a"))

    result = _handshake(server, client, allowed={"site-a"})

    assert isinstance(result.client_error, ssl.SSLCertVerificationError)
    assert result.server_peer is None


def test_certificate_for_a_site_that_is_not_a_peer_is_rejected(pki: PKI) -> None:
    server = server_context(*pki.files("site-a"))
    client = client_context(*pki.files("site-c"))

    result = _handshake(server, client, allowed={"site-b"})

    assert isinstance(result.server_error, PeerRejected)
    assert str(result.server_error) == (
        "certificate names site 'site-c' which is not a configured peer (configured: site-b); "
        "add it under peers in site.yaml to accept it"
    )
    assert result.server_peer is None


def test_no_client_certificate_fails_the_handshake(pki: PKI) -> None:
    server = server_context(*pki.files("site-a"))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=pki.ca / "ca.crt")

    result = _handshake(server, client, allowed={"site-b"})

    assert isinstance(result.server_error, ssl.SSLError)
    assert "did not return a certificate" in str(result.server_error)
    assert result.server_peer is None
    assert "certificate required" in str(result.client_error)


def test_check_peer_without_a_certificate_raises_peer_rejected() -> None:
    class NoCert:
        def getpeercert(self, binary_form: bool = False) -> None:
            return None

    with pytest.raises(PeerRejected, match="no client certificate"):
        check_peer(NoCert(), {"site-b"})  # type: ignore[arg-type]
    with pytest.raises(PeerRejected, match="not TLS"):
        check_peer(None, {"site-b"})


def test_tls12_is_refused(pki: PKI) -> None:
    server = server_context(*pki.files("site-a"))
    client = client_context(*pki.files("site-b"))
    client.minimum_version = ssl.TLSVersion.TLSv1_2
    client.maximum_version = ssl.TLSVersion.TLSv1_2

    result = _handshake(server, client, allowed={"site-b"})

    assert "unsupported protocol" in str(result.server_error)
    assert "protocol version" in str(result.client_error)
    assert result.server_peer is None


def test_client_checks_the_server_host_name(pki: PKI) -> None:
    server = server_context(*pki.files("site-a"))
    client = client_context(*pki.files("site-b"))

    result = _handshake(server, client, allowed={"site-b"}, server_hostname="elsewhere.example")

    assert isinstance(result.client_error, ssl.SSLCertVerificationError)
    assert "elsewhere.example" in str(result.client_error)


@pytest.mark.parametrize("missing", ["cert", "key", "ca"])
@pytest.mark.parametrize("make", [server_context, client_context])
def test_missing_files_are_named(pki: PKI, tmp_path: Path, missing: str, make: object) -> None:
    files = dict(zip(("cert", "key", "ca"), pki.files("site-a"), strict=True))
    files[missing] = tmp_path / f"nope-{missing}.pem"
    with pytest.raises(UserError, match=f"nope-{missing}.pem.*not found"):
        make(**files)  # type: ignore[operator]


def test_unreadable_and_mismatched_files_are_named(pki: PKI, tmp_path: Path) -> None:
    cert, key, ca = pki.files("site-a")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")

    with pytest.raises(UserError, match="garbage.pem: not a PEM TLS certificate"):
        server_context(garbage, key, ca)
    with pytest.raises(UserError, match="garbage.pem: not a PEM CA certificate"):
        server_context(cert, key, garbage)
    with pytest.raises(UserError, match="garbage.pem: not a PEM private key"):
        client_context(cert, garbage, ca)
    with pytest.raises(UserError, match="site-b.key is not the private key of the certificate"):
        client_context(cert, pki.ca / "site-b.key", ca)
    with pytest.raises(UserError, match="is a directory"):
        client_context(cert, key, tmp_path)


def test_expired_certificate_is_refused_at_load(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-a")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=10))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "old.crt", tmp_path / "old.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(UserError, match="old.crt: the certificate expired on"):
        server_context(cert_path, key_path, cert_path)


def test_a_site_cannot_be_named_like_the_ca_files(tmp_path: Path) -> None:
    """``issue-site DIR ca`` would have written the site's certificate and key as the CA's."""
    init_ca(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UserError, match="site name 'ca': the CA's own files are ca.crt"):
        issue_site(tmp_path, "ca", ["127.0.0.1"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_issue_site_warns_when_others_can_read_the_ca_key(tmp_path: Path) -> None:
    init_ca(tmp_path)
    command = [sys.executable, "-m", "dvx_dr", "pki", "issue-site", str(tmp_path)]
    run = subprocess.run([*command, "site-a", "--host", "127.0.0.1"], capture_output=True,
                         text=True, env=cli_env(), timeout=60)
    assert run.returncode == 0 and "warning" not in run.stderr, run.stderr
    (tmp_path / "ca.key").chmod(0o644)
    run = subprocess.run([*command, "site-b", "--host", "127.0.0.1"], capture_output=True,
                         text=True, env=cli_env(), timeout=60)
    assert run.returncode == 0, run.stderr
    assert "ca.key can be read by others than its owner (mode 0644)" in run.stderr
    assert "chmod 600" in run.stderr


def _server_only_certificate(ca: Path, site: str, out: Path) -> tuple[Path, Path]:
    """A certificate for ``site`` from the CA in ``ca`` that allows server use only."""
    ca_cert = _load(ca / "ca.crt")
    ca_key = serialization.load_pem_private_key((ca / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(7)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3))
            .add_extension(x509.SubjectAlternativeName([
                x509.UniformResourceIdentifier(f"dvx-dr://site/{site}"), x509.DNSName(site)]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out.mkdir(exist_ok=True)
    (out / f"{site}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / f"{site}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return out / f"{site}.crt", out / f"{site}.key"


def test_a_site_checks_that_its_peers_would_accept_its_certificate(pki: PKI,
                                                                   tmp_path: Path) -> None:
    """Its own certificate and key must chain to its CA and serve both ends of a connection:
    the site shakes hands with itself; OpenSSL's reason is in the message."""
    def check(cert: Path, key: Path, ca: Path, site: str) -> None:
        check_own_certificate(server_context(cert, key, ca), client_context(cert, key, ca),
                              cert, ca, site)

    cert, key, ca = pki.files("site-a")
    check(cert, key, ca, "site-a")
    rogue_cert, rogue_key, _ = pki.files("site-b", pki.rogue)
    with pytest.raises(UserError, match="would be refused by this site's peers: .*unable to "
                                        "get local issuer certificate"):
        check(rogue_cert, rogue_key, ca, "site-b")
    server_cert, server_key = _server_only_certificate(pki.ca, "site-c", tmp_path)
    with pytest.raises(UserError, match="as the server of a test handshake, unsuitable "
                                        "certificate purpose"):
        check(server_cert, server_key, ca, "site-c")
