"""The OpenAI-compatible server, tested over real HTTP: uvicorn on a loopback port, a real bundle.

Each server runs in a background thread of this process (so its RSS is ours to read); one test
runs `python -m edge_ssd.server` as a subprocess and stops it with SIGTERM.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
psutil = pytest.importorskip("psutil")

from edge_ssd.api import Engine  # noqa: E402
from edge_ssd.server import ServeOptions, build_app  # noqa: E402
from edge_ssd.server.net import server_config  # noqa: E402

HOST = "127.0.0.1"
MSGS = [{"role": "user", "content": "Write a function that adds two numbers."}]
LONG_PROMPT = "def add"  # with the tiny pair, greedy runs to any max_tokens (no early EOS)
JSON = {"content-type": "application/json"}


class Live:
    """uvicorn serving `app` on a free loopback port, in a daemon thread, with the settings
    `edge-ssd serve` uses (its limits included); `config` overrides some."""

    def __init__(self, app, **config):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        srv = getattr(app.state, "edge_ssd", None)  # a scripted app (tests/test_web.py) has no EdgeServer
        cfg = server_config(app, srv.options if srv is not None else ServeOptions(), **config)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.url = f"http://{HOST}:{self.port}"

    def __enter__(self) -> "Live":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 20) -> None:
        self.server.should_exit = True  # what uvicorn's SIGTERM handler does
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "server did not stop"

    def __exit__(self, *exc) -> None:
        if self.thread.is_alive():
            self.stop()
        self.sock.close()

    def client(self, key: str = "unused") -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def metrics(self, **headers) -> dict:
        r = httpx.get(self.url + "/metrics", headers=headers, timeout=10)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/plain")
        out = {}
        for line in r.text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


class SlowEngine:
    """The real engine with a pause after each text piece, so a request lasts long enough to
    watch: queue it, disconnect from it, shut down under it. Records how each stream ended."""

    def __init__(self, engine: Engine, delay: float):
        self.engine, self.delay = engine, delay
        self.completed = 0
        self.closed_early: list = []  # pieces delivered by each stream closed before its end

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def stream(self, prompt=None, **kw):
        inner = self.engine.stream(prompt, **kw)
        outer = self

        class Slow:
            result = None

            def __iter__(self):
                it, n, done = iter(inner), 0, False
                try:
                    for piece in it:
                        time.sleep(outer.delay)
                        n += 1
                        yield piece
                    done = True
                    self.result = inner.result
                finally:
                    it.close()
                    if done:
                        outer.completed += 1
                    else:
                        outer.closed_early.append(n)

        return Slow()


def sse(resp):
    """The JSON payloads of an event stream, None for `data: [DONE]`."""
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield None if data == "[DONE]" else json.loads(data)


def wait_for(cond, timeout: float = 10.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def assert_error(r, status: int, param=None, type_="invalid_request_error"):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["type"] == type_, err
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.fixture(scope="module")
def engine(fp32_bundle):
    return Engine.load(fp32_bundle.path, provider="cpu", threads=1)


@pytest.fixture(scope="module")
def live(engine):
    with Live(build_app(engine, ServeOptions(max_concurrency=2, queue=64))) as s:
        yield s


def test_openai_client_chat_completion_and_streaming(live, engine):
    client = live.client()
    name = engine.bundle.name
    health = httpx.get(live.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["model"] == name and health["max_context"] == engine.max_context
    assert [m.id for m in client.models.list().data] == [name]
    assert client.models.retrieve(name).id == name

    chat = client.chat.completions.create(model=name, messages=MSGS, max_tokens=8)
    direct = engine.generate(messages=MSGS, max_new_tokens=8)
    assert chat.object == "chat.completion" and chat.model == name
    msg = chat.choices[0].message
    assert msg.role == "assistant" and msg.content == direct.text
    assert chat.choices[0].finish_reason == ("length" if direct.finish_reason == "length" else "stop")
    stats = chat.model_extra["edge_ssd"]
    assert stats["mode"] == "spec" and stats["new_tokens"] == chat.usage.completion_tokens
    assert 1 <= chat.usage.completion_tokens <= 8
    assert chat.usage.prompt_tokens == direct.stats["prompt_tokens"]
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    assert {"acceptance_rate", "mean_accepted_len", "tokens_per_s"} <= set(stats)

    # text completion: the prompt is raw, as OpenAI's completions endpoint means it
    comp = client.completions.create(model=name, prompt="def add(a, b):", max_tokens=12, extra_body={"mode": "ar"})
    ref = engine.generate("def add(a, b):", raw=True, mode="ar", max_new_tokens=12)
    assert comp.choices[0].text == ref.text and comp.model_extra["edge_ssd"]["mode"] == "ar"
    assert comp.usage.completion_tokens == ref.stats["new_tokens"]

    # streamed chat: the deltas add up to the same text; usage comes last
    chunks = list(client.chat.completions.create(model=name, messages=MSGS, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct.text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["edge_ssd"]["new_tokens"] == chat.usage.completion_tokens
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1

    # streamed completion, with a stop string that cuts the text
    full = engine.generate(LONG_PROMPT, raw=True, max_new_tokens=40).text
    stop = full[10:12]
    pieces = list(client.completions.create(model=name, prompt=LONG_PROMPT, max_tokens=40, stream=True, stop=[stop]))
    streamed = "".join(c.choices[0].text for c in pieces)
    assert streamed == full[: full.index(stop)]
    assert pieces[-1].choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors(live):
    url = live.url + "/v1/chat/completions"
    post = lambda body, **kw: httpx.post(url, json=body, timeout=30, **kw)  # noqa: E731
    post_raw = lambda content: httpx.post(url, content=content, headers=JSON, timeout=30)  # noqa: E731
    assert_error(post_raw(b'{"messages": ['), 400)
    assert_error(post_raw(b"\xff\xfe"), 400)
    assert_error(post_raw(b'{"messages": NaN}'), 400)
    assert_error(post([1, 2]), 400)
    assert_error(post({"messages": "hi"}), 400, "messages")
    assert_error(post({"messages": [{"role": "robot", "content": "hi"}]}), 400, "messages")
    assert_error(post({"messages": MSGS, "temperature": "hot"}), 400, "temperature")
    assert_error(post({"messages": MSGS, "temperature": -1}), 400, "temperature")
    assert_error(post({"messages": MSGS, "top_p": 0}), 400, "top_p")
    assert_error(post({"messages": MSGS, "max_tokens": 0}), 400, "max_tokens")
    assert_error(post({"messages": MSGS, "max_tokens": 10**9}), 400, "max_tokens")
    assert_error(post({"messages": MSGS, "max_tokens": True}), 400, "max_tokens")
    assert_error(post({"messages": MSGS, "stop": [""]}), 400, "stop")
    assert_error(post({"messages": MSGS, "n": 2}), 400, "n")
    assert_error(post({"messages": MSGS, "stream": "yes"}), 400, "stream")
    assert_error(post({"messages": MSGS, "mode": "fast"}), 400, "mode")
    err = assert_error(post({"messages": [{"role": "user", "content": "def add " * 400}]}), 400, "messages")
    assert err["code"] == "context_length_exceeded"
    assert_error(httpx.post(live.url + "/v1/completions", json={"prompt": [1, 2, 3]}, timeout=30), 400, "prompt")
    # the official client sees the same: a 400 naming the parameter
    with pytest.raises(openai.BadRequestError) as e:
        live.client().chat.completions.create(model="x", messages=MSGS, temperature=-0.5)
    assert e.value.status_code == 400 and "temperature" in str(e.value)
    # size limits: 413 for a body over 1 MiB, announced or chunked
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
    assert_error(post_raw(big), 413)
    assert_error(post_raw(iter([big[i:i + 65536] for i in range(0, len(big), 65536)])), 413)
    # routes and methods
    assert_error(httpx.get(url, timeout=30), 405)
    assert_error(httpx.get(live.url + "/v1/nothing", timeout=30), 404, type_="not_found_error")
    # streamed requests are checked before the stream starts: a plain 400, not an event
    r = post({"messages": MSGS, "stream": True, "top_k": -1})
    assert_error(r, 400, "top_k")
    # and the server is fine afterwards
    assert post({"messages": MSGS, "max_tokens": 2}).status_code == 200
    assert live.metrics()['edge_ssd_requests_total{endpoint="chat",status="400"}'] >= 18


def test_api_key(engine):
    key = "s3cret-key"
    with Live(build_app(engine, ServeOptions(api_key=key))) as s:
        url = s.url + "/v1/chat/completions"
        body = {"messages": MSGS, "max_tokens": 2}
        assert_error(httpx.post(url, json=body, timeout=30), 401, type_="authentication_error")
        assert_error(httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=30), 401,
                     type_="authentication_error")
        assert_error(httpx.post(url, json=body, headers={"Authorization": key}, timeout=30), 401,
                     type_="authentication_error")
        assert_error(httpx.get(s.url + "/v1/models", timeout=30), 401, type_="authentication_error")
        assert httpx.get(s.url + "/metrics", timeout=30).status_code == 401
        assert httpx.get(s.url + "/health", timeout=30).json()["status"] == "ok"  # health stays open
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").chat.completions.create(model="m", messages=MSGS, max_tokens=2)
        ok = s.client(key).chat.completions.create(model="m", messages=MSGS, max_tokens=2)
        assert ok.usage.completion_tokens >= 1
        assert s.metrics(Authorization=f"Bearer {key}")['edge_ssd_requests_total{endpoint="chat",status="401"}'] == 4


def test_concurrent_load_no_lost_response_and_memory_returns(live):
    proc = psutil.Process()
    client = live.client()
    for _ in range(3):  # warm-up: first-use allocations are not a leak
        client.chat.completions.create(model="m", messages=MSGS, max_tokens=8)
    rss0 = proc.memory_info().rss
    before = live.metrics()
    threads, per_thread = 16, 10
    results: list = []
    errors: list = []

    def worker(t: int) -> None:
        c = live.client()
        with httpx.Client(base_url=live.url, timeout=60) as h:
            for i in range(per_thread):
                try:
                    content = f"thread {t} request {i}"
                    kind = (t + i) % 3
                    if kind == 0:  # streamed chat over raw HTTP: every event parses, [DONE] ends it
                        with h.stream("POST", "/v1/chat/completions", json={
                                "messages": [{"role": "user", "content": content}], "max_tokens": 8,
                                "stream": True}) as r:
                            assert r.status_code == 200, r.read()
                            events = list(sse(r))
                        assert events[-1] is None and events[-2]["choices"][0]["finish_reason"]
                        n = events[-2]["usage"]["completion_tokens"]
                    elif kind == 1:
                        out = c.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                                        max_tokens=8, temperature=0.8, seed=t * 100 + i)
                        n = out.usage.completion_tokens
                    else:
                        out = c.completions.create(model="m", prompt=content, max_tokens=8)
                        n = out.usage.completion_tokens
                    assert 1 <= n <= 8
                    results.append((t, i, kind, n))
                except Exception as e:  # noqa: BLE001 - collected and reported below
                    errors.append((t, i, repr(e)))

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(120)
    assert not errors, errors[:5]
    assert len(results) == threads * per_thread
    assert len({(t, i) for t, i, _, _ in results}) == threads * per_thread
    after = live.metrics()

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert delta('edge_ssd_requests_total{endpoint="chat",status="200"}') == sum(1 for r in results if r[2] < 2)
    assert delta('edge_ssd_requests_total{endpoint="completions",status="200"}') == sum(
        1 for r in results if r[2] == 2)
    assert delta("edge_ssd_completion_tokens_total") == sum(r[3] for r in results)
    assert sum(delta(k) for k in after if k.startswith("edge_ssd_finished_total")) == len(results)
    assert not any(k.startswith("edge_ssd_requests_total") and 'status="429"' in k for k in after)
    assert after["edge_ssd_requests_running"] == 0 and after["edge_ssd_queue_depth"] == 0
    assert after["edge_ssd_tokens_per_second"] > 0
    assert after["edge_ssd_process_resident_memory_bytes"] > 0 and after["edge_ssd_memory_available_bytes"] > 0
    growth = proc.memory_info().rss - rss0
    assert growth < 150 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB"


def test_full_queue_429_and_disconnect_stops_generation(engine):
    slow = SlowEngine(engine, delay=0.05)  # 100 pieces for 200 tokens: ~5 s if nobody stopped it
    with Live(build_app(slow, ServeOptions(max_concurrency=1, queue=0))) as s:
        body = {"prompt": LONG_PROMPT, "max_tokens": 200, "stream": True}
        with httpx.Client(base_url=s.url, timeout=30) as first:
            with first.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                events = sse(r)
                assert next(events)["choices"][0]["text"]
                assert next(events)["choices"][0]["finish_reason"] is None
                m = s.metrics()
                assert m["edge_ssd_requests_running"] == 1 and m["edge_ssd_queue_depth"] == 0
                busy = httpx.post(s.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2},
                                  timeout=30)
                assert_error(busy, 429, type_="rate_limit_error")
                assert busy.headers["retry-after"] == "1"
                t_close = time.monotonic()
            # the client hung up mid-stream
        assert wait_for(lambda: s.metrics()["edge_ssd_requests_running"] == 0, timeout=3)
        freed_after = time.monotonic() - t_close
        assert freed_after < 2.0, freed_after
        assert wait_for(lambda: len(slow.closed_early) == 1, timeout=3)
        assert slow.closed_early[0] < 60 and slow.completed == 0  # stopped early, not run to the end
        m = s.metrics()
        assert m["edge_ssd_client_disconnects_total"] == 1
        assert m['edge_ssd_requests_total{endpoint="completions",status="499"}'] == 1
        assert m['edge_ssd_requests_total{endpoint="chat",status="429"}'] == 1
        # the slot is free again: the next request runs at once
        t0 = time.monotonic()
        ok = httpx.post(s.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 4}, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        assert time.monotonic() - t0 < 3.0


def test_queued_request_waits_and_leaves_when_client_goes(engine):
    slow = SlowEngine(engine, delay=0.05)
    with Live(build_app(slow, ServeOptions(max_concurrency=1, queue=1))) as s:
        long_body = {"prompt": LONG_PROMPT, "max_tokens": 200, "stream": True}
        with httpx.Client(base_url=s.url, timeout=30) as first, first.stream("POST", "/v1/completions",
                                                                            json=long_body) as r:
            events = sse(r)
            next(events)
            # a second request waits in the queue (a non-streamed one that gives up after 0.5 s)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(s.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2}, timeout=0.5)
            assert wait_for(lambda: s.metrics()["edge_ssd_queue_depth"] == 0, timeout=3)
            assert s.metrics()["edge_ssd_requests_running"] == 1
            # a queued request that stays is answered once the slot frees
            waited: dict = {}
            th = threading.Thread(target=lambda: waited.setdefault("r", httpx.post(
                s.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 3}, timeout=60)))
            th.start()
            assert wait_for(lambda: s.metrics()["edge_ssd_queue_depth"] == 1, timeout=3)
            assert_error(httpx.post(s.url + "/v1/completions", json={"prompt": "x"}, timeout=30), 429,
                         type_="rate_limit_error")
        th.join(30)
        assert waited["r"].status_code == 200, waited["r"].text
        m = s.metrics()
        assert m['edge_ssd_requests_total{endpoint="chat",status="499"}'] == 1  # left while queued
        assert m["edge_ssd_queue_depth"] == 0 and m["edge_ssd_requests_running"] == 0


def test_graceful_shutdown_finishes_or_stops_in_flight_work(engine, capfd):
    # SIGTERM with time to spare: the streamed request in flight runs to [DONE]
    slow = SlowEngine(engine, delay=0.02)
    with Live(build_app(slow, ServeOptions()), timeout_graceful_shutdown=10) as s:
        with httpx.Client(base_url=s.url, timeout=30) as c, c.stream(
                "POST", "/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 40, "stream": True}) as r:
            events = sse(r)
            next(events)
            stopper = threading.Thread(target=s.stop)
            stopper.start()
            rest = list(events)
        stopper.join(20)
        assert not s.thread.is_alive()
        assert rest[-1] is None and rest[-2]["usage"]["completion_tokens"] == 40
        assert slow.completed == 1 and slow.closed_early == []

    # a deadline shorter than the request: the stream ends with an error event and [DONE], the
    # queued request gets a JSON 503, the generation stops, and the log has no traceback
    slow = SlowEngine(engine, delay=0.05)
    capfd.readouterr()
    with Live(build_app(slow, ServeOptions(queue=2)), timeout_graceful_shutdown=0.5) as s:
        queued: dict = {}
        waiter = threading.Thread(target=lambda: queued.setdefault("r", httpx.post(
            s.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2}, timeout=10)))
        with httpx.Client(base_url=s.url, timeout=5) as c, c.stream(
                "POST", "/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 200, "stream": True}) as r:
            events = sse(r)
            next(events)
            waiter.start()
            assert wait_for(lambda: s.metrics()["edge_ssd_queue_depth"] == 1, timeout=5)
            t0 = time.monotonic()
            stopper = threading.Thread(target=s.stop)
            stopper.start()
            rest = list(events)
        stopper.join(20)
        waiter.join(20)
        assert not s.thread.is_alive() and time.monotonic() - t0 < 4
        assert rest[-1] is None and rest[-2]["error"]["code"] == "server_shutting_down", rest[-3:]
        assert all(e["choices"][0]["finish_reason"] is None for e in rest[:-2])
        err = assert_error(queued["r"], 503, type_="server_error")
        assert err["code"] == "server_shutting_down"
        assert wait_for(lambda: len(slow.closed_early) == 1, timeout=3) and slow.completed == 0
    log = capfd.readouterr().err
    assert "Traceback" not in log and "Exception in ASGI" not in log, log
    # the engine is free for the next user
    assert engine.generate("hi", max_new_tokens=2).stats["new_tokens"] >= 1


def serve_command() -> list:
    """`edge-ssd serve` once the CLI has the subcommand, else the module's own entry point."""
    import argparse

    from edge_ssd.cli import build_parser

    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return ["-m", "edge_ssd.cli", "serve"] if "serve" in subs.choices else ["-m", "edge_ssd.server"]


