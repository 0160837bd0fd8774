"""The journal: framing and torn tails, a real kill -9, rotation, retention, permissions, redaction,
full disks and unwritable folders, salts."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyveil import journal as J
from keyveil.journal import JournalWriter, read_records

FIXTURE = Path(__file__).parent / "fixtures" / "facebook-banzai-2025-01.json"


def rec(i: int, **kw: object) -> dict:
    r = {
        "v": 1,
        "ts": 1733300000.0 + i,
        "app": "facebook",
        "endpoint": "banzai",
        "host": "www.facebook.com",
        "path": "/ajax/bz",
        "method": "POST",
        "kind": "telemetry",
        "action": "dropped",
        "mode": "enforce",
        "categories": {"keystroke": {"events": 3, "samples": 120}, "activity": {"events": 1, "samples": 64}},
        "routes": {"falco:bd_pdc_signals": 1},
        "size_in": 2048 + i,
        "size_out": 0,
        "layers": ["multipart", "json"],
        "reason": "",
        "stats": {"seq": i},
    }
    r.update(kw)
    return r


def write_all(d: Path, records: list[dict], **kw: object) -> JournalWriter:
    w = JournalWriter(d, **kw)
    for r in records:
        w.write(r)
    w.close()
    return w


def test_round_trip_and_stats(tmp_path: Path) -> None:
    records = [rec(i) for i in range(300)]
    w = write_all(tmp_path / "j", records)
    assert w.stats.written == 300 and w.stats.failed == 0 and w.stats.queued == 0
    got = list(read_records(tmp_path / "j"))
    assert len(got) == 300
    for i, g in enumerate(got):
        clean, _ = J.redact(records[i])
        assert g == clean
        assert g["stats"]["seq"] == i and g["size_in"] == 2048 + i
    # the strings are interned: a record costs about a quarter of its JSON
    assert w.stats.bytes < 300 * len(json.dumps(records[0])) / 3


def frames_of(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each frame after the magic, parsed independently of the module."""
    out, off = [], len(J.MAGIC)
    while off < len(data):
        assert data[off] == 0xC6
        n = struct.unpack(">I", data[off + 1 : off + 5])[0]
        out.append((off, off + 5 + n + 5))
        off += 10 + n
    return out


def count_records(path: Path, chunk: int) -> tuple[list[int], J.FileInfo]:
    seqs: list[int] = []
    info = J.FileInfo(path)
    for _, arrs in J.iter_file(path, chunk_bytes=chunk, info=info):
        seqs += [J.decode_record(a, info.table)["stats"]["seq"] for a in arrs]
    return seqs, info


@pytest.mark.parametrize("chunk", [7, 97, 1 << 20])
def test_torn_tail_at_every_offset_keeps_every_earlier_record(tmp_path: Path, chunk: int) -> None:
    w = write_all(tmp_path / "j", [rec(i) for i in range(40)])
    data = Path(w.path).read_bytes()  # type: ignore[arg-type]
    frames = frames_of(data)
    ends = [e for _, e in frames]
    rng = random.Random(chunk)
    cuts = sorted(
        set(range(ends[-4], len(data) + 1)) | {rng.randrange(len(J.MAGIC), len(data)) for _ in range(60)}
    )
    torn = tmp_path / "torn.kvj"
    for cut in cuts:
        torn.write_bytes(data[:cut])
        seqs, info = count_records(torn, chunk)
        complete = sum(1 for e in ends if e <= cut)
        # frames are the header, string definitions and records; only records count
        want = sum(
            1
            for s, e in frames
            if e <= cut and data[s + 5] in (0xDC, *range(0x90, 0xA0)) and s != frames[0][0]
        )
        assert seqs == list(range(want)), cut
        good_end = max([e for e in ends if e <= cut], default=len(J.MAGIC))
        assert info.torn_bytes == cut - good_end
        assert complete >= want


