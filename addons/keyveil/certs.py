"""The CA keyveil's mitmproxy signs with: where it is, its fingerprints, the formats devices take,
and how to trust it on each platform.

mitmproxy creates the CA in its confdir on first run. `ensure_ca` creates it the same way beforehand
so trust can be set up before the first `keyveil run`. The private key stays in its 0600 file: this
module only ever writes the public certificate.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shlex
import stat
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

CONF_BASENAME = "mitmproxy"  # mitmproxy's CONF_BASENAME: the files are named after it
KEY_SIZE = 2048  # mitmproxy's default key_size
EXPORT_BASENAME = "keyveil-ca"
NSS_NICKNAME = "keyveil CA"
DIR_MODE = 0o700
SECRET_MODE = 0o600


@dataclass(frozen=True)
class CaPaths:
    """mitmproxy's CA files in a confdir."""

    confdir: Path
    key_pem: Path  # private key + certificate: secret
    key_p12: Path  # private key + certificate, PKCS#12: secret
    cert_pem: Path  # certificate only, PEM
    cert_cer: Path  # certificate only, PEM bytes under a .cer name (mitmproxy writes it for Android)
    cert_p12: Path  # certificate only, PKCS#12
    wireguard_conf: Path  # WireGuard mode keys (JSON): secret

    @property
    def secret_files(self) -> tuple[Path, ...]:
        return (self.key_pem, self.key_p12, self.wireguard_conf)


@dataclass(frozen=True)
class CertFiles:
    """Public certificate files in the formats platforms take."""

    pem: Path  # PEM: Linux, Firefox, NSS, macOS
    crt: Path  # the same PEM named .crt: Debian's update-ca-certificates only reads *.crt
    der: Path  # DER, .cer: Windows, Android, iOS
    p12: Path  # certificate-only PKCS#12 (no key, no password): Windows import wizard


def ca_paths(confdir: str | Path) -> CaPaths:
    d = Path(confdir).expanduser()
    b = CONF_BASENAME
    return CaPaths(
        confdir=d,
        key_pem=d / f"{b}-ca.pem",
        key_p12=d / f"{b}-ca.p12",
        cert_pem=d / f"{b}-ca-cert.pem",
        cert_cer=d / f"{b}-ca-cert.cer",
        cert_p12=d / f"{b}-ca-cert.p12",
        wireguard_conf=d / "wireguard.conf",
    )


def ensure_ca(confdir: str | Path) -> CaPaths:
    """The CA in `confdir`, created exactly as mitmproxy would if it is absent; permissions enforced."""
    paths = ca_paths(confdir)
    paths.confdir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if not paths.key_pem.exists():
        # imported here: only CA creation needs mitmproxy
        from mitmproxy.certs import CertStore

        CertStore.from_store(paths.confdir, CONF_BASENAME, KEY_SIZE)
    enforce_permissions(paths)
    return paths


def enforce_permissions(paths: CaPaths) -> None:
    """chmod the confdir to 0700 and every secret file to 0600, then check it took.

    Raises PermissionError when a mode cannot be set (e.g. the file belongs to someone else).
    No-op on Windows, where POSIX modes do not exist.
    """
    if os.name == "nt":
        return
    targets = [(paths.confdir, DIR_MODE)] + [(p, SECRET_MODE) for p in paths.secret_files if p.exists()]
    for path, mode in targets:
        if stat.S_IMODE(path.stat().st_mode) != mode:
            os.chmod(path, mode)
        actual = stat.S_IMODE(path.stat().st_mode)
        if actual != mode:
            raise PermissionError(f"{path}: mode is {actual:04o}, must be {mode:04o}")


def load_ca_certificate(paths: CaPaths) -> x509.Certificate:
    """The certificate mitmproxy signs with: the first one in `mitmproxy-ca.pem` (the key's file is
    the source of truth; the -cert files are copies mitmproxy made from it)."""
    source = paths.key_pem if paths.key_pem.exists() else paths.cert_pem
    return x509.load_pem_x509_certificates(source.read_bytes())[0]