def test_cli_serve_subprocess_env_key_and_sigterm(fp32_bundle):
    with socket.socket() as sk:
        sk.bind((HOST, 0))
        port = sk.getsockname()[1]
    env = dict(os.environ, EDGE_SSD_API_KEY="k123")
    p = subprocess.Popen([sys.executable, *serve_command(), "--bundle", str(fp32_bundle.path),
                          "--port", str(port), "--provider", "cpu", "--threads", "1", "--max-new-tokens", "5",
                          "--mode", "ar", "--queue", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://{HOST}:{port}"

        def up() -> bool:
            assert p.poll() is None, p.communicate()
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(up, timeout=60, step=0.2)
        body = {"prompt": "def add", "raw": True}
        assert httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 401
        r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer k123"}, timeout=30)
        assert r.status_code == 200, r.text
        out = r.json()  # the command line's generation flags are the request defaults
        assert out["usage"]["completion_tokens"] == 5 and out["edge_ssd"]["mode"] == "ar"
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode in (0, -signal.SIGTERM), (p.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    assert "edge-ssd serve" in stdout and "pair-fp32" in stdout


def test_embed_service_example(fp32_bundle):
    """deploy/examples/embed_service.py: JSON lines in, streamed JSON lines out, bad lines answered."""
    script = os.path.join(os.path.dirname(__file__), "..", "deploy", "examples", "embed_service.py")
    lines = [{"id": 1, "prompt": LONG_PROMPT, "raw": True, "max_new_tokens": 12}, "not json",
             {"id": 3, "messages": MSGS, "temperature": -1}, {"id": 4, "messages": MSGS, "max_new_tokens": 4}]
    stdin = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    p = subprocess.run([sys.executable, script, "--bundle", str(fp32_bundle.path), "--provider", "cpu",
                        "--threads", "1"], input=stdin, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    out = [json.loads(line) for line in p.stdout.splitlines()]
    done = {m["id"]: m for m in out if m.get("done")}
    assert set(done) == {1, 4}
    for rid in (1, 4):
        assert "".join(m["delta"] for m in out if m["id"] == rid and "delta" in m) == done[rid]["text"]
    assert done[1]["stats"]["new_tokens"] == 12
    errors = {m["id"]: m["error"] for m in out if "error" in m}
    assert set(errors) == {None, 3} and "temperature" in errors[3]
