"""The chat page, tested as a person uses it: headless Chromium (Debian's chromium and
chromium-driver, through selenium) against a real server on loopback with a tiny bundle.

The browser tests are skipped, with the reason, where Chromium or selenium is missing; the
page's routes are checked over plain HTTP everywhere the serve extra is installed.
"""
from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from edge_ssd.server import ServeOptions, build_app  # noqa: E402
from edge_ssd.server.web import STATIC, asset  # noqa: E402
from test_server import Live, SlowEngine, wait_for  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import chat_screenshot as page  # noqa: E402

KEY = "s3cret-key"
MESSAGE = "Write a function that adds two numbers."
FOLLOW_UP = "And one that multiplies them."
MAX_TOKENS = 24


class NoEngine:
    """Enough of an engine for the routes that never generate."""
    max_context = 64


def browser_missing() -> str:
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install 'edge-ssd[test]')"
    chromium, driver = page.browser_paths()
    if not chromium or not driver:
        return "chromium / chromedriver not on PATH (apt-get install chromium chromium-driver)"
    return ""


MISSING = browser_missing()
needs_browser = pytest.mark.skipif(bool(MISSING), reason=MISSING or "the browser is there")


@pytest.fixture(scope="module")
def browser():
    driver = page.start_browser()
    yield driver
    driver.quit()


