"""A small private CA for the operators, and the site certificates it issues.

Sites accept each other by mutual TLS (design §5): every site holds a certificate from the
operators' CA, and a peer is accepted only if its certificate names a configured site.

Files, all PEM, in one directory::

    ca.crt           the CA certificate, distributed to every site (``tls.ca`` in site.yaml)
    ca.key           its private key, mode 0600; keep it off the sites if you can
    <site>.crt       a site certificate (``tls.cert``)
    <site>.key       its private key, mode 0600 (``tls.key``)

Keys are ECDSA P-256 (PKCS#8, unencrypted: a site must start unattended). A site certificate has

- subject CN = the site name;
- subjectAltName: the URI ``dvx-dr://site/<site>``, which is what names the site (read back by
  :func:`site_name_from_cert`), plus a DNS name or IP address for every host the site is reached
  at, so that clients can check the host name as usual;
- basicConstraints CA=false, keyUsage digitalSignature, extendedKeyUsage serverAuth + clientAuth
  (the same certificate serves and connects), subject and authority key identifiers.

The CA certificate has basicConstraints CA=true, pathlen 0, keyUsage keyCertSign + cRLSign. Both
pass OpenSSL's strict X.509 checks (``VERIFY_X509_STRICT``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dvx_dr.errors import AlreadyExistsError, UserError
from dvx_dr.site.config import check_site_name, site_name_error
from dvx_dr.site.segments import fsync_dir, write_all

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SITE_URI_PREFIX = "dvx-dr://site/"

_CLOCK_SKEW = dt.timedelta(minutes=5)
_MAX_NAME = 64  # an X.509 common name (RFC 5280 ub-common-name)
_DNS_LABEL_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def init_ca(directory: Path, name: str = "dvx-dr CA", days: int = 3650) -> Path:
    """Create a new CA in ``directory``: ``ca.crt`` and ``ca.key`` (0600). Returns ca.crt's path.

    Refuses with :class:`AlreadyExistsError` if either file already exists: overwriting a CA would
    orphan every certificate it issued.
    """
    if days < 1:
        raise UserError(f"CA validity: expected at least 1 day, got {days}")
    if not name.strip():
        raise UserError("CA name: expected a non-empty name")
    if len(name.encode()) > _MAX_NAME:
        raise UserError(f"CA name: at most {_MAX_NAME} bytes in UTF-8 (an X.509 common name), "
                        f"got {len(name.encode())}")
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    cert_there, key_there = _exists(cert_path), _exists(key_path)
    if key_there and not cert_there:
        raise AlreadyExistsError(
            f"{key_path} exists without {cert_path.name}, as an interrupted 'dvx-dr pki init-ca' "
            f"leaves it: remove {key_path} and run it again"
        )
    if cert_there:
        raise AlreadyExistsError(
            f"{cert_path} already exists: a CA is already set up in {directory}; "
            "use it, or choose another directory"
        )
    _make_directory(directory)

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key_and_cert(key_path, key, cert_path, cert)
    return cert_path


def issue_site(directory: Path, site: str, hosts: list[str], days: int = 825) -> tuple[Path, Path]:
    """Issue ``<site>.crt`` and ``<site>.key`` (0600) in ``directory``, signed by its CA.

    ``hosts`` are the DNS names and IP addresses the site is reached at (at least one); each goes
    into the certificate's subjectAltName. The certificate never outlives the CA. Returns
    ``(cert_path, key_path)``. Refuses to overwrite an existing certificate or key: remove both
    files first to re-issue.
    """
    check_site_name(site)
    if site == Path(CA_CERT).stem:
        raise UserError(f"site name {site!r}: the CA's own files are {CA_CERT} and {CA_KEY} "
                        "in the same directory; choose another site name")
    if days < 1:
        raise UserError(f"certificate validity: expected at least 1 day, got {days}")
    if not hosts:
        raise UserError(
            f"site {site!r}: give at least one host name or IP address the site is reached at"
        )
    # The site name is also a DNS name of the certificate: peers connect with TLS SNI and
    # host-name checking set to the site name they expect, so OpenSSL itself refuses a server
    # whose certificate names another site.
    alt_names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(SITE_URI_PREFIX + site),
        x509.DNSName(site),
    ]
    for host in hosts:
        general_name = _host_name(host)
        if general_name not in alt_names:
            alt_names.append(general_name)

    cert_path, key_path = directory / f"{site}.crt", directory / f"{site}.key"
    for path in (cert_path, key_path):
        if _exists(path):
            raise AlreadyExistsError(
                f"{path} already exists; remove {cert_path.name} and {key_path.name} "
                "first to issue a new certificate for this site"
            )
    ca_cert, ca_key = _load_ca(directory)

    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise UserError(
            f"the CA in {directory} expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}; "
            "create a new CA and re-issue every site certificate"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key_and_cert(key_path, key, cert_path, cert)
    return cert_path, key_path


def site_name_from_cert(cert: x509.Certificate) -> str | None:
    """The site a certificate names: its ``dvx-dr://site/<name>`` URI, else its CN.

    Returns None when the certificate names no valid site name, or names more than one.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    except ValueError:  # a malformed extension
        return None
    names = {uri[len(SITE_URI_PREFIX) :] for uri in uris if uri.startswith(SITE_URI_PREFIX)}
    if not names:
        try:
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        except ValueError:
            return None
        names = {cn.value for cn in cns if isinstance(cn.value, str)}
    if len(names) != 1:
        return None
    (name,) = names
    return name if site_name_error(name) is None else None