def _cert(pem: bytes | str | x509.Certificate) -> x509.Certificate:
    if isinstance(pem, x509.Certificate):
        return pem
    data = pem.encode() if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificates(data)[0]


def fingerprint_sha256(pem: bytes | str | x509.Certificate) -> str:
    """SHA-256 of the DER certificate, as `AB:CD:...` (what openssl, browsers and iOS show)."""
    return _cert(pem).fingerprint(hashes.SHA256()).hex(":").upper()


def fingerprint_sha1(pem: bytes | str | x509.Certificate) -> str:
    """SHA-1 thumbprint, hex without separators: what macOS `security -Z` and Windows `certutil` take."""
    return _cert(pem).fingerprint(hashes.SHA1()).hex().upper()


def spki_sha256_b64(pem: bytes | str | x509.Certificate) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)): the value Chromium's --ignore-certificate-errors-spki-list takes."""
    spki = (
        _cert(pem)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def write_formats(pem: bytes | str | x509.Certificate, out_dir: str | Path) -> CertFiles:
    """Write the certificate (never the key) as PEM, .crt (PEM), .cer (DER) and cert-only PKCS#12."""
    cert = _cert(pem)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    b = EXPORT_BASENAME
    files = CertFiles(pem=out / f"{b}.pem", crt=out / f"{b}.crt", der=out / f"{b}.cer", p12=out / f"{b}.p12")
    pem_bytes = cert.public_bytes(serialization.Encoding.PEM)
    files.pem.write_bytes(pem_bytes)
    files.crt.write_bytes(pem_bytes)
    files.der.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    files.p12.write_bytes(
        pkcs12.serialize_key_and_certificates(
            name=NSS_NICKNAME.encode(),
            key=None,
            cert=cert,
            cas=None,
            encryption_algorithm=serialization.NoEncryption(),
        )
    )
    for p in (files.pem, files.crt, files.der, files.p12):
        os.chmod(p, 0o644)  # public on purpose: devices and other users need to read it
    return files


def default_cert_files(paths: CaPaths) -> CertFiles:
    """The public files mitmproxy already writes, for when no formats were exported."""
    return CertFiles(pem=paths.cert_pem, crt=paths.cert_pem, der=paths.cert_cer, p12=paths.cert_p12)


def _q(p: Path) -> str:
    return shlex.quote(str(p))


def _wq(p: Path) -> str:
    return f'"{p}"'


def trust_instructions(
    pem: bytes | str | x509.Certificate,
    files: CertFiles,
    *,
    proxy_port: int = 8080,
) -> str:
    """Exact steps to trust the CA on each platform and browser."""
    cert = _cert(pem)
    sha256 = fingerprint_sha256(cert)
    sha1 = fingerprint_sha1(cert)
    spki = spki_sha256_b64(cert)
    cn = cert.subject.rfc4514_string()
    nick = shlex.quote(NSS_NICKNAME)
    return f"""\
Trust the keyveil CA ({cn}) on the devices whose Meta traffic keyveil should clean.
Before trusting it anywhere, check the SHA-256 fingerprint the device shows:
  {sha256}
  (here: openssl x509 -noout -fingerprint -sha256 -in {_q(files.pem)})
Anyone holding the private key can impersonate any website to a device that trusts this CA.
keyveil keeps it in a 0600 file and never copies it; remove the trust when you stop using keyveil.

Linux, system store (curl, wget, Python with the system bundle, most GTK/Qt apps)
  Debian, Ubuntu:
    sudo cp {_q(files.crt)} /usr/local/share/ca-certificates/keyveil-ca.crt
    sudo update-ca-certificates
    remove: sudo rm /usr/local/share/ca-certificates/keyveil-ca.crt && sudo update-ca-certificates --fresh
  Fedora, RHEL, CentOS, Arch (p11-kit):
    sudo trust anchor --store {_q(files.pem)}
    remove: sudo trust anchor --remove {_q(files.pem)}
  (Firefox and Chromium on Linux do not read the system store: see below.)

macOS (Safari, Chrome, Edge, and Firefox 120+)
  sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain {_q(files.pem)}
  remove: sudo security delete-certificate -Z {sha1} /Library/Keychains/System.keychain

Windows (Edge, Chrome, and Firefox 120+), in an administrator prompt:
  certutil -addstore root {_wq(files.der)}
  without administrator rights, for your user only: certutil -user -addstore root {_wq(files.der)}
  or double-click {files.p12.name} and import it into "Trusted Root Certification Authorities".
  remove: certutil -delstore root {sha1}

Firefox (its own certificate store)
  Settings > Privacy & Security > Certificates > View Certificates > Authorities > Import...,
  choose {files.pem.name}, tick "Trust this CA to identify websites".
  Or with NSS tools (apt install libnss3-tools), Firefox closed, for each profile folder:
    certutil -A -d sql:"$HOME/.mozilla/firefox/PROFILE" -n {nick} -t C,, -i {_q(files.pem)}
  Or by policy, for every profile: in policies.json (Linux: /etc/firefox/policies/policies.json)
    {{"policies": {{"Certificates": {{"Install": ["{files.pem}"]}}}}}}
  On Windows and macOS, Firefox 120+ also trusts the system store
  (about:config security.enterprise_roots.enabled = true).

Chromium, Chrome, Brave, Edge on Linux (NSS database of your user)
  mkdir -p "$HOME/.pki/nssdb"
  certutil -d sql:"$HOME/.pki/nssdb" -N --empty-password   # only if the database does not exist yet
  certutil -d sql:"$HOME/.pki/nssdb" -A -n {nick} -t C,, -i {_q(files.pem)}
  remove: certutil -d sql:"$HOME/.pki/nssdb" -D -n {nick}
  On Windows and macOS, Chrome uses the system store above.
  Without trusting the CA, for a throwaway profile only (the flag needs --user-data-dir):
    chromium --user-data-dir="$HOME/.cache/keyveil-chromium" \\
      --proxy-server=127.0.0.1:{proxy_port} \\
      --ignore-certificate-errors-spki-list={spki}

Android
  Copy {files.der.name} to the phone (or open http://mitm.it through keyveil), then
  Settings > Security > More security settings > Encryption & credentials > Install a certificate
  > CA certificate (the path varies by maker; search Settings for "CA certificate").
  Chrome and the system browser then trust it. Apps, including Facebook, Instagram, Messenger and
  WhatsApp, ignore user-installed CAs and pin their certificates: their traffic is not inspected.
  Firefox for Android 120+ trusts user-installed CAs too (older versions: Settings > About Firefox,
  tap the logo 5 times, then Secret Settings > "Use third party CA certificates").

iOS, iPadOS
  Send {files.der.name} to the device (AirDrop, Mail, or open http://mitm.it in Safari through keyveil),
  Settings > General > VPN & Device Management > the downloaded profile > Install, then
  Settings > General > About > Certificate Trust Settings > turn on full trust for "{_common_name(cert)}".
  Safari then trusts it. Meta's apps pin their certificates: their traffic is not inspected.

Check: with the proxy set, open https://www.facebook.com/ - no certificate warning means the trust
works; http://keyveil/ shows keyveil's live summary.
"""


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def describe(paths: CaPaths, cert: x509.Certificate) -> str:
    """Where the CA is and what it is."""
    not_after = cert.not_valid_after_utc.astimezone(UTC).strftime("%Y-%m-%d")
    not_before = cert.not_valid_before_utc.astimezone(UTC).strftime("%Y-%m-%d")
    modes = []
    for p in (paths.confdir, *paths.secret_files):
        if p.exists() and os.name != "nt":
            modes.append(f"{p.name} {stat.S_IMODE(p.stat().st_mode):04o}")
    return (
        f"keyveil CA in {paths.confdir}\n"
        f"  certificate (public): {paths.cert_pem}\n"
        f"  private key (secret, never copied): {paths.key_pem}\n"
        f"  subject: {cert.subject.rfc4514_string()}\n"
        f"  valid: {not_before} to {not_after}\n"
        f"  SHA-256 fingerprint: {fingerprint_sha256(cert)}\n"
        f"  SPKI SHA-256 (base64): {spki_sha256_b64(cert)}\n"
        f"  permissions: {', '.join(modes) or 'n/a'}\n"
    )
