"""Mutual TLS 1.3 between sites: SSL contexts and the peer check.

Both ends present a certificate from the operators' CA (see :mod:`dvx_dr.replicator.pki`) and
verify the other's against that CA only, never against the system trust store. The client also
checks the host name against the server certificate's DNS/IP subjectAltNames, as for any HTTPS.

A verified chain proves only "some site of ours"; :func:`check_peer` then requires that the
certificate names a site configured as a peer (the ``dvx-dr://site/<name>`` URI in its
subjectAltName). The server calls it for every connection, the client for the server it reached.

The files are read and checked before OpenSSL sees them, so a missing, unreadable or mismatched
file gives a :class:`UserError` naming that file instead of an OpenSSL "PEM lib" error.
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from dvx_dr.errors import UserError
from dvx_dr.replicator.pki import site_name_from_cert

_SSLObject = ssl.SSLObject | ssl.SSLSocket


class PeerRejected(UserError):
    """A TLS peer presented no certificate, or one that names no configured peer site."""


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """Context for the replication API: TLS 1.3 only, client certificates from ``ca`` required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(context, cert, key, ca)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """Context for connecting to peers: TLS 1.3 only, server verified against ``ca`` and host."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _configure(context, cert, key, ca)
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    return context


def peer_site_from_ssl_object(ssl_object: _SSLObject) -> str | None:
    """The site named by the peer's certificate; None if it sent none or it names no site."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    return site_name_from_cert(cert)


def check_peer(ssl_object: _SSLObject | None, allowed: set[str]) -> str:
    """Return the peer's site name if it is one of ``allowed``, else raise :class:`PeerRejected`."""
    if ssl_object is None:
        raise PeerRejected("the connection is not TLS; peers must connect with mutual TLS")
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerRejected("no client certificate: peers must present their site certificate")
    name = peer_site_from_ssl_object(ssl_object)
    if name is None:
        raise PeerRejected(
            "the certificate names no dvx-dr site (no dvx-dr://site/<name> URI and no valid "
            "common name); issue it with `dvx-dr pki issue-site DIR SITE`"
        )
    if name not in allowed:
        configured = ", ".join(sorted(allowed)) or "none"
        raise PeerRejected(
            f"certificate names site {name!r} which is not a configured peer "
            f"(configured: {configured}); add it under peers in site.yaml to accept it"
        )
    return name


def _configure(context: ssl.SSLContext, cert: Path, key: Path, ca: Path) -> None:
    _check_files(cert, key, ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"{cert} / {key}: OpenSSL cannot load them: {exc}") from None
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"{ca}: OpenSSL cannot load the CA certificate: {exc}") from None


def _check_files(cert_path: Path, key_path: Path, ca_path: Path) -> None:
    """Parse the three files with clear errors; check the key matches and the dates are valid."""
    certs = _load_certs(cert_path, "TLS certificate")
    cas = _load_certs(ca_path, "CA certificate")
    key_pem = _read(key_path, "TLS key")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise UserError(
            f"{key_path}: the TLS key is encrypted with a passphrase; a site needs it unencrypted"
        ) from None
    except ValueError:
        raise UserError(f"{key_path}: not a PEM private key") from None
    except UnsupportedAlgorithm as exc:
        raise UserError(f"{key_path}: a key of a kind this site cannot use ({exc}); issue an "
                        "ECDSA P-256 key with 'dvx-dr pki issue-site'") from None
    if _spki(key.public_key()) != _spki(certs[0].public_key()):
        raise UserError(f"{key_path} is not the private key of the certificate {cert_path}")
    now = dt.datetime.now(dt.UTC)
    for path, cert in ((cert_path, certs[0]), *((ca_path, ca) for ca in cas)):
        if cert.not_valid_after_utc < now:
            raise UserError(
                f"{path}: the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                "issue a new one"
            )
        if cert.not_valid_before_utc > now:
            raise UserError(
                f"{path}: the certificate is not valid before "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this host's clock"
            )


def check_own_certificate(server: ssl.SSLContext, client: ssl.SSLContext, cert_path: Path,
                          ca_path: Path, site: str) -> None:
    """Refuse to serve with a certificate peers would not accept as this site's: one for
    another site (peers would take this site for that one: file its replicas under that name,
    or refuse it), one that does not chain to the CA, or one not usable both to serve and to
    connect. For the last two the site shakes hands with itself, in memory, with the
    contexts it serves and connects with (``server``, ``client``, made from ``cert_path`` and
    ``ca_path``), so that OpenSSL applies the very checks its peers will (the chain to the
    CA, the certificate's purposes, the host name ``site``)."""
    named = site_name_from_cert(_load_certs(cert_path, "TLS certificate")[0])
    if named != site:
        raise UserError(f"TLS certificate {cert_path} is for "
                        f"{'site ' + repr(named) if named else 'no dvx-dr site'}, not for this "
                        f"site {site!r}; issue one with 'dvx-dr pki issue-site DIR {site}'")
    if problem := _handshake_with_itself(server, client, site):
        raise UserError(f"TLS certificate {cert_path} would be refused by this site's peers: "
                        f"{problem}; it must be issued by the CA in {ca_path} (as "
                        "'dvx-dr pki issue-site' does), for both server and client use")


#: Days before a certificate's end from which the site warns (log, status, metrics).
EXPIRY_WARNING_DAYS = 30


def certificate_ends(cert_path: Path, ca_path: Path) -> dict[str, dt.datetime]:
    """When the site's certificate and its CA certificate stop being valid (the earliest of
    the CA file's certificates): after either date, peers refuse the site."""
    cert = _load_certs(cert_path, "TLS certificate")[0]
    cas = _load_certs(ca_path, "CA certificate")
    return {"site": cert.not_valid_after_utc,
            "ca": min(ca.not_valid_after_utc for ca in cas)}


def _handshake_with_itself(server: ssl.SSLContext, client: ssl.SSLContext, site: str
                           ) -> str | None:
    """The error of a TLS handshake between ``client`` (addressing ``site``) and ``server``,
    run in memory; None when both ends accept each other."""
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    ends = {"client": client.wrap_bio(client_in, client_out, server_hostname=site),
            "server": server.wrap_bio(server_in, server_out, server_side=True)}
    done: set[str] = set()
    for _ in range(8):  # TLS 1.3 takes three flights
        for name, end in ends.items():
            if name in done:
                continue
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                continue  # it waits for the other end's next flight
            except ssl.SSLError as exc:
                why = getattr(exc, "verify_message", None) or exc.reason or exc
                return f"as the {name} of a test handshake, {why}"
            done.add(name)
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if len(done) == len(ends):
            return None
    return "a test handshake did not complete"


def _load_certs(path: Path, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise UserError(f"{path}: not a PEM {what}")
    return certs


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected the {what} file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
