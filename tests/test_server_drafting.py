"""The server's drafting extensions over real HTTP: Predicted Outputs, token sources per chunk."""
from __future__ import annotations

import json

import httpx
import pytest

openai = pytest.importorskip("openai")

from test_server import JSON, Live, sse  # noqa: E402

from edge_ssd.api import Engine  # noqa: E402
from edge_ssd.server import ServeOptions, build_app  # noqa: E402

MSGS = [{"role": "user", "content": "def add(a, b):"}]


@pytest.fixture(scope="module")
def live(fp32_bundle):
    engine = Engine.load(fp32_bundle.path, provider="cpu", threads=1)
    with Live(build_app(engine, ServeOptions())) as s:
        yield s


def test_health_lists_the_extensions(live):
    assert set(httpx.get(live.url + "/health", timeout=10).json()["features"]) >= {"spans", "prediction"}


def test_a_prediction_is_a_lossless_draft_source(live):
    client = live.client()
    plain = client.chat.completions.create(model="x", messages=MSGS, max_tokens=24, temperature=0,
                                           extra_body={"mode": "ar"})
    text = plain.choices[0].message.content
    for content in (text, [{"type": "text", "text": text}], "something else entirely"):
        r = client.chat.completions.create(model="x", messages=MSGS, max_tokens=24, temperature=0,
                                           prediction={"type": "content", "content": content},
                                           extra_body={"drafter": "ngram"})
        assert r.choices[0].message.content == text     # the target's own output, whatever was predicted
    # (how much a good prediction is accepted: tests/test_loop.py, on scripted models)


@pytest.mark.parametrize("prediction", [{"type": "text", "content": "x"}, {"type": "content", "content": 5},
                                        "just a string"])
def test_a_bad_prediction_is_a_400_naming_it(live, prediction):
    r = httpx.post(live.url + "/v1/chat/completions", headers=JSON, timeout=30,
                   content=json.dumps({"messages": MSGS, "prediction": prediction}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "prediction", r.text


def test_stream_chunks_carry_token_sources_when_asked(live):
    body = {"messages": MSGS, "max_tokens": 30, "stream": True, "show_sources": True, "drafter": "model"}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as r:
        chunks = [c for c in sse(r) if c is not None]
    texts = [c for c in chunks if c.get("choices") and c["choices"][0]["delta"].get("content")]
    assert texts and all("".join(s["text"] for s in c["edge_ssd_spans"]) == c["choices"][0]["delta"]["content"]
                         for c in texts)
    sources = {s["source"] for c in texts for s in c["edge_ssd_spans"]}
    assert sources <= {"model", "ngram", "suffix", "prediction", "target"} and "target" in sources
    body["show_sources"] = False
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert not any("edge_ssd_spans" in c for c in sse(r) if c is not None)
