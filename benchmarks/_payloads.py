"""Realistic Meta request bodies of a chosen size, for the benchmarks.

The structure copies the real /ajax/bz bodies in tests/fixtures/facebook-banzai-2025-01.json: a multipart
body with parts `ts` and `q`, `q` a JSON array of wads, each wad's `posts` either a plain array of
`[route, data, time_ms, retry, size]` posts or base64(raw Snappy(JSON)) with `compression:
"snappy_base64"`. Falco posts carry `e` as a JSON *string*. The posts are the fixture's own (device info,
time-spent bitmaps, ODS counters, bd_pdc_signals with real ciphertext) plus keystroke-bearing ones: a
typing-performance trace with keydown/keyup timestamps and dwell times, a pointer trace and click_ref
posts, as Meta's web client sends them. Everything is seeded: the same arguments give the same bytes.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from urllib.parse import urlencode

import cramjam

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "facebook-banzai-2025-01.json"
KIB = 1024

DEVICE = (
    "$^|AcYgMWSw-Gs0RN-k0B18IB5G1ObhUBJ0djDsw1Hwxk8ws1UvLfYToXbPuO8GdaC7aCOwFeboJ7FXhsOP3EzlYYnILlOK|"
    "fd.AcbpzMAS0ybCUzuO3_zjflbSxVMlIgOs2khuRtuN6faJPzGIzcJhjQ7SHmHr0qdi87qlGnvGFV8H4yQkyqKecj8e"
)
SESSION = "ovkhzw:8w3ptf:b0wm93"
T0 = 1737333649685.7  # epoch ms of the fixture's first event


def fixture_posts() -> list[list]:
    """Every plain (uncompressed) post in the fixture, as parsed JSON."""
    data = json.loads(FIXTURE.read_text())
    posts: list[list] = []
    for b in data["bodies"]:
        body = b["body"]
        start = body.index('name="q"') + len('name="q"\r\n\r\n')
        q = json.loads(body[start : body.index("\r\n--", start)])
        for wad in q:
            if isinstance(wad["posts"], list):
                posts.extend(wad["posts"])
    return posts


def _falco(extra: dict, t: float) -> dict:
    return {"e": json.dumps(extra, separators=(",", ":")), "r": 1, "d": DEVICE, "s": SESSION, "t": round(t, 1),
            "b": [1, 128]}


def _typing_post(rng: random.Random, t: float) -> list:
    """A typing-performance trace: keydown/keyup times (page-relative ms) and dwell per key."""
    n = rng.randint(12, 40)
    down: list[float] = []
    up: list[float] = []
    x = rng.uniform(2000, 9000)
    for _ in range(n):
        x += rng.uniform(60, 320)
        dwell = rng.uniform(45, 140)
        down.append(round(x, 1))
        up.append(round(x + dwell, 1))
    extra = {"keypresses": n, "keydown_ts": down, "keyup_ts": up,
             "dwell": [round(u - d, 1) for d, u in zip(down, up, strict=True)],
             "averageTimeToRender": round(rng.uniform(3, 12), 2), "keypressesBelow50ms": rng.randint(0, 5),
             "surface": "messenger_composer"}
    return ["falco:comet_composer_typing_perf", _falco(extra, t), round(t + 3, 1), 0, 0]


def _pointer_post(rng: random.Random, t: float) -> list:
    """A pointer/scroll trace: DOM-event records sharing a timeStamp field."""
    ts = rng.uniform(1000, 5000)
    rows = []
    for _ in range(rng.randint(10, 30)):
        ts += rng.uniform(16, 60)
        rows.append({"type": "pointermove", "timeStamp": round(ts, 1), "clientX": rng.randint(0, 1400),
                     "clientY": rng.randint(0, 900)})
    return ["falco:comet_interaction_trace", _falco({"trace": rows, "surface": "feed"}, t), round(t + 2, 1), 0, 0]


def _click_post(rng: random.Random, t: float) -> list:
    data = [SESSION, int(t), "act", rng.randint(1000, 90000), rng.randint(1, 40), "-", "messenger_thread",
            "click", "send_button", "r", "/messages/t/1000", {"ft": {"click_type": "left"}, "gt": {}},
            rng.randint(0, 1400), rng.randint(0, 900), 0, 0, "MessengerThreadPage", "XMessengerThreadController"]
    return ["click_ref_logger", data, round(t + 1, 1), 0, 0]


def _fixture_post(rng: random.Random, real: list[list], t: float) -> list:
    post = json.loads(json.dumps(rng.choice(real)))  # a deep copy
    post[1]["t"] = round(t, 1)
    post[2] = round(t + rng.uniform(5, 50), 1)
    return post


_REAL: list[list] = []


def make_posts(rng: random.Random, target: int, keystrokes: bool) -> list[list]:
    """Posts until their JSON reaches about `target` bytes. About a third of them are behavioral when
    `keystrokes` is set; the rest come from the fixture."""
    real = _REAL or _REAL.extend(fixture_posts()) or _REAL
    posts: list[list] = []
    size = 2
    t = T0
    while size < target:
        t += rng.uniform(20, 900)
        roll = rng.random()
        if keystrokes and roll < 0.15:
            post = _typing_post(rng, t)
        elif keystrokes and roll < 0.25:
            post = _pointer_post(rng, t)
        elif keystrokes and roll < 0.33:
            post = _click_post(rng, t)
        else:
            post = _fixture_post(rng, real, t)
        post[4] = len(json.dumps(post[1], separators=(",", ":")))
        posts.append(post)
        size += len(json.dumps(post, separators=(",", ":"))) + 1
    return posts


def _wad(posts: list[list] | str, compression: str, trigger: str) -> dict:
    wad: dict = {"app_id": "256281040558", "posts": posts, "user": "0", "webSessionId": SESSION,
                 "trigger": trigger, "send_method": "ajax", "compression": compression}
    if compression == "snappy_base64":
        wad["snappy_ms"] = 1
    return wad


def _snappy_b64(posts: list[list]) -> str:
    raw = json.dumps(posts, separators=(",", ":")).encode()
    return base64.b64encode(bytes(cramjam.snappy.compress_raw(raw))).decode()


def banzai_batch(size: int, *, seed: int = 0, keystrokes: bool = True, snappy: bool = True) -> tuple[bytes, str]:
    """A multipart /ajax/bz body of about `size` bytes (within a few percent) and its content type.

    The posts are split over wads; with `snappy`, one wad in three is snappy_base64. Since Snappy
    shrinks JSON, a compressed wad holds more posts than its bytes suggest, as in real traffic.
    """
    rng = random.Random(seed)
    boundary = "----WebKitFormBoundary" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEF0123456789")
                                                  for _ in range(16))

    def render(wads: list[dict]) -> bytes:
        q = json.dumps(wads, separators=(",", ":"))
        parts = [("ts", str(int(T0 + 100_000))), ("q", q)]
        out = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{n}\"\r\n\r\n{v}\r\n" for n, v in parts)
        return (out + f"--{boundary}--\r\n").encode()

    overhead = len(render([]))
    budget = max(size - overhead, 200)
    n_wads = max(1, min(8, budget // (8 * KIB) + 1))
    wads: list[dict] = []
    for i in range(n_wads):
        share = budget // n_wads - 260  # the wad's own keys
        compress = snappy and i % 3 == 1
        if compress:
            # aim the *encoded* size at the share: base64 of Snappy is about 0.55-0.8 of the JSON
            posts = make_posts(rng, int(share / 0.7), keystrokes)
            wads.append(_wad(_snappy_b64(posts), "snappy_base64", posts[0][0]))
        else:
            posts = make_posts(rng, share, keystrokes)
            wads.append(_wad(posts, "", posts[0][0]))
    body = render(wads)
    # trim or pad with fixture posts in the last plain wad so the size lands close to the target
    plain = next((w for w in reversed(wads) if isinstance(w["posts"], list)), None)
    if plain is not None:
        real = _REAL
        n = len(body)  # tracked by the size of each post, rendered once at the end
        while n > size * 1.03 and len(plain["posts"]) > 1:
            n -= len(json.dumps(plain["posts"].pop(), separators=(",", ":"))) + 1
        while n < size * 0.97:
            post = _fixture_post(rng, real, T0 + rng.uniform(0, 1e5))
            plain["posts"].append(post)
            n += len(json.dumps(post, separators=(",", ":"))) + 1
        body = render(wads)
    return body, f"multipart/form-data; boundary={boundary}"


def graphql_send(size: int, *, seed: int = 0) -> tuple[bytes, str]:
    """A functional GraphQL message send (url-encoded form) carrying typing metrics in `variables`,
    padded to about `size` bytes with an ordinary message text (the work the request really does)."""
    rng = random.Random(seed)
    n = 40
    x = 1500.0
    down, up = [], []
    for _ in range(n):
        x += rng.uniform(60, 320)
        down.append(round(x, 1))
        up.append(round(x + rng.uniform(45, 140), 1))
    metrics = {"keydown_ts": down, "keyup_ts": up, "dwell": [round(u - d, 1) for d, u in zip(down, up, strict=True)]}

    def render(text: str) -> bytes:
        variables = {"input": {
            "client_mutation_id": "7", "actor_id": "100000000000001", "message": {"text": text},
            "thread_id": "1000000000000042", "offline_threading_id": "73373337550060000", "source": "www_chat",
            "typing_metrics": metrics,
            "client_timing": {"compose_start": down[0], "send_clicked": up[-1] + 80,
                              "compose_ms": round(up[-1] + 80 - down[0])},
        }}
        form = {"av": "100000000000001", "__user": "100000000000001", "__a": "1", "__req": "7", "__comet_req": "15",
                "fb_dtsg": "NAcKvFixtureDtsg:1:1", "jazoest": "25500", "lsd": "AVqKvFixtureLsd",
                "fb_api_caller_class": "RelayModern", "fb_api_req_friendly_name": "useMWChatSendMessageMutation",
                "variables": json.dumps(variables, separators=(",", ":")), "server_timestamps": "true",
                "doc_id": "7241726279209872"}
        return urlencode(form).encode()

    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "we", "talk", "about",
             "lunch", "plans"]
    text = "hi"
    body = render(text)
    # grow the message text in chunks, then by word, to land near the size
    while len(body) < size:
        grow = max(1, (size - len(body)) // 8)
        text += " " + " ".join(rng.choice(words) for _ in range(grow))
        body = render(text)
    while len(body) > size * 1.02 and " " in text:
        text = text.rsplit(" ", 1)[0]
        body = render(text)
    return body, "application/x-www-form-urlencoded"


BANZAI_URL = "https://www.facebook.com/ajax/bz?__a=1&__req=1f&__comet_req=15"
GRAPHQL_URL = "https://www.facebook.com/api/graphql/"


if __name__ == "__main__":
    for kib in (1, 16, 64, 1024):
        b, ct = banzai_batch(kib * KIB)
        g, _ = graphql_send(kib * KIB)
        print(f"{kib:5d} KiB target: banzai {len(b):8d} bytes, graphql {len(g):8d} bytes")