def test_corrupt_frame_stops_the_file_cleanly(tmp_path: Path) -> None:
    w = write_all(tmp_path / "j", [rec(i) for i in range(50)])
    data = bytearray(Path(w.path).read_bytes())  # type: ignore[arg-type]
    frames = frames_of(bytes(data))
    s, e = frames[30]
    data[s + 8] ^= 0xFF  # a flipped bit inside a payload: the checksum catches it
    bad = tmp_path / "bad.kvj"
    bad.write_bytes(bytes(data))
    seqs, info = count_records(bad, 1 << 20)
    assert seqs == list(range(len(seqs))) and 20 < len(seqs) < 30
    assert info.torn_bytes == len(data) - s
    # garbage appended after a healthy file (zeros, as a crash can leave) is ignored too
    bad.write_bytes(Path(w.path).read_bytes() + b"\0" * 300)  # type: ignore[arg-type]
    seqs, info = count_records(bad, 64)
    assert seqs == list(range(50)) and info.torn_bytes == 300


CHILD = textwrap.dedent(
    """
    import os, sys, time
    from keyveil import journal
    from keyveil.journal import JournalWriter

    if sys.argv[2] == "slow":
        # a slow disk: the 5th batch is written in two halves with a pause between, so the kill lands
        # in the middle of a record for sure. Everything else is the real write path.
        real, calls = journal._write_all, [0]

        def halves(fd, data):
            calls[0] += 1
            big = len(data) > 150_000  # three records or more: whole ones come before the tear
            if calls[0] < 3 or not (big or calls[0] > 40):
                return real(fd, data)
            os.write(fd, bytes(data[: len(data) // 2 + 7]))
            print("MID big" if big else "MID", flush=True)
            time.sleep(30)

        journal._write_all = halves

    w = JournalWriter(sys.argv[1], detail="full", max_bytes=1 << 30)
    blob = ["several words of text " * 18] * 150  # about 60 KB per record: writes span many pages
    i = 0
    while True:
        w.write({"ts": 1733300000.0 + i, "app": "facebook", "action": "dropped", "stats": {"seq": i}, "blob": blob})
        i += 1
        if i % 20 == 0:
            w.flush()
            print(i, flush=True)
    """
)


def _kill_child(d: Path, mode: str, min_flushed: int) -> tuple[int, bool]:
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(d), mode], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    flushed, big = 0, False
    try:
        while True:
            line = p.stdout.readline()
            assert line, "child died"
            if line.startswith("MID"):
                big = "big" in line
                break
            flushed = int(line)
            if mode == "random" and flushed >= min_flushed:
                time.sleep(random.uniform(0.0, 0.05))
                break
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    for line in p.stdout:  # anything flushed before the kill landed
        if not line.startswith("MID"):
            flushed = int(line)
    return flushed, big


@pytest.mark.timeout(90)
def test_kill_9_mid_write_loses_only_the_record_being_written(tmp_path: Path) -> None:
    flushed, big = _kill_child(tmp_path / "slow", "slow", 0)
    seqs = [r["stats"]["seq"] for r in read_records(tmp_path / "slow")]
    (info,) = J.scan_files([tmp_path / "slow"])
    assert info.torn_bytes > 0  # the kill did land inside a record
    assert seqs == list(range(len(seqs))) and len(seqs) >= flushed
    if big:  # the half-written batch: its whole records before the tear survive, only the torn one is lost
        assert len(seqs) > flushed

    for attempt in range(3):  # and kills at random moments
        d = tmp_path / f"k{attempt}"
        flushed, _ = _kill_child(d, "random", 40 + 40 * attempt)
        seqs = [r["stats"]["seq"] for r in read_records(d)]
        assert seqs == list(range(len(seqs)))  # a prefix: nothing earlier lost, nothing garbled
        assert len(seqs) >= flushed


