"""The local certificate authority that lets the proxy read inside ``inspect: true`` tunnels.

Layout, in ``$EGRESSLOCK_CA_DIR`` or ``$XDG_DATA_HOME/egresslock/ca`` (``~/.local/share/...``)::

    ca.pem      the root certificate: what clients must trust (``egresslock ca export``)
    ca.key      its EC P-256 key, mode 0600, in a 0700 directory; never inside a sandbox
    bundle.pem  the system roots plus ca.pem, for clients that read one CA file

The root never signs a leaf directly. Each proxy start mints an intermediate CA, valid for a day
and name-constrained (RFC 5280 4.2.1.10) to the hosts its policy inspects, and leaves are signed
by that intermediate. A client that enforces name constraints (OpenSSL, Go, NSS) therefore
rejects any certificate this proxy could mint for a host the policy does not inspect, even if
the intermediate's key leaked from the proxy's memory.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from egresslock.errors import EgresslockError
from egresslock.paths import default_ca_dir

SYSTEM_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt",
                  "/etc/ssl/cert.pem")


class CAError(EgresslockError):
    """The CA is missing, unreadable or unsafe; the message says how to fix it."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca,
                         content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, encipher_only=False,
                         decipher_only=False)


@dataclass(frozen=True)
class CA:
    """A root certificate and key loaded from disk."""

    directory: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def bundle_path(self) -> Path:
        return self.directory / "bundle.pem"

    def fingerprint(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex(":").upper()


def init_ca(directory: Path | None = None, force: bool = False) -> CA:
    """Create the root CA (EC P-256, ten years) and the trust bundle."""
    d = directory or default_ca_dir()
    if (d / "ca.key").exists() and not force:
        raise CAError(f"a CA already exists in {d}; pass --force to replace it (clients that "
                      "trust the old one must then be given the new ca.pem)")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "egresslock"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "egresslock local CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(hours=1))
            .not_valid_after(_now() + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_key_usage(True), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    key_path = d / "ca.key"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    (d / "ca.pem").write_bytes(_pem(cert))
    ca = CA(d, cert, key)
    write_bundle(ca)
    return ca


def load_ca(directory: Path | None = None) -> CA:
    """Load the root CA, refusing a key file that others can read."""
    d = directory or default_ca_dir()
    key_path, cert_path = d / "ca.key", d / "ca.pem"
    if not key_path.exists():
        raise CAError(f"no CA in {d}; create one with: egresslock ca init")
    mode = key_path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CAError(f"{key_path} has mode {mode:o}; it must be 600 (chmod 600 {key_path})")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CAError(f"cannot load the CA from {d}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError(f"{key_path} is not an EC key")
    return CA(d, cert, key)


def write_bundle(ca: CA) -> Path:
    """System roots plus the egresslock root, for SSL_CERT_FILE and friends."""
    system = next((Path(p) for p in SYSTEM_BUNDLES if Path(p).exists()), None)
    roots = system.read_bytes() if system else b""
    ca.bundle_path.write_bytes(roots.rstrip(b"\n") + b"\n" + _pem(ca.cert))
    return ca.bundle_path


def trust_environment(ca: CA) -> dict[str, str]:
    """The variables common clients read to find CA certificates."""
    bundle = str(ca.bundle_path)
    return {
        "SSL_CERT_FILE": bundle, "REQUESTS_CA_BUNDLE": bundle, "CURL_CA_BUNDLE": bundle,
        "NODE_EXTRA_CA_CERTS": str(ca.cert_path), "PIP_CERT": bundle, "GIT_SSL_CAINFO": bundle,
    }


def _constraint(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_network(host))
    except ValueError:
        return x509.DNSName(host)


class LeafMinter:
    """Mints leaf certificates for inspected hosts under a name-constrained intermediate.

    Server-side ``SSLContext`` objects are cached per host (LRU); Python's ssl module loads
    certificates only from files, so each leaf passes through a file in a private temporary
    directory that is removed as soon as it is loaded.
    """

    def __init__(self, ca: CA, permitted: list[str], cache_size: int = 1024) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        inter_key = ec.generate_private_key(ec.SECP256R1())
        subtrees = [_constraint(h) for h in sorted(set(permitted))] or [
            x509.DNSName("invalid")]  # nothing inspected: a CA that can name nothing real
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "egresslock"),
                          x509.NameAttribute(NameOID.COMMON_NAME, "egresslock inspection")])
        self._inter_key = inter_key
        self._inter = (
            x509.CertificateBuilder().subject_name(name).issuer_name(ca.cert.subject)
            .public_key(inter_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(hours=1))
            .not_valid_after(_now() + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(True), critical=True)
            .add_extension(x509.NameConstraints(permitted_subtrees=subtrees,
                                                excluded_subtrees=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(inter_key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca.key.public_key()), critical=False)
            .sign(ca.key, hashes.SHA256()))
        self._cache: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._cache_size = cache_size
        self._tmp = tempfile.TemporaryDirectory(prefix="egresslock-leaf-")
        os.chmod(self._tmp.name, 0o700)

    def leaf(self, host: str) -> x509.Certificate:
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self._inter.subject).public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(hours=1))
            .not_valid_after(_now() + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._inter_key.public_key()), critical=False)
            .sign(self._inter_key, hashes.SHA256()))

    def context(self, host: str) -> ssl.SSLContext:
        """A server context presenting a leaf for ``host`` (and the intermediate)."""
        ctx = self._cache.get(host)
        if ctx is not None:
            self._cache.move_to_end(host)
            return ctx
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        path = Path(self._tmp.name) / "leaf.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(_pem(self.leaf(host)) + _pem(self._inter))
            f.write(self._key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
        try:
            ctx.load_cert_chain(path)
        finally:
            path.unlink()
        self._cache[host] = ctx
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return ctx

    def close(self) -> None:
        self._tmp.cleanup()
