"""keyveil's CA: creation, permissions, fingerprints (checked against openssl), exported formats, and
the printed trust steps (the NSS ones are run for real when certutil is installed)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from mitmproxy.certs import CertStore

from keyveil import certs, cli

OPENSSL = shutil.which("openssl")
CERTUTIL = shutil.which("certutil")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def openssl(*args: str, stdin: bytes | None = None) -> bytes:
    assert OPENSSL is not None
    proc = subprocess.run([OPENSSL, *args], input=stdin, capture_output=True, timeout=20)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("confdir") / "certs"
    certs.ensure_ca(d)
    return d


@posix_only
def test_ensure_ca_creates_mitmproxy_files_with_private_modes(ca_dir: Path) -> None:
    paths = certs.ca_paths(ca_dir)
    for p in (paths.key_pem, paths.key_p12, paths.cert_pem, paths.cert_cer, paths.cert_p12):
        assert p.is_file(), p
    assert mode(paths.confdir) == 0o700
    assert mode(paths.key_pem) == mode(paths.key_p12) == 0o600
    # the public files stay readable, the key file holds key and certificate
    assert b"PRIVATE KEY" in paths.key_pem.read_bytes()
    assert b"PRIVATE KEY" not in paths.cert_pem.read_bytes()


@posix_only
def test_ensure_ca_keeps_existing_ca_and_repairs_modes(tmp_path: Path) -> None:
    # a CA mitmproxy itself created, with loose modes as a careless copy would leave them
    CertStore.from_store(tmp_path, "mitmproxy", 2048)
    paths = certs.ca_paths(tmp_path)
    before = paths.key_pem.read_bytes()
    (tmp_path / "wireguard.conf").write_text("{}")
    os.chmod(paths.key_pem, 0o644)
    os.chmod(paths.key_p12, 0o666)
    os.chmod(tmp_path / "wireguard.conf", 0o644)
    os.chmod(tmp_path, 0o755)

    again = certs.ensure_ca(tmp_path)
    assert again == paths
    assert paths.key_pem.read_bytes() == before  # not regenerated
    assert mode(tmp_path) == 0o700
    assert mode(paths.key_pem) == mode(paths.key_p12) == mode(tmp_path / "wireguard.conf") == 0o600


@needs_openssl
def test_fingerprints_match_openssl(ca_dir: Path) -> None:
    pem = certs.ca_paths(ca_dir).cert_pem.read_bytes()
    out = openssl("x509", "-noout", "-fingerprint", "-sha256", stdin=pem).decode()
    assert certs.fingerprint_sha256(pem) == out.strip().split("=", 1)[1]
    out1 = openssl("x509", "-noout", "-fingerprint", "-sha1", stdin=pem).decode()
    assert certs.fingerprint_sha1(pem) == out1.strip().split("=", 1)[1].replace(":", "")
    # Chromium's documented recipe for --ignore-certificate-errors-spki-list
    pub = openssl("x509", "-pubkey", "-noout", stdin=pem)
    der = openssl("pkey", "-pubin", "-outform", "der", stdin=pub)
    digest = openssl("dgst", "-sha256", "-binary", stdin=der)
    b64 = openssl("base64", "-A", stdin=digest).decode().strip()
    assert certs.spki_sha256_b64(pem) == b64
    # str input and the certificate in the key file give the same answer
    assert certs.fingerprint_sha256(pem.decode()) == certs.fingerprint_sha256(
        certs.load_ca_certificate(certs.ca_paths(ca_dir))
    )


@needs_openssl
def test_written_formats_parse_back_and_hold_no_key(ca_dir: Path, tmp_path: Path) -> None:
    paths = certs.ca_paths(ca_dir)
    cert = certs.load_ca_certificate(paths)
    files = certs.write_formats(cert, tmp_path / "out")
    fp = certs.fingerprint_sha256(cert)

    assert certs.fingerprint_sha256(files.pem.read_bytes()) == fp
    assert files.crt.read_bytes() == files.pem.read_bytes()
    der = files.der.read_bytes()
    assert der[:1] == b"\x30"  # DER SEQUENCE, not PEM text
    assert certs.fingerprint_sha256(x509.load_der_x509_certificate(der)) == fp
    assert b"sha256 Fingerprint=" + fp.encode() in openssl(
        "x509", "-inform", "DER", "-noout", "-fingerprint", "-sha256", "-in", str(files.der)
    )
    p12 = pkcs12.load_pkcs12(files.p12.read_bytes(), None)
    # without a key the loader reports the lone certificate among "additional" ones
    assert p12.key is None
    inside = [c.certificate for c in ([p12.cert] if p12.cert else []) + p12.additional_certs]
    assert [certs.fingerprint_sha256(c) for c in inside] == [fp]
    info = openssl("pkcs12", "-in", str(files.p12), "-passin", "pass:", "-nokeys")
    assert certs.fingerprint_sha256(info) == fp

    key = serialization.load_pem_private_key(paths.key_pem.read_bytes(), None)
    key_der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    secret = key.private_numbers().d.to_bytes(256, "big").lstrip(b"\0")  # type: ignore[union-attr]
    for p in (files.pem, files.crt, files.der, files.p12):
        data = p.read_bytes()
        assert b"PRIVATE KEY" not in data and key_der not in data and secret not in data, p
        if os.name != "nt":
            assert mode(p) == 0o644


@needs_openssl
def test_exported_ca_verifies_the_leaves_mitmproxy_makes(ca_dir: Path, tmp_path: Path) -> None:
    files = certs.write_formats(certs.load_ca_certificate(certs.ca_paths(ca_dir)), tmp_path)
    store = CertStore.from_store(ca_dir, "mitmproxy", 2048)
    leaf = store.get_cert("www.facebook.com", [])
    leaf_pem = tmp_path / "leaf.pem"
    leaf_pem.write_bytes(leaf.cert.to_pem())
    out = openssl("verify", "-CAfile", str(files.pem), "-purpose", "sslserver", str(leaf_pem))
    assert out.strip().endswith(b"OK")


def test_trust_instructions_cover_every_platform(ca_dir: Path, tmp_path: Path) -> None:
    cert = certs.load_ca_certificate(certs.ca_paths(ca_dir))
    files = certs.write_formats(cert, tmp_path)
    text = certs.trust_instructions(cert, files, proxy_port=18080)
    for needle in (
        certs.fingerprint_sha256(cert),
        "update-ca-certificates",
        "/usr/local/share/ca-certificates/keyveil-ca.crt",
        f"trust anchor --store {files.pem}",
        f"security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain {files.pem}",
        f'certutil -addstore root "{files.der}"',
        f"certutil -delstore root {certs.fingerprint_sha1(cert)}",
        '"Certificates": {"Install": [',
        'certutil -d sql:"$HOME/.pki/nssdb" -A',
        f"--ignore-certificate-errors-spki-list={certs.spki_sha256_b64(cert)}",
        "--proxy-server=127.0.0.1:18080",
        "Install a certificate",
        "Certificate Trust Settings",
    ):
        assert needle in text, needle


@pytest.mark.skipif(CERTUTIL is None or OPENSSL is None, reason="NSS certutil is not installed")
@pytest.mark.timeout(60)
def test_printed_nss_commands_make_chromium_db_trust_mitmproxy_leaves(ca_dir: Path, tmp_path: Path) -> None:
    """Run the exact Chromium-on-Linux lines `keyveil certs` prints against a fresh NSS database."""
    cert = certs.load_ca_certificate(certs.ca_paths(ca_dir))
    files = certs.write_formats(cert, tmp_path / "export")
    text = certs.trust_instructions(cert, files)
    lines = [
        ln.strip().split("   #")[0]
        for ln in text.splitlines()
        if re.match(r'\s*(mkdir -p "\$HOME/\.pki|certutil -d sql:"\$HOME/\.pki/nssdb" -[NA])', ln)
    ]
    assert len(lines) == 3
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    db = f"sql:{home}/.pki/nssdb"

    store = CertStore.from_store(ca_dir, "mitmproxy", 2048)
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(store.get_cert("edge-chat.facebook.com", []).cert.to_pem())

    def verify_leaf() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["certutil", "-V", "-u", "V", "-n", "leaf", "-d", db], env=env, capture_output=True, timeout=20
        )

    for line in lines[:2]:
        subprocess.run(["bash", "-c", line], env=env, check=True, timeout=20, capture_output=True)
    subprocess.run(
        ["certutil", "-A", "-n", "leaf", "-t", ",,", "-i", str(leaf), "-d", db], env=env, check=True
    )
    assert verify_leaf().returncode != 0  # not trusted yet
    subprocess.run(["bash", "-c", lines[2]], env=env, check=True, timeout=20, capture_output=True)
    listed = subprocess.run(["certutil", "-L", "-d", db], env=env, capture_output=True, text=True).stdout
    assert re.search(rf"{re.escape(certs.NSS_NICKNAME)}\s+C,,", listed), listed
    res = verify_leaf()
    assert res.returncode == 0 and b"certificate is valid" in res.stdout, res.stdout + res.stderr


@posix_only
def test_certs_command_output_and_refusals(tmp_path: Path, capsys) -> None:
    confdir = tmp_path / "fresh"
    out = tmp_path / "export"
    assert cli.main(["certs", "--confdir", str(confdir), "--write-formats", str(out)]) == 0
    text = capsys.readouterr().out
    paths = certs.ca_paths(confdir)
    cert = certs.load_ca_certificate(paths)
    assert "created a new CA" in text
    assert str(paths.key_pem) in text and str(paths.cert_pem) in text
    assert f"SHA-256 fingerprint: {certs.fingerprint_sha256(cert)}" in text
    assert f"SPKI SHA-256 (base64): {certs.spki_sha256_b64(cert)}" in text
    assert "mitmproxy-ca.pem 0600" in text
    assert str(out / "keyveil-ca.cer") in text and (out / "keyveil-ca.p12").is_file()
    assert "PRIVATE KEY" not in text
    assert mode(confdir) == 0o700 and mode(paths.key_pem) == 0o600

    # second run: same CA, not "created"
    assert cli.main(["certs", "--confdir", str(confdir)]) == 0
    text2 = capsys.readouterr().out
    assert "created a new CA" not in text2
    assert certs.fingerprint_sha256(cert) in text2
    assert str(paths.cert_pem) in text2  # without exports, the steps name mitmproxy's own files

    assert cli.main(["certs", "--confdir", str(confdir), "--write-formats", str(confdir)]) == 1
    assert "must not be the CA's own folder" in capsys.readouterr().err