def test_rotation_by_size_and_reading_several_files_as_one(tmp_path: Path) -> None:
    d = tmp_path / "j"
    w = write_all(d, [rec(i) for i in range(400)], max_bytes=4096)
    files = sorted(d.glob("*.kvj"))
    assert len(files) == w.stats.files > 5
    for f in files:
        assert f.stat().st_size < 4096 + 200  # rotated right after the record that crossed the limit
    assert [r["stats"]["seq"] for r in read_records(d)] == list(range(400))
    assert [r["stats"]["seq"] for r in read_records(files[2:4])] == [
        r["stats"]["seq"] for f in files[2:4] for r in read_records(f)
    ]


def test_two_instances_merge_in_time_order_and_time_filters(tmp_path: Path) -> None:
    d = tmp_path / "j"
    a = JournalWriter(d)
    b = JournalWriter(d / "other.kvj")  # a file path: its folder and its stem
    for i in range(100):
        (a if i % 2 else b).write(rec(i))
    a.close()
    b.close()
    assert len(list(d.glob("*.kvj"))) == 2 and list(d.glob("other-*.kvj"))
    ts = [r["ts"] for r in read_records(d)]
    assert ts == sorted(ts) and len(ts) == 100
    sel = [r["stats"]["seq"] for r in read_records(d, since=1733300010, until=1733300020)]
    assert sel == list(range(10, 20))


def test_retention_removes_old_journal_files_only(tmp_path: Path) -> None:
    d = tmp_path / "j"
    write_all(d, [rec(i) for i in range(5)], retention_days=None)
    (old,) = d.glob("*.kvj")
    other = d / "notes.txt"
    other.write_text("keep me")
    week_ago = time.time() - 8 * 86400
    os.utime(old, (week_ago, week_ago))
    os.utime(other, (week_ago, week_ago))
    w = write_all(d, [rec(i) for i in range(5)], retention_days=7)
    assert not old.exists() and other.exists() and Path(w.path).exists()  # type: ignore[arg-type]
    write_all(d, [rec(1)], retention_days=None)  # None keeps everything
    assert len(list(d.glob("*.kvj"))) == 2


def test_permissions_0700_and_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        d = tmp_path / "state" / "journal"
        w = write_all(d, [rec(1)])
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        assert stat.S_IMODE(Path(w.path).stat().st_mode) == 0o600  # type: ignore[arg-type]
    finally:
        os.umask(old)


def test_an_existing_open_folder_is_left_alone_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    open_dir = tmp_path / "shared"  # like /tmp: chmod-ing it would break other users
    open_dir.mkdir()
    os.chmod(open_dir, 0o1777)
    w = write_all(open_dir, [rec(1)])
    assert stat.S_IMODE(open_dir.stat().st_mode) == 0o1777
    assert stat.S_IMODE(Path(w.path).stat().st_mode) == 0o600  # type: ignore[arg-type]
    assert any("readable by other users" in r.message for r in caplog.records)


def _fixture_secrets() -> tuple[dict, list[str]]:
    """A record that leaks real values from the captured Banzai payload into every field it can."""
    body = json.loads(FIXTURE.read_text())["bodies"][0]["body"]
    q = body.split('name="q"\r\n\r\n', 1)[1].split("\r\n", 1)[0]
    wad = json.loads(q)[0]
    post = wad["posts"][0]
    falco = post[1]
    extra = json.loads(falco["e"])
    secrets = [
        wad["webSessionId"],  # ovkhzw:...
        wad["app_id"],
        extra["asid"],
        extra["sjd"][:40],
        falco["d"][4:40],
        str(int(falco["t"])),  # a raw event timestamp (ms)
        str(int(post[2])),
        body.split('name="ts"\r\n\r\n', 1)[1][:13],  # the request's own ts part
    ]
    leaky = rec(
        1,
        app=wad["app_id"],
        endpoint=extra["asid"],
        host=f"{wad['app_id']}.facebook.com",
        path=f"/ajax/bz/{wad['webSessionId']}/{extra['asid']}",
        method=wad["webSessionId"],
        reason=f"decode failed near sjd={extra['sjd'][:40]} asid={extra['asid']}",
        layers=["multipart", falco["d"][4:40]],
        routes={"falco:bd_pdc_signals": 1, f"falco:{wad['webSessionId']}": 2, extra["asid"]: 3},
        stats={"keystroke_median_gap_ms": 123, "first_key_t": falco["t"], "t_ms": int(falco["t"])},
        session=wad["webSessionId"],
        user=wad["user"],
        cookie="c_user=100012345678; xs=abc",
        fb_dtsg=extra["sjd"][:40],
        sample={"t": falco["t"], "asid": extra["asid"]},
    )
    return leaky, secrets


