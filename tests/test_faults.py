"""Faults and safe defaults: the proxy keeps protecting when its surroundings fail.

- journal unwritable or disk full: flows are still dropped/stripped, one warning, lost records counted;
- invalid config: a clear error naming the file (and line, where TOML gives one) before anything
  listens; a bad reload at runtime keeps the old config;
- upstream down: the client gets mitmproxy's 502, telemetry is still answered locally;
- safe defaults: 127.0.0.1, a warning for other addresses without proxyauth, CA key 0600 in a 0700
  folder, certs/ ignored by git.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons, tflow, tutils

from keyveil.addon import Keyveil
from keyveil.journal import JournalWriter, read_records
from support.servers import REPO, Upstream, free_port, request, start_proxy

CONFIG = REPO / "config"
FORM = "application/x-www-form-urlencoded"
BANZAI = b"q=" + json.dumps([{"posts": [["falco:keystroke_timing", {"t": [1, 2]}, 1737333755506, 0, 10]]}]).encode()
RECORD = {"v": 1, "ts": 1737333755.5, "app": "facebook", "endpoint": "banzai", "host": "www.facebook.com",
          "path": "/ajax/bz", "method": "POST", "kind": "telemetry", "action": "dropped", "mode": "enforce",
          "categories": {"keystroke": {"events": 1, "samples": 2}}, "routes": {"falco:keystroke_timing": 1},
          "size_in": 100, "size_out": 0, "layers": ["form", "json"], "reason": "", "stats": {}}
pytestmark = pytest.mark.timeout(120)


def journal_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "records are being dropped" in r.getMessage()]


def flow(host: str, path: str, body: bytes = b"", ct: str = FORM):
    f = tflow.tflow(req=tutils.treq(host=host, port=443, scheme=b"https", path=path.encode(), method=b"POST",
                                    content=body, headers=((b"host", host.encode()), (b"content-type", ct.encode()))))
    f.request.authority = ""
    return f


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str = "32k"):
    """A really full disk: a tmpfs of a few KiB. Skips where mounting is not allowed (no root, no CAP_SYS_ADMIN)."""
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


# -- the journal ----------------------------------------------------------------------------------


class TestJournalUnwritable:
    def test_path_under_a_file(self, tmp_path, caplog):
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("x")
        caplog.set_level(logging.WARNING)
        w = JournalWriter(blocker / "journal")
        for _ in range(50):
            w.write(dict(RECORD))
        assert w.flush(10)
        st = w.stats
        w.close()
        assert st.written == 0 and st.failed == 50 and st.queued == 0
        assert len(journal_warnings(caplog)) == 1  # warned once, not 50 times

    @pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
    def test_read_only_folder(self, tmp_path, caplog):
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        caplog.set_level(logging.WARNING)
        w = JournalWriter(ro / "journal")
        for _ in range(10):
            w.write(dict(RECORD))
        w.flush(10)
        st = w.stats
        w.close()
        assert st.written == 0 and st.failed == 10 and len(journal_warnings(caplog)) == 1

    async def test_addon_keeps_protecting(self, tmp_path, caplog):
        blocker = tmp_path / "file"
        blocker.write_text("x")
        caplog.set_level(logging.WARNING)
        kv = Keyveil()
        with taddons.context(kv) as tctx:
            tctx.configure(kv, keyveil_config=str(CONFIG), keyveil_log=str(blocker / "journal"))
            for _ in range(20):
                f = flow("www.facebook.com", "/ajax/bz", BANZAI)
                await kv.request(f)
                assert f.response is not None and f.response.status_code == 200 and f.metadata["keyveil"] == "dropped"
            g = flow("www.facebook.com", "/api/graphql/", b"doc_id=1&variables=%7B%7D")
            await kv.request(g)
            assert g.response is None and g.request.content == b"doc_id=1&variables=%7B%7D"
            assert kv.journal.flush(10)
            st = kv.journal.stats
            assert st.written == 0 and st.failed == 21  # every record it could not write is counted
            assert kv.counts.get("dropped") == 20
            kv.done()
        assert len(journal_warnings(caplog)) == 1

    def test_disk_full_file_size_limit(self, tmp_path):
        """EFBIG from RLIMIT_FSIZE in a child process: works without root. Whole records only on disk."""
        script = textwrap.dedent("""
            import json, resource, sys
            resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
            from keyveil.journal import JournalWriter
            rec = json.loads(sys.argv[1])
            w = JournalWriter(sys.argv[2], max_bytes=1 << 30, retention_days=None)
            for i in range(3000):
                w.write(dict(rec, ts=rec["ts"] + i))
                if i % 50 == 49:
                    w.flush(20)  # batches as a live proxy makes them, not one of 3000
            w.flush(20)
            st = w.stats
            w.close()
            print(json.dumps({"written": st.written, "failed": st.failed}))
        """)
        out = subprocess.run([sys.executable, "-c", script, json.dumps(RECORD), str(tmp_path / "j")],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
        assert out.returncode == 0, out.stderr
        st = json.loads(out.stdout.strip().splitlines()[-1])
        assert st["failed"] > 0 and st["written"] > 0 and st["written"] + st["failed"] == 3000
        assert out.stderr.count("records are being dropped") == 1
        recs = list(read_records([tmp_path / "j"]))
        assert len(recs) == st["written"]  # what is on disk reads back; nothing half-written
        assert {r["endpoint"] for r in recs} == {"banzai"}

    def test_disk_full_tmpfs(self, tmp_path, caplog):
        with tiny_tmpfs(tmp_path / "full") as full:
            caplog.set_level(logging.WARNING)
            w = JournalWriter(full / "journal", retention_days=None)
            for i in range(3000):
                w.write(dict(RECORD, ts=RECORD["ts"] + i))
                if i % 50 == 49:
                    w.flush(20)
            assert w.flush(20)
            st = w.stats
            w.close()
            assert st.failed > 0 and st.written + st.failed == 3000
            assert len(journal_warnings(caplog)) == 1
            assert len(list(read_records([full / "journal"]))) == st.written

    def test_proxy_with_unwritable_journal(self, tmp_path):
        up = Upstream().start()
        blocker = tmp_path / "file"
        blocker.write_text("x")
        proxy = start_proxy(tmp_path, up.address, "--log", str(blocker / "journal"), "--pac-port", "-1")
        try:
            for _ in range(30):
                r = request(proxy.port, "POST", "http://www.facebook.com/ajax/bz", BANZAI)
                assert r.status == 200 and r.headers.get("x-keyveil") == "dropped"
            body = b"doc_id=1&variables=%7B%22a%22%3A1%7D"
            r = request(proxy.port, "POST", "http://www.facebook.com/api/graphql/", body)
            assert r.status == 200 and up.seen[-1].body == body and len(up.seen) == 1
        finally:
            out = proxy.stop()
            up.stop()
        assert out.count("records are being dropped") == 1
        assert "Traceback" not in out

    def test_proxy_with_full_disk(self, tmp_path):
        up = Upstream().start()
        with tiny_tmpfs(tmp_path / "full", "16k") as full:
            proxy = start_proxy(tmp_path, up.address, "--log", str(full / "journal"), "--pac-port", "-1")
            try:
                for _ in range(400):
                    r = request(proxy.port, "POST", "http://www.facebook.com/ajax/bz", BANZAI)
                    assert r.status == 200 and r.headers.get("x-keyveil") == "dropped"
                assert up.seen == []
            finally:
                out = proxy.stop()
                up.stop()
            assert out.count("records are being dropped") == 1 and "Traceback" not in out
            kept = list(read_records([full / "journal"]))
            assert 0 < len(kept) < 400 and all(r["action"] == "dropped" for r in kept)


# -- configuration ----------------------------------------------------------------------------------


def config_copy(tmp_path: Path, dirname: str = "cfg", **files: str) -> Path:
    d = tmp_path / dirname
    d.mkdir()
    for name in ("endpoints.toml", "detection.toml", "policy.toml"):
        shutil.copy(CONFIG / name, d / name)
    for name, text in files.items():
        (d / f"{name}.toml").write_text(text)
    return d


def keyveil_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "keyveil.cli", "run", "--listen-port", str(free_port()), "--pac-port", "-1",
           "--confdir", str(tmp_path / "certs"), "--log", str(tmp_path / "j"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)


class TestConfigErrors:
    @pytest.mark.parametrize(("name", "text", "line"), [
        ("endpoints", '[apps]\n"facebook.com" = "facebook"\n\n[[endpoint]\nname = "x"\n', 4),
        ("policy", 'mode = "enforce"\n[defaults]\ntelemetry = drop\n', 3),
        ("detection", "[names]\nkeystroke = [\"*key*\"]\nclick = = 1\n", 3),
    ])
    def test_syntax_error_at_start_names_file_and_line(self, tmp_path, name, text, line):
        cfg = config_copy(tmp_path, **{name: text})
        r = keyveil_run(tmp_path, "--config", str(cfg))
        assert r.returncode == 2
        assert f"{cfg / name}.toml" in r.stderr and f"line {line}" in r.stderr
        assert "Traceback" not in r.stderr + r.stdout and "listening at" not in r.stdout  # never started

    @pytest.mark.parametrize(("name", "text", "where"), [
        ("policy", '[categories]\nkeystroke = "explode"\n', "[categories] keystroke"),
        ("endpoints", '[[endpoint]]\nname = "x"\nhosts = ["facebook.com"]\npaths = ["/x"]\nkind = "bogus"\n', "#1 (x)"),
        ("detection", '[names]\nnot_a_category = ["x"]\n', "not_a_category"),
    ])
    def test_invalid_value_at_start_names_file_and_entry(self, tmp_path, name, text, where):
        cfg = config_copy(tmp_path, **{name: text})
        r = keyveil_run(tmp_path, "--config", str(cfg))
        assert r.returncode == 2 and f"{cfg / name}.toml" in r.stderr and where in r.stderr
        assert "Traceback" not in r.stderr

    def test_missing_folder(self, tmp_path):
        r = keyveil_run(tmp_path, "--config", str(tmp_path / "nowhere"))
        assert r.returncode == 2 and "nowhere/endpoints.toml: cannot read" in r.stderr

    async def test_bad_reload_keeps_the_old_config(self, tmp_path):
        bad_syntax = config_copy(tmp_path, "a", policy="mode = \n")
        bad_value = config_copy(tmp_path, "b", endpoints='[[endpoint]]\nname = "bz"\nhosts = []\npaths = ["/x"]\n')
        kv = Keyveil()
        with taddons.context(kv) as tctx:
            tctx.configure(kv, keyveil_config=str(CONFIG), keyveil_log="")
            for bad in (bad_syntax, bad_value, tmp_path / "missing"):
                with pytest.raises(exceptions.OptionsError, match=str(bad)):
                    tctx.configure(kv, keyveil_config=str(bad))
                assert tctx.options.keyveil_config == str(CONFIG)  # mitmproxy rolled the option back
                f = flow("www.facebook.com", "/ajax/bz", BANZAI)
                await kv.request(f)  # the old catalog and policy still protect
                assert f.response is not None and f.metadata["keyveil"] == "dropped"
            for opt, value in (("keyveil_max_depth", 0), ("keyveil_max_body", -1), ("keyveil_time_budget_ms", -5),
                               ("keyveil_mode", "yolo")):
                with pytest.raises(exceptions.OptionsError, match=opt.removeprefix("keyveil_")):
                    tctx.configure(kv, **{opt: value})
                assert kv.pipeline.limits.max_depth == 64 and kv.pipeline.limits.max_body == 8 * 1024 * 1024
            # a good reload after the bad ones takes effect
            tctx.configure(kv, keyveil_max_depth=5, keyveil_time_budget_ms=0)
            assert kv.pipeline.limits.max_depth == 5 and kv.pipeline.limits.time_budget_ms == 0
            kv.done()


# -- upstream down ----------------------------------------------------------------------------------


def test_upstream_down(tmp_path):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    proxy = start_proxy(tmp_path, dead, "--pac-port", "-1")
    try:
        for _ in range(3):
            r = request(proxy.port, "POST", "http://www.facebook.com/api/graphql/", b"doc_id=1&variables=%7B%7D")
            assert r.status == 502  # mitmproxy's own answer for an unreachable server
            r = request(proxy.port, "POST", "http://www.facebook.com/ajax/bz", BANZAI)
            assert r.status == 200 and r.headers.get("x-keyveil") == "dropped"  # needs no upstream
            r = request(proxy.port, "GET", "http://example.org/")
            assert r.status == 502
        assert proxy.proc.poll() is None
        # once a server listens there again (same port), traffic flows
        port = int(dead.rsplit(":", 1)[1])
        seen: list[bytes] = []

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                n = int(self.headers.get("content-length") or 0)
                seen.append(self.rfile.read(n))
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            r = request(proxy.port, "POST", "http://www.facebook.com/api/graphql/", b"doc_id=2")
            assert r.status == 200 and r.body == b"ok" and seen == [b"doc_id=2"]
        finally:
            server.shutdown()
            server.server_close()
    finally:
        out = proxy.stop()
    assert "Traceback" not in out
    recs = list(read_records([proxy.journal]))
    assert [r["action"] for r in recs].count("dropped") == 3 and [r["action"] for r in recs].count("passed") == 4


# -- safe defaults ----------------------------------------------------------------------------------


def listening_addresses(pid: int, port: int) -> set[str]:
    """Local addresses the process listens on for `port`, from /proc (no traffic needed)."""
    out: set[str] = set()
    for table, v6 in (("tcp", False), ("tcp6", True)):
        p = Path(f"/proc/{pid}/net/{table}")
        if not p.exists():
            continue
        for line in p.read_text().splitlines()[1:]:
            cols = line.split()
            addr, hexport = cols[1].split(":")
            if cols[3] == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                if v6:
                    out.add(str(ipaddress.IPv6Address(bytes.fromhex("".join(
                        addr[i:i + 8][j:j + 2] for i in range(0, 32, 8) for j in (6, 4, 2, 0))))))
                else:
                    out.add(".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return out


class TestSafeDefaults:
    def test_listens_on_loopback_only_and_ca_is_private(self, tmp_path):
        up = Upstream().start()
        proxy = start_proxy(tmp_path, up.address, "--pac-port", "-1")
        try:
            addrs = listening_addresses(proxy.proc.pid, proxy.port)
            assert addrs == {"127.0.0.1"}, addrs
            confdir = proxy.confdir
            assert confdir.stat().st_mode & 0o777 == 0o700
            for key in ("mitmproxy-ca.pem", "mitmproxy-ca.p12"):
                assert (confdir / key).stat().st_mode & 0o777 == 0o600, key
            assert b"PRIVATE KEY" in (confdir / "mitmproxy-ca.pem").read_bytes()
            assert b"PRIVATE KEY" not in (confdir / "mitmproxy-ca-cert.pem").read_bytes()
        finally:
            proxy.stop()
            up.stop()

    def test_loose_permissions_are_tightened_at_start(self, tmp_path):
        up = Upstream().start()
        first = start_proxy(tmp_path, up.address, "--pac-port", "-1")
        first.stop()
        confdir = first.confdir
        confdir.chmod(0o755)
        (confdir / "mitmproxy-ca.pem").chmod(0o644)
        again = start_proxy(tmp_path, up.address, "--pac-port", "-1")
        try:
            assert confdir.stat().st_mode & 0o777 == 0o700
            assert (confdir / "mitmproxy-ca.pem").stat().st_mode & 0o777 == 0o600
        finally:
            again.stop()
            up.stop()

    @pytest.mark.parametrize(("host", "extra", "warned"), [
        ("127.0.0.1", [], False), ("::1", [], False), ("localhost", [], False),
        ("0.0.0.0", [], True), ("192.168.1.20", [], True), ("::", [], True),
        ("0.0.0.0", ["--", "--set", "proxyauth=alice:s3cret"], False),
    ])
    def test_other_addresses_warn_without_proxyauth(self, tmp_path, monkeypatch, capsys, host, extra, warned):
        """In-process, with mitmdump replaced: nothing ever listens on a LAN address in this test."""
        from keyveil import cli

        started: list[list[str]] = []
        monkeypatch.setattr("mitmproxy.tools.main.mitmdump", lambda argv: started.append(argv))
        rc = cli.main(["run", "--listen-host", host, "--pac-port", "-1", "--confdir", str(tmp_path / "c"),
                       "--log", str(tmp_path / "j"), *extra])
        err = capsys.readouterr().err
        assert rc == 0 and len(started) == 1
        argv = started[0]
        assert argv[argv.index("--listen-host") + 1] == host
        assert ("WARNING" in err and "proxy authentication" in err) is warned

    def test_default_listen_host(self, tmp_path, monkeypatch):
        from keyveil import cli

        started: list[list[str]] = []
        monkeypatch.setattr("mitmproxy.tools.main.mitmdump", lambda argv: started.append(argv))
        assert cli.main(["run", "--pac-port", "-1", "--confdir", str(tmp_path / "c"), "--log", str(tmp_path / "j")]) == 0
        assert started[0][started[0].index("--listen-host") + 1] == "127.0.0.1"

    def test_certs_folder_is_git_ignored(self):
        gi = REPO / "certs" / ".gitignore"
        assert gi.exists()
        for name in ("mitmproxy-ca.pem", "mitmproxy-ca.p12", "mitmproxy-ca-cert.pem", "anything.key"):
            r = subprocess.run(["git", "check-ignore", "-q", f"certs/{name}"], cwd=REPO)
            assert r.returncode == 0, name  # ignored
        for name in (".gitignore", "README.md"):
            r = subprocess.run(["git", "check-ignore", "-q", f"certs/{name}"], cwd=REPO)
            assert r.returncode == 1, name  # tracked
        tracked = subprocess.run(["git", "ls-files", "certs"], cwd=REPO, capture_output=True, text=True).stdout.split()
        assert set(tracked) <= {"certs/.gitignore", "certs/README.md"}
