"""Text: UTF-8-safe streaming, stop strings split across tokens, chat templates, prompt checks."""
from __future__ import annotations

import pytest

from edge_ssd.errors import RequestError
from edge_ssd.text import TextStream, Tokenizer, build_prompt
from tiny import CHAT_TEMPLATE, make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return Tokenizer(d / "tokenizer.json", {"eos_ids": [2], "chat_template": CHAT_TEMPLATE})


TEXT = "Über naïve café — 東京 and 😀 emoji. def add(a, b): return a + b"


def stream_all(tok, ids, stop=(), step=1):
    s = TextStream(tok, stop)
    pieces = []
    for i in range(0, len(ids), step):
        pieces.append(s.push(ids[i:i + step]))
        if s.stopped:
            break
    pieces.append(s.finish())
    return pieces, s


@pytest.mark.parametrize("step", [1, 2, 3])
def test_stream_never_emits_broken_utf8(tok, step):
    ids = tok.encode(TEXT)
    assert len(ids) > len(TEXT) // 4   # byte-level pieces: multi-byte chars span tokens
    pieces, s = stream_all(tok, ids, step=step)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == TEXT


@pytest.mark.parametrize("stop", ["東京", "a + b", "naïve c"])
def test_stop_string_split_across_tokens(tok, stop):
    ids = tok.encode(TEXT)
    pieces, s = stream_all(tok, ids, stop=[stop, "never-there"])
    out = "".join(pieces)
    assert out == TEXT[: TEXT.index(stop)]
    assert s.stopped and s.full_text == out


def test_stop_prefix_that_does_not_complete_is_released(tok):
    ids = tok.encode("abc 東 and more")
    pieces, s = stream_all(tok, ids, stop=["東京"])
    assert "".join(pieces) == "abc 東 and more" and not s.stopped


def test_chat_template_and_raw(tok):
    ids = build_prompt(tok, None, [{"role": "user", "content": "hi"}], raw=False)
    assert tok.decode(ids) == "user\nhi\nassistant\n"  # specials are skipped when decoding
    assert tok.tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>user")
    raw = build_prompt(tok, "hi", None, raw=True)
    assert tok.decode(raw) == "hi"


@pytest.mark.parametrize("prompt,messages", [("", None), ("   ", None), (None, None), ("x", [{"role": "user", "content": "y"}]),
                                             (None, []), (None, [{"role": "wizard", "content": "x"}]),
                                             (None, [{"role": "user"}]), (None, "hello")])
def test_bad_prompts(tok, prompt, messages):
    with pytest.raises(RequestError):
        build_prompt(tok, prompt, messages, raw=False)


def test_bad_stop_strings(tok):
    with pytest.raises(RequestError):
        TextStream(tok, [""])


@pytest.mark.parametrize("step", [1, 3, 5])
def test_spans_credit_each_tokens_text_to_its_source(tok, step):
    """Rounds of `step` tokens, each token with its own source: the spans give every token's
    own text its own source (ASCII text: every token ends on a character boundary)."""
    ids = tok.encode("def add(a, b):\n    return a + b\n", bos=False)
    sources = ["model" if i % 3 else "target" for i in range(len(ids))]
    s = TextStream(tok, spans=True)
    spans = []
    for i in range(0, len(ids), step):
        start = s.sent
        s.push(ids[i:i + step])
        spans += s.spans(start, s.sent, sources)
    start = s.sent
    s.finish()
    spans += s.spans(start, s.sent, sources)
    want = [(tok.decode([t]), src) for t, src in zip(ids, sources)]
    assert merged(spans) == merged(want)


def merged(spans) -> list:
    """Adjacent spans of one source as one."""
    out: list = []
    for text, src in spans:
        out = out[:-1] + [(out[-1][0] + text, src)] if out and out[-1][1] == src else out + [(text, src)]
    return out



def test_a_template_that_writes_the_bos_gets_one_bos(tmp_path):
    """Gemma's template starts with {{ bos_token }} and its tokenizer adds a BOS too: the
    prompt starts with exactly one (HF's apply_chat_template encodes without special tokens)."""
    make_tokenizer(tmp_path)
    template = "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    meta = {"eos_ids": [2], "chat_template": template, "bos_token": "<|endoftext|>", "add_bos": True}
    tok = Tokenizer(tmp_path / "tokenizer.json", meta)
    bos = tok.bos_id
    assert bos is not None
    for prompt in ("hi", "say <|im_end|> here"):  # with and without a special token typed in the content
        ids = build_prompt(tok, prompt, None, raw=False)
        assert ids[0] == bos and ids[1] != bos, ids
    assert build_prompt(tok, "hi", None, raw=True)[:2] == [bos, tok.encode("hi", bos=False)[0]]