@pytest.mark.parametrize("detail", ["summary", "full"])
def test_redaction_keeps_tokens_ids_and_raw_timestamps_out_of_the_bytes(tmp_path: Path, detail: str) -> None:
    leaky, secrets = _fixture_secrets()
    d = tmp_path / "j"
    w = write_all(d, [leaky], detail=detail)
    raw = b"".join(f.read_bytes() for f in d.glob("*.kvj"))
    t = leaky["stats"]["first_key_t"]
    for s in [*secrets, "100012345678", "c_user"]:
        assert s.encode() not in raw, s
    if detail == "summary":  # numbers too: the raw timestamp in any binary form
        for packed in (
            msgpack.packb(t),
            msgpack.packb(int(t)),
            struct.pack(">d", t),
            struct.pack(">Q", int(t)),
        ):
            assert packed not in raw
    (got,) = read_records(d)
    assert got["routes"]["falco:bd_pdc_signals"] == 1
    assert got["stats"]["keystroke_median_gap_ms"] == (120 if detail == "summary" else 123)
    assert "session" not in got and "user" not in got and "cookie" not in got and "fb_dtsg" not in got
    assert got["path"].startswith("/ajax/bz/:id") and got["method"] == "OTHER"
    assert w.stats.redacted_fields >= (5 if detail == "summary" else 3)
    if detail == "summary":
        assert "sample" not in got and got["ts"] == float(round(leaky["ts"]))
    else:
        assert got["detail"] == "full" and got["sample"] == {"t": t}  # kept, minus the id-shaped string


def test_salted_hash_and_salt_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    s1 = J.load_salt(state)
    assert len(s1) == 32 and J.load_salt(state) == s1
    salt_file = state / "salt"
    assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600 and stat.S_IMODE(state.stat().st_mode) == 0o700
    h = J.salted_hash("ovkhzw:8w3ptf:b0wm93", s1)
    assert len(h) == 16 and h == J.salted_hash(b"ovkhzw:8w3ptf:b0wm93", s1)
    assert h != J.salted_hash("ovkhzw:8w3ptf:b0wm93", os.urandom(32))
    # a salted hash is the one id-like value the journal keeps, in its own field
    w = write_all(tmp_path / "j", [rec(1, session=h)])
    (got,) = read_records(tmp_path / "j")
    assert got["session"] == h and w.stats.redacted_fields == 0


def test_env_state_dir_is_used_for_the_salt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYVEIL_HOME", str(tmp_path / "home"))
    J.load_salt()
    assert (tmp_path / "home" / "salt").is_file()
    assert J.default_journal_dir() == tmp_path / "home" / "journal"


FULL_DISK_CHILD = textwrap.dedent(
    """
    import json, logging, resource, signal, sys
    logging.basicConfig(level=logging.WARNING, format="WARN %(message)s")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
    from keyveil.journal import JournalWriter
    w = JournalWriter(sys.argv[1], max_bytes=1 << 30)
    for i in range(3000):
        w.write({"ts": 1733300000.0 + i, "app": "facebook", "action": "dropped", "stats": {"seq": i},
                 "reason": "padding " * 10})
        if i % 100 == 0:
            w.flush()
    w.close()
    s = w.stats
    print(json.dumps({"written": s.written, "failed": s.failed}))
    """
)