def test_page_routes_without_a_key():
    with Live(build_app(NoEngine(), ServeOptions(api_key=KEY))) as live:
        r = httpx.get(live.url + "/", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert '<script src="/static/app.js"' in r.text
        assert not [n for n in STATIC if b"://" in asset(n)]   # no CDN, nothing from elsewhere
        assert r.headers["content-security-policy"].startswith("default-src 'self'")
        for name, kind in STATIC.items():
            r = httpx.get(f"{live.url}/static/{name}", timeout=10)
            assert r.status_code == 200 and r.headers["content-type"] == kind, name
            assert r.headers["x-content-type-options"] == "nosniff"
        for bad in ("/static/nope.js", "/static/..%2Fserver%2Fweb.py", "/static/__init__.py", "/static/"):
            r = httpx.get(live.url + bad, timeout=10)
            assert r.status_code == 404, bad
        assert httpx.get(live.url + "/v1/models", timeout=10).status_code == 401   # the API still needs the key


def png_size(data: bytes) -> tuple:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def engine(fp32_bundle):
    from edge_ssd.api import Engine

    return Engine.load(fp32_bundle.path, provider="cpu", threads=1)


@needs_browser
def test_chat_in_the_browser(engine, browser, tmp_path):
    """Key prompt, settings, two streamed replies equal to the engine's own output for the
    conversation so far, their stats; a screenshot."""
    def engine_reply(messages: list):
        return engine.generate(messages=messages, max_new_tokens=MAX_TOKENS, temperature=0.0, mode="spec",
                               drafter="model")

    turn1 = [{"role": "user", "content": MESSAGE}]
    expected = engine_reply(turn1)
    assert expected.text.strip(), "the tiny pair produced no text to look for"
    expected2 = engine_reply(turn1 + [{"role": "assistant", "content": expected.text},
                                      {"role": "user", "content": FOLLOW_UP}])
    with Live(build_app(engine, ServeOptions(api_key=KEY))) as live:
        features = httpx.get(live.url + "/health", timeout=10).json().get("features", [])
        page.open_page(browser, live.url, key=KEY)
        page.apply_settings(browser, {"temperature": 0, "max_tokens": MAX_TOKENS, "mode": "spec",
                                      "drafter": "model", "show_sources": True})
        reply = page.send_message(browser, MESSAGE, timeout=120)
        reply2 = page.send_message(browser, FOLLOW_UP, timeout=120)   # the page keeps the conversation
        shot = browser.get_screenshot_as_png()
        (tmp_path / "chat.png").write_bytes(shot)
    assert reply["error"] is None and reply2["error"] is None
    assert reply["text"] == expected.text and reply2["text"] == expected2.text
    stats = reply["stats"]
    assert float(stats["tokens_per_s"].split()[0]) > 0, stats
    assert stats["new_tokens"] == f"{expected.stats['new_tokens']} tokens", stats
    assert stats["mode"].startswith("spec"), stats
    assert stats["acceptance_rate"].startswith("acceptance ")
    assert stats["mean_accepted_len"].startswith("mean accepted ")
    if "spans" in features:   # the server reports sources: the reply is made of coloured spans
        assert "".join(t for _, t in reply["spans"]) == expected.text
        assert {c for c, _ in reply["spans"]} <= {"src-model", "src-ngram", "src-target"}
    else:
        assert reply["spans"] == [] and not browser.find_element("id", "show_sources").is_enabled()
    width, height = png_size(shot)
    assert width > 600 and height > 400


def fake_server(features: list, received: list):
    """The page's routes beside a scripted chat endpoint: pieces with (optional) source spans."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from edge_ssd.server.web import routes

    pieces = [[("def", "target")], [(" add", "model"), ("(a,", "model")], [(" b)", "ngram")]]

    async def health(request):
        return JSONResponse({"status": "ok", "model": "fake", "features": features})

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def chat(request):
        received.append(await request.json())
        spans = received[-1].get("show_sources") is True

        async def events():
            for piece in pieces:
                chunk = {"choices": [{"index": 0, "delta": {"content": "".join(t for t, _ in piece)}}]}
                if spans:
                    chunk["edge_ssd_spans"] = [{"text": t, "source": s} for t, s in piece]
                yield f"data: {json.dumps(chunk)}\n\n"
            last = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                    "edge_ssd": {"mode": "spec", "tokens_per_s": 12.5, "acceptance_rate": 0.75,
                                 "mean_accepted_len": 1.5, "new_tokens": 4, "drafted": 4, "finish_reason": "length"}}
            yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                             Route("/v1/chat/completions", chat, methods=["POST"]), *routes()])


@needs_browser
@pytest.mark.parametrize("features", [["spans"], []], ids=["spans", "no-spans"])
def test_sources_coloured_only_when_advertised(browser, features):
    received: list = []
    with Live(fake_server(features, received)) as live:
        page.open_page(browser, live.url)
        page.apply_settings(browser, {"show_sources": True})
        reply = page.send_message(browser, "hi", timeout=30)
        legend_shown = browser.find_element("id", "legend").is_displayed()
    assert reply["text"] == "def add(a, b)" and reply["error"] is None
    assert reply["stats"]["tokens_per_s"] == "12.5 tok/s" and reply["stats"]["acceptance_rate"] == "acceptance 0.75"
    assert reply["stats"]["mean_accepted_len"] == "mean accepted 1.50"
    if features:
        assert received[0]["show_sources"] is True and legend_shown
        assert reply["spans"] == [("src-target", "def"), ("src-model", " add"), ("src-model", "(a,"),
                                  ("src-ngram", " b)")]
    else:
        assert "show_sources" not in received[0] and not legend_shown
        assert reply["spans"] == []
    assert received[0]["messages"] == [{"role": "user", "content": "hi"}] and received[0]["stream"] is True


@needs_browser
def test_wrong_key_asked_again(browser):
    """A refused key brings the dialog back, saying so; the right one makes the page ready."""
    from selenium.webdriver.support.ui import WebDriverWait

    def dialog_says(text: str):
        def check(d):
            return d.find_elements("css selector", "#key-dialog[open]") and text in d.find_element(
                "id", "key-reason").text
        return check

    with Live(build_app(NoEngine(), ServeOptions(api_key=KEY))) as live:
        browser.get(live.url + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(dialog_says("needs an API key"))
        browser.find_element("id", "key-input").send_keys("wrong")
        browser.find_element("id", "key-ok").click()
        wait.until(dialog_says("not accepted"))
        browser.find_element("id", "key-input").send_keys(KEY)
        browser.find_element("id", "key-ok").click()
        wait.until(lambda d: d.find_element("id", "server-status").text == "ready")
        assert browser.execute_script("return sessionStorage.getItem('edge-ssd-api-key')") == KEY


@needs_browser
def test_stop_ends_the_generation(engine, browser):
    """Stop (the send button while a reply streams) closes the stream; the server stops generating."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    slow = SlowEngine(engine, delay=0.25)   # 60 pieces: 15 s unless stopped
    with Live(build_app(slow, ServeOptions())) as live:
        page.open_page(browser, live.url)
        page.apply_settings(browser, {"temperature": 0, "max_tokens": 60})
        browser.find_element("id", "message").send_keys("def add", Keys.ENTER)
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: d.find_element("css selector", ".msg.assistant .text").get_attribute("textContent"))
        send = browser.find_element("id", "send")
        assert send.text == "Stop"
        send.click()
        wait.until(lambda d: d.find_element("css selector", ".msg.assistant.error .stats").text == "stopped")
        assert send.text == "Send"
        assert wait_for(lambda: slow.closed_early, timeout=10), "the generation went on after Stop"
        assert slow.completed == 0 and slow.closed_early[0] < 60
