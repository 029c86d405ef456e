"""User mistakes through the real CLI and API: one clear line, exit 1, nothing lost.

Each class of mistake is a table; every row runs the real command in a subprocess (or the
real Engine) and checks the exit status, the single `error:` line, and that no file the user
had was harmed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from edge_ssd.api import Engine
from edge_ssd.governor import Governor, prefill_bytes_per_token
from edge_ssd.memory import Reading

GiB, MiB = 1 << 30, 1 << 20


def cli(*args, rc=None, timeout=300):
    p = subprocess.run([sys.executable, "-m", "edge_ssd.cli", *args], capture_output=True, timeout=timeout)
    err = p.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    if rc is not None:
        assert p.returncode == rc, (p.returncode, p.stdout[-2000:], err)
    return p.stdout.decode("utf-8", "replace"), err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


# -- a batch keeps going past every kind of bad line -------------------------------------------
BAD_LINES = [
    b'{"prompt": "caf\xe9"}',                        # not UTF-8
    b'{"prompt": "\\ud800 lone surrogate"}',         # valid JSON, not encodable text
    b'{"prompt": "x", "stop": 5}',                   # a field of the wrong type
    b"[" * 100_000 + b"]" * 100_000,                 # nested past any parser's recursion limit
    b'{"prompt": "x", "no_such_field": 1}',
    b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
    b'"just a string"',
    b'{"prompt": "x", "max_new_tokens": true}',
]


def test_every_bad_batch_line_is_a_record_and_the_run_goes_on(fp32_bundle, tmp_path):
    good = json.dumps({"id": "good", "prompt": "def add", "max_new_tokens": 3}).encode()
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(b"\n".join(x for bad in BAD_LINES for x in (bad, good)) + b"\n")
    cli("generate", "--bundle", str(fp32_bundle.path), "--input", str(inp), "--output", str(out), "--raw", rc=0)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 2 * len(BAD_LINES)
    assert all("error" in r and r["error"] for r in recs[0::2]), recs[0::2]
    assert all(r["id"] == "good" and r["stats"]["new_tokens"] == 3 for r in recs[1::2])


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_output_that_is_the_input_is_refused_and_the_input_kept(fp32_bundle, tmp_path, how):
    inp = tmp_path / "in.jsonl"
    content = json.dumps({"prompt": "def add", "max_new_tokens": 2}) + "\n"
    inp.write_text(content)
    out = tmp_path / "out.jsonl"
    if how == "same path":
        out = inp
    elif how == "symlink":
        out.symlink_to(inp)
    else:
        os.link(inp, out)
    _, err = cli("generate", "--bundle", str(fp32_bundle.path), "--input", str(inp), "--output", str(out), rc=1)
    assert "is the input file" in one_error_line(err)
    assert inp.read_text() == content


@pytest.mark.parametrize("args,words", [
    (["--output", "{tmp}"], "is a folder"),
    (["--output", "{tmp}/missing/out.jsonl"], "does not exist"),
])
def test_bad_output_paths_are_refused_before_any_work(fp32_bundle, tmp_path, args, words):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "x"}) + "\n")
    args = [a.format(tmp=tmp_path) for a in args]
    _, err = cli("generate", "--bundle", str(fp32_bundle.path), "--input", str(inp), *args, rc=1)
    assert words in one_error_line(err)


def test_results_replace_an_old_output_only_when_written(fp32_bundle, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"prompt": "def add", "max_new_tokens": 2}) + "\n")
    out.write_text("old results\n")
    cli("generate", "--bundle", str(fp32_bundle.path), "--input", str(inp), "--output", str(out), "--raw", rc=0)
    assert json.loads(out.read_text())["stats"]["new_tokens"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize("args,words", [
    (["--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")], "not valid Unicode"),
    (["--prompt", "x", "--output", "o.jsonl"], "--output is for --input"),
    (["--prompt", "x", "--max-context", "-1"], "--max-context"),
    (["--prompt", "x", "--fanout", "1000", "--mode", "parallel"], "fanout must be"),
    (["--prompt", "x", "--fanout", "2"], "--mode parallel only"),
    (["--prompt", "x", "--k-min", "5", "--k-max", "2"], "k_min <= k_max"),
    (["--input", "no-such-file.jsonl"], "no such file"),
])
def test_bad_generate_flags_are_one_line(fp32_bundle, args, words):
    _, err = cli("generate", "--bundle", str(fp32_bundle.path), *args, rc=1)
    assert words in one_error_line(err)


@pytest.mark.parametrize("args,words", [
    (["--json", "{tmp}"], "is a folder"),
    (["--modes", "ar,spec/k=x"], "takes an integer"),
    (["--modes", "ar,fast"], "mode must be"),
    (["--modes", "ar,spec/k=99"], "k must be"),
    (["--modes", "ar,spec/prediction=yes"], "prediction takes only 'given'"),
    (["--prompts", "{tmp}/bad.jsonl"], "bad.jsonl:2"),
])
def test_bad_bench_flags_are_one_line_before_the_run(fp32_bundle, tmp_path, args, words):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "def add"}) + "\n")
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "a"}\n[1, 2]\n')
    args = [a.format(tmp=tmp_path) for a in args]
    base = ["bench", "--bundle", str(fp32_bundle.path), "--max-new-tokens", "2"]
    if "--prompts" not in args:
        base += ["--prompts", str(prompts)]
    _, err = cli(*base, *args, rc=1)
    assert words in one_error_line(err)


# -- the Python API's contracts --------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(fp32_bundle):
    return Engine.load(fp32_bundle.path, provider="cpu", threads=1)


def finishes(fn, seconds: float = 60.0):
    """Run fn in a thread; fail (instead of hanging the suite) if it does not return in time."""
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the engine hung"
    return out["r"]


def test_a_stop_string_is_one_sequence_not_characters(engine):
    full = engine.generate("def add", raw=True, max_new_tokens=30, mode="ar")
    stop = full.text[3:6]
    assert len(stop) == 3 and stop not in full.text[:3]
    r = engine.generate("def add", raw=True, max_new_tokens=30, mode="ar", stop=stop)
    assert r.text == full.text[:full.text.index(stop)] and r.finish_reason == "stop"


@pytest.mark.parametrize("leave", ["break from a temporary", "keep the stream, start another", "with block"])
def test_an_abandoned_stream_releases_the_engine(engine, leave):
    def scenario():  # one thread throughout: it leaves a stream, then asks for more
        if leave == "break from a temporary":
            for _ in engine.stream("def add", raw=True, max_new_tokens=40):
                break
        elif leave == "keep the stream, start another":
            s = engine.stream("def add", raw=True, max_new_tokens=40)
            next(s)
        else:
            with engine.stream("def add", raw=True, max_new_tokens=40) as s:
                next(s)
        return engine.generate("def add", raw=True, max_new_tokens=5)

    assert finishes(scenario).stats["new_tokens"] == 5


def test_another_threads_stream_is_waited_for(engine):
    s = engine.stream("def add", raw=True, max_new_tokens=20)
    next(s)
    done = threading.Event()
    t = threading.Thread(target=lambda: (engine.generate("def add", raw=True, max_new_tokens=3), done.set()))
    t.start()
    assert not done.wait(0.5)          # the other thread waits while this stream holds the engine
    s.close()
    assert done.wait(60)
    t.join()


# -- the memory budget during prefill, and the draft coming back -------------------------------
def test_prefill_chunk_fits_the_headroom():
    per_token = prefill_bytes_per_token(1536, 12, 4096)
    roomy = Governor("8GiB", lambda: Reading(16 * GiB, GiB))
    tight = Governor("8GiB", lambda: Reading(16 * GiB, 8 * GiB - 100 * MiB))
    assert roomy.prefill_chunk(per_token) == 512
    small = tight.prefill_chunk(per_token)
    assert 16 <= small < 512 and small * per_token <= 100 * MiB - tight.margin


def test_chunked_prefill_is_lossless_and_can_be_stopped(fp32_bundle):
    prompt = "def add(a, b):\n    return a + b\n" * 6
    whole = Engine.load(fp32_bundle.path, provider="cpu", threads=1).generate(prompt, raw=True, max_new_tokens=12)
    e = Engine.load(fp32_bundle.path, provider="cpu", threads=1, memory_budget="8GiB")
    e.governor.prefill_chunk = lambda per_token: 16      # as if memory were short
    s = e.stream(prompt, raw=True, max_new_tokens=12)
    assert next(s) == ""                                  # between chunks: a point to stop at
    r = e.generate(prompt, raw=True, max_new_tokens=12)
    assert r.token_ids == whole.token_ids
    s.close()


class Pressure:
    """Calm, then memory pressure for `window` readings, then calm again."""

    def __init__(self, calm: int, window: int):
        self.n, self.calm, self.window = 0, calm, window

    def __call__(self) -> Reading:
        self.n += 1
        if self.calm < self.n <= self.calm + self.window:
            return Reading(20 * MiB, 200 * MiB)
        return Reading(8 * GiB, 200 * MiB)


def test_the_draft_comes_back_when_memory_allows(fp32_bundle):
    reader = Pressure(calm=9, window=3)
    e = Engine.load(fp32_bundle.path, provider="cpu", threads=1, memory_reader=reader, memory_budget="4GiB")
    r = e.generate("def add", raw=True, drafter="model", k=2, max_new_tokens=30)
    assert "drop_draft" in r.stats["memory_events"] and e.draft is None
    r = e.generate("def add", raw=True, drafter="model", k=2, max_new_tokens=30)
    assert e.draft is not None and r.stats["drafted"] > 0 and not r.stats["memory_events"]


# -- where each token came from ---------------------------------------------------------------
@pytest.mark.parametrize("mode,drafter", [("ar", "auto"), ("spec", "model"), ("spec", "ngram")])
def test_pieces_say_where_their_tokens_came_from(engine, mode, drafter):
    prompt = "def add(a, b):\n    return a + b\n" * 3
    with engine.stream(prompt, raw=True, max_new_tokens=40, mode=mode, drafter=drafter, show_sources=True) as s:
        pieces = list(s)
    spans = [sp for p in pieces for sp in p.spans]
    assert all("".join(t for t, _ in p.spans) == p for p in pieces)
    assert "".join(pieces) == s.result.text
    sources = {src for _, src in spans}
    stats = s.result.stats
    if mode == "ar":
        assert sources == {"target"}
    else:  # (a draft token inside a character the target's token completes is shown as the target's)
        accepted = {name for name, d in stats["drafters"].items() if d["accepted"]}
        assert "target" in sources and sources <= accepted | {"target"}


def test_show_drafts_colours_the_terminal(fp32_bundle):
    out, err = cli("generate", "--bundle", str(fp32_bundle.path), "--prompt", "def add(a, b):", "--raw",
                   "--max-new-tokens", "20", "--show-drafts", rc=0)
    assert "\x1b[0m" in out and "model" in err and "target" in err


def test_a_prediction_file_drafts_through_the_cli(fp32_bundle, tmp_path):
    out, _ = cli("generate", "--bundle", str(fp32_bundle.path), "--prompt", "def add(a, b):", "--raw",
                 "--max-new-tokens", "30", "--mode", "ar", "--json", rc=0)
    want = json.loads(out)
    pred = tmp_path / "pred.txt"
    pred.write_text(want["text"])
    out, _ = cli("generate", "--bundle", str(fp32_bundle.path), "--prompt", "def add(a, b):", "--raw",
                 "--max-new-tokens", "30", "--drafter", "ngram", "--prediction", str(pred), "--json", rc=0)
    got = json.loads(out)
    assert got["token_ids"] == want["token_ids"]      # lossless (acceptance: tests/test_loop.py)
    assert got["stats"]["drafters"]["prediction"]["drafted"] > 0
    _, err = cli("generate", "--bundle", str(fp32_bundle.path), "--prompt", "x", "--prediction",
                 str(tmp_path / "none.txt"), rc=1)
    assert "--prediction" in one_error_line(err)