def _host_name(host: str) -> x509.GeneralName:
    """A subjectAltName entry for ``host``: an IPAddress for an address, else a DNSName."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    with contextlib.suppress(ValueError):  # not an address: a DNS name
        return x509.IPAddress(ipaddress.ip_address(text))
    dns = text.lower().rstrip(".")
    labels = dns.split(".")
    if len(dns) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
        raise UserError(
            f"host {host!r}: expected an IP address or a DNS name (letters, digits, hyphens "
            "and dots, e.g. dr1.example.com)"
        )
    return x509.DNSName(dns)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def exposed_ca_key(directory: Path) -> str | None:
    """A warning when the CA's private key file can be read by others than its owner (by its
    mode; the directories above it are not checked); None otherwise."""
    try:
        mode = (directory / CA_KEY).stat().st_mode & 0o777
    except OSError:
        return None
    if mode & 0o077:
        return (f"{directory / CA_KEY} can be read by others than its owner (mode "
                f"{mode:04o}): whoever reads it can issue certificates every site accepts; "
                f"run 'chmod 600 {directory / CA_KEY}'")
    return None


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    try:
        cert_pem = cert_path.read_bytes()
        key_pem = key_path.read_bytes()
    except FileNotFoundError as exc:
        raise UserError(
            f"{exc.filename}: no such file; create the CA first with 'dvx-dr pki init-ca "
            f"{directory}'"
        ) from None
    except OSError as exc:
        raise UserError(f"{exc.filename}: cannot read: {exc.strerror or exc}") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise UserError(f"{cert_path}: not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise UserError(f"{key_path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UserError(f"{key_path}: expected an ECDSA key, got {type(key).__name__}")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise UserError(f"{key_path} is not the key of {cert_path}")
    try:
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        raise UserError(f"{cert_path}: the CA certificate has no subject key identifier") from None
    return cert, key


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; one clear line when the directory cannot be searched."""
    try:
        return path.exists()
    except OSError as exc:
        raise UserError(f"{path}: cannot check it: {exc.strerror or exc}; run as a user who "
                        "can read that directory") from None


def _make_directory(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{directory}: cannot create directory: {exc.strerror or exc}") from None


def _write_key_and_cert(key_path: Path, key: ec.EllipticCurvePrivateKey, cert_path: Path,
                        cert: x509.Certificate) -> None:
    """Write a new key (0600) and its certificate; no key is left without its certificate."""
    _write_new(key_path, _key_pem(key), 0o600)
    try:
        _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except BaseException:
        key_path.unlink(missing_ok=True)
        raise


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` with ``mode``, durably and all-or-nothing; never replace an existing file.

    The data goes to a temporary file that is then hard-linked to the final name: the link fails
    if the name exists, and the name never shows a half-written file.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)  # left over from an interrupted run of a process with our pid
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)  # the umask could only have narrowed it; make it exact
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
        fsync_dir(path.parent)
    except FileExistsError:
        raise AlreadyExistsError(f"{path} already exists; not replacing it") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot write: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
