"""The CLI contract, the Python API, and clear errors (never a traceback) for bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from edge_ssd.api import Engine
from edge_ssd.errors import ProviderError, RequestError


def cli(*args, check_rc=None, stdin=None):
    p = subprocess.run([sys.executable, "-m", "edge_ssd.cli", *map(str, args)], capture_output=True, text=True,
                       input=stdin, timeout=300)
    assert "Traceback" not in p.stderr, p.stderr
    if check_rc is not None:
        assert p.returncode == check_rc, (p.returncode, p.stdout, p.stderr)
    return p


def test_runtime_never_imports_torch(fp32_bundle):
    code = (
        "import sys, edge_ssd.cli, edge_ssd.api, edge_ssd.bench\n"
        "from edge_ssd import Engine\n"
        f"e = Engine.load({str(fp32_bundle.path)!r}, provider='cpu')\n"
        "r = e.generate('def add', max_new_tokens=8, raw=True)\n"
        "bad = [m for m in ('torch', 'transformers', 'optimum', 'onnx', 'edge_ssd_export') if m in sys.modules]\n"
        "assert r.stats['new_tokens'] >= 1, r\n"
        "print('IMPORTED', bad)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "IMPORTED []" in p.stdout


def test_generate_json_contract(fp32_bundle):
    p = cli("generate", "--bundle", fp32_bundle.path, "--prompt", "def add(a, b):", "--raw", "--mode", "spec",
            "--k", "3", "--max-new-tokens", "12", "--json", "--provider", "cpu", check_rc=0)
    out = json.loads(p.stdout)
    assert set(out) >= {"text", "token_ids", "stats"}
    assert set(out["stats"]) >= {"mode", "new_tokens", "tokens_per_s", "total_s", "acceptance_rate",
                                 "mean_accepted_len", "rounds", "draft_s", "verify_s", "peak_rss_bytes"}
    assert out["stats"]["mode"] == "spec" and len(out["token_ids"]) == out["stats"]["new_tokens"]
    ar = json.loads(cli("generate", "--bundle", fp32_bundle.path, "--prompt", "def add(a, b):", "--raw",
                        "--mode", "ar", "--max-new-tokens", "12", "--json", check_rc=0).stdout)
    assert ar["token_ids"] == out["token_ids"] and ar["text"] == out["text"]


def test_chat_messages_file_and_streaming(fp32_bundle, tmp_path):
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]))
    p = cli("generate", "--bundle", fp32_bundle.path, "--messages", msgs, "--max-new-tokens", "6", check_rc=0)
    assert "tok/s" in p.stderr


def test_batch_jsonl_bad_line_gets_error_record(fp32_bundle, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join([
        json.dumps({"id": "a", "prompt": "def add", "max_new_tokens": 5}),
        "{not json",
        json.dumps({"id": "c", "prompt": "", "max_new_tokens": 5}),
        json.dumps({"id": "d", "prompt": "x", "temperature": -2}),
        json.dumps({"id": "e", "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 4}),
    ]) + "\n")
    cli("generate", "--bundle", fp32_bundle.path, "--input", inp, "--output", out, "--raw", check_rc=0)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [("error" in r) for r in recs] == [False, True, True, True, False]
    assert recs[0]["id"] == "a" and recs[0]["stats"]["new_tokens"] == 5
    assert "temperature" in recs[3]["error"]


def test_batch_from_standard_input(fp32_bundle, tmp_path):
    """--input -: requests piped in, one record a line on stdout, a bad line one error record."""
    lines = [json.dumps({"id": "a", "prompt": "def add", "max_new_tokens": 4}), "{not json",
             json.dumps({"id": "c", "prompt": "def sub", "max_new_tokens": 3})]
    p = cli("generate", "--bundle", fp32_bundle.path, "--input", "-", "--raw", stdin="\n".join(lines) + "\n",
            check_rc=0)
    recs = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["id"] for r in recs] == ["a", 2, "c"] and "error" in recs[1]
    assert [r["stats"]["new_tokens"] for r in (recs[0], recs[2])] == [4, 3]


def test_batch_results_never_replace_the_file_on_standard_input(fp32_bundle, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "def add", "max_new_tokens": 2}) + "\n")
    with open(inp) as f:
        p = subprocess.run([sys.executable, "-m", "edge_ssd.cli", "generate", "--bundle", str(fp32_bundle.path),
                            "--input", "-", "--output", str(inp)], stdin=f, capture_output=True, text=True,
                           timeout=300)
    assert p.returncode == 1 and "is the input file" in p.stderr and "Traceback" not in p.stderr
    assert json.loads(inp.read_text()) == {"prompt": "def add", "max_new_tokens": 2}
    p = cli("generate", "--bundle", fp32_bundle.path, "--input", tmp_path, check_rc=1)
    assert "a folder" in p.stderr


@pytest.mark.parametrize("args,msg", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--prompt", "x", "--top-p", "2"], "top_p"),
    (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
    (["--prompt", "x", "--k", "40"], "k must be"),
    (["--prompt", "x " * 400, "--max-context", "64"], "context limit is 64"),
])
def test_bad_requests_are_clear_errors(fp32_bundle, args, msg):
    p = cli("generate", "--bundle", fp32_bundle.path, "--raw", *args, check_rc=1)
    assert msg in p.stderr


def test_missing_and_corrupt_bundles(fp32_bundle, tmp_path):
    p = cli("generate", "--bundle", tmp_path / "nope", "--prompt", "x", check_rc=1)
    assert "no bundle folder" in p.stderr
    copy = tmp_path / "c"
    shutil.copytree(fp32_bundle.path, copy)
    with open(copy / "target" / "model.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x13\x37")
    p = cli("generate", "--bundle", copy, "--prompt", "x", check_rc=1)
    assert "target/model.onnx.data is corrupt" in p.stderr


def test_external_data_outside_the_bundle_is_refused(fp32_bundle, tmp_path):
    import onnx

    from edge_ssd.bundle import sha256_of

    copy = tmp_path / "evil"
    shutil.copytree(fp32_bundle.path, copy)
    g = copy / "draft" / "model.onnx"
    m = onnx.load(str(g), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../outside.data"
    onnx.save(m, str(g))
    shutil.copy(copy / "draft" / "model.onnx.data", tmp_path / "outside.data")
    man = json.loads((copy / "pair.json").read_text())
    man["models"]["draft"]["files"][0].update(size=g.stat().st_size, sha256=sha256_of(g))
    (copy / "pair.json").write_text(json.dumps(man))
    p = cli("generate", "--bundle", copy, "--prompt", "x", check_rc=1)
    assert "escapes model directory" in p.stderr


def test_provider_fallback_and_strict(fp32_bundle):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is present here")
    e = Engine.load(fp32_bundle.path, provider="cuda")
    assert e.providers()["target"][0] == "CPUExecutionProvider"
    with pytest.raises(ProviderError, match="not available"):
        Engine.load(fp32_bundle.path, provider="cuda", strict_provider=True)
    p = cli("generate", "--bundle", fp32_bundle.path, "--prompt", "x", "--provider", "cuda", "--strict-provider",
            check_rc=1)
    assert "not available" in p.stderr


def test_api_stream_and_stop(fp32_bundle):
    e = Engine.load(fp32_bundle.path, provider="cpu", threads=1)
    full = e.generate("def add", raw=True, max_new_tokens=30)
    assert full.text
    stop = full.text[len(full.text) // 2:][:2]
    s = e.stream("def add", raw=True, max_new_tokens=30, stop=[stop])
    text = "".join(s)
    assert text == full.text[: full.text.index(stop)]
    assert s.result.finish_reason == "stop" and s.result.text == text
    with pytest.raises(RequestError):
        e.generate("x", mode="parallel-universe")


def test_info(fp32_bundle):
    out = json.loads(cli("info", "--bundle", fp32_bundle.path, check_rc=0).stdout)
    assert "cpu" in out["providers"] and out["bundle"]["target"]["layers"] == 2


def test_exact_needs_a_row_invariant_target(fp32_bundle, int4_bundle, tmp_path):
    from edge_ssd.errors import BundleError

    assert int4_bundle.manifest["validation"]["target"]["rows_invariant"] is True  # int4 block 32
    copy = tmp_path / "b"
    shutil.copytree(fp32_bundle.path, copy)
    m = json.loads((copy / "pair.json").read_text())
    m["validation"]["target"]["rows_invariant"] = False
    (copy / "pair.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="--block-size 32"):
        Engine.load(copy, exact=True)
    assert Engine.load(copy).generate("x", raw=True, max_new_tokens=2).stats["new_tokens"] == 2


def test_parallel_placement_falls_back_when_cores_are_shared(fp32_bundle):
    import os

    cores = os.cpu_count() or 1
    crowded = Engine.load(fp32_bundle.path, provider="cpu", threads=cores, draft_threads=cores)
    r = crowded.generate("def add", raw=True, mode="parallel", max_new_tokens=10)
    assert r.stats["parallel"] == {} and not crowded.parallel_pays()   # ran as sequential spec
    if cores >= 2:
        from edge_ssd.costs import StepCosts

        roomy = Engine.load(fp32_bundle.path, provider="cpu", threads=1, draft_threads=1)
        roomy.costs = StepCosts(draft_step=0.010, verify={1: 0.030, 2: 0.032, 3: 0.034, 5: 0.038, 9: 0.046})
        r2 = roomy.generate("def add", raw=True, mode="parallel", max_new_tokens=10)
        assert roomy.parallel_pays() and "hits" in r2.stats["parallel"]
        assert r2.token_ids == r.token_ids


def test_parallel_on_shared_cores_says_it_ran_as_spec(fp32_bundle):
    p = cli("generate", "--bundle", fp32_bundle.path, "--prompt", "def add", "--raw", "--mode", "parallel",
            "--max-new-tokens", "6", check_rc=0)
    assert "[parallel] ran as spec" in p.stderr
    bad = cli("generate", "--bundle", fp32_bundle.path, "--prompt", "x", "--mode", "parallel", "--fanout", "99",
              "--threads", "1", "--draft-threads", "1", check_rc=1)
    assert "fanout must be an integer in [0, 16]" in bad.stderr and "Traceback" not in bad.stderr


def test_exact_is_checked_on_this_device(fp32_bundle, tmp_path, monkeypatch):
    """The export's rows_invariant was measured on its machine; the engine measures its own."""
    import edge_ssd.api
    from edge_ssd.errors import BundleError
    from edge_ssd.model import rows_invariant_here

    e = Engine.load(fp32_bundle.path, exact=True)
    assert rows_invariant_here(e.target)            # fp32 here: rows compute alike
    assert e.generate("x", raw=True, max_new_tokens=3).stats["new_tokens"] == 3
    monkeypatch.setattr(edge_ssd.api, "rows_invariant_here", lambda lm: False)  # as on another CPU
    with pytest.raises(BundleError, match="on this device"):
        Engine.load(fp32_bundle.path, exact=True)
    assert Engine.load(fp32_bundle.path).generate("x", raw=True, max_new_tokens=2).stats["new_tokens"] == 2