@pytest.mark.timeout(60)
def test_full_disk_never_raises_counts_and_warns_once(tmp_path: Path) -> None:
    d = tmp_path / "j"
    p = subprocess.run(
        [sys.executable, "-c", FULL_DISK_CHILD, str(d)], capture_output=True, text=True, timeout=50
    )
    assert p.returncode == 0, p.stderr
    stats = json.loads(p.stdout)
    assert stats["written"] > 50 and stats["failed"] > 1000
    assert stats["written"] + stats["failed"] == 3000
    assert p.stderr.count("WARN") == 1, p.stderr
    seqs = [r["stats"]["seq"] for r in read_records(d)]
    assert len(seqs) == stats["written"] and seqs == sorted(seqs)
    for f in d.glob("*.kvj"):
        assert J.scan_files([f])[0].torn_bytes == 0  # a failed write is cut back, never left torn


def test_unwritable_journal_counts_everything_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    w = JournalWriter(blocker / "journal")  # a folder under a file: fails for root too
    for i in range(50):
        w.write(rec(i))
    assert w.flush(5)
    w.close()
    w.write(rec(99))  # after close: counted, not raised
    assert w.stats.written == 0 and w.stats.failed == 51
    assert sum("records are being dropped" in r.message for r in caplog.records) == 1


def test_full_queue_drops_without_blocking(tmp_path: Path) -> None:
    w = JournalWriter(tmp_path / "j", queue_size=1)
    t0 = time.perf_counter()
    for i in range(5000):
        w.write(rec(i))
    elapsed = time.perf_counter() - t0
    w.close()
    s = w.stats
    assert s.written + s.failed == 5000 and s.failed > 0
    assert elapsed < 2.0
    assert len(list(read_records(tmp_path / "j"))) == s.written


def test_records_reach_the_disk_within_a_second_without_flush(tmp_path: Path) -> None:
    w = JournalWriter(tmp_path / "j")
    try:
        w.write(rec(1))
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline and not list(read_records(tmp_path / "j")):
            time.sleep(0.05)
        assert len(list(read_records(tmp_path / "j"))) == 1
    finally:
        w.close()


def test_foreign_and_empty_files_are_skipped(tmp_path: Path) -> None:
    d = tmp_path / "j"
    write_all(d, [rec(i) for i in range(3)])
    (d / "zz-empty.kvj").write_bytes(b"")
    (d / "zz-foreign.kvj").write_bytes(b"not a journal at all")
    assert len(list(read_records(d))) == 3
    infos = {i.path.name: i for i in J.scan_files([d])}
    assert not infos["zz-foreign.kvj"].valid and infos["zz-empty.kvj"].records == 0


def test_an_oversized_full_record_keeps_its_schema_fields_and_the_file_stays_readable(tmp_path: Path) -> None:
    huge = {f"k{i}": ["word " * 99] * 200 for i in range(60)}  # about 6 MB of extra fields
    w = write_all(tmp_path / "j", [rec(0), rec(1, blob=huge), rec(2)], detail="full")
    got = list(read_records(tmp_path / "j"))
    assert [r["stats"]["seq"] for r in got] == [0, 1, 2]
    assert "blob" not in got[1] and got[1]["categories"] == rec(1)["categories"]
    assert w.stats.redacted_fields >= 1 and w.stats.failed == 0


_leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40)
JSONISH = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["v", "ts", "app", "endpoint", "host", "path", "method", "kind", "action", "mode", "categories", "routes",
          "size_in", "size_out", "layers", "reason", "stats", "session", "detail", "extra_field"]  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(st.sampled_from(FIELDS), JSONISH, max_size=len(FIELDS)),
    st.sampled_from(["summary", "full"]),
)
def test_any_record_shape_is_redacted_encoded_and_read_back(raw: dict, detail: str) -> None:
    clean, _ = J.redact(raw, detail)
    enc = J.Encoder()
    payload = enc.encode(clean)
    got = J.decode_record(payload, enc.table())
    want = dict(clean)
    extra = want.pop("extra", None) or {}
    want.update({k: v for k, v in extra.items() if k not in want})  # extra fields read back at the top
    assert got == want
    assert all(isinstance(got[k], str) for k in ("app", "host", "path", "method", "kind", "action", "mode"))
