#!/usr/bin/env python3
"""Several clients at once through the real server: batched (`--max-concurrency N`) against
the serialized server (one request at a time, the rest queued), in one run.

    python tools/concurrency_bench.py --bundle /work/models/qwen2.5-coder-0.5b-1.5b \\
        --streams 1,2,4,8 --json docs/results/concurrency_bench.json

For each server (slots = the largest stream count, and slots = 1) and each stream count c, c
client threads start together and each sends `--per-stream` streaming chat requests one after
another (Spec-Bench prompts spread over its categories, none asked twice of one server,
`--max-tokens` new tokens, greedy).
Per request: time to first token (from sending it), decode tokens/s (tokens after the first /
their time, as the client sees them). Per run: aggregate tokens/s (all completion tokens /
wall time from the first request to the last answer), median per-stream tokens/s and TTFT,
the server's peak RSS (VmHWM) and the batch occupancy it reports. Others' CPU share during
each run is printed beside it: above a few percent the figures are noise.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_ssd.bench import cpu_clock, read_prompts  # noqa: E402
from edge_ssd.hugepages import reexec_with_hugepages  # noqa: E402

DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent.parent / "shared" / "bench" / "spec_bench_questions.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`edge-ssd serve` in a child process, until the context ends."""

    def __init__(self, bundle: str, slots: int, extra: list):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "edge_ssd.cli", "serve", "--bundle", bundle, "--port", str(self.port),
               "--max-concurrency", str(slots), "--queue", "64", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> "Server":
        line = self.proc.stdout.readline()  # the banner, once the bundle is loaded
        if "edge-ssd serve" not in line:
            self.proc.kill()
            raise SystemExit(f"the server did not start: {line}{self.proc.stderr.read()}")
        for _ in range(200):  # the banner comes just before uvicorn accepts
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise SystemExit("the server printed its banner but does not answer /health")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(30)

    def peak_rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def batch_counts(self) -> tuple:
        """(batched forwards, rows they carried) so far."""
        steps = self.metric("edge_ssd_batch_steps_total")
        return steps, steps * self.metric("edge_ssd_batch_occupancy")

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0


def one_request(url: str, prompt: str, max_tokens: int) -> dict:
    """A streaming chat request: when it was sent, when each content chunk came, usage."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0}
    sent = time.perf_counter()
    times: list = []
    tokens = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:300]}"}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    first, last = (times[0], times[-1]) if times else (sent, sent)
    return {"sent": sent, "ttft_s": first - sent, "end": time.perf_counter(), "tokens": tokens,
            "decode_tok_s": (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0}


def run_streams(srv: Server, prompts: list, streams: int, per_stream: int, max_tokens: int) -> dict:
    """`prompts` are this run's own: each request a question the server has not answered before
    (a repeated one would be drafted from the suffix cache, which is not what a held-out
    request sees)."""
    jobs = [[prompts[s * per_stream + i]["prompt"] for i in range(per_stream)] for s in range(streams)]
    results: list = []
    lock = threading.Lock()
    start_gate = threading.Barrier(streams)

    def client(mine: list) -> None:
        start_gate.wait()
        for p in mine:
            r = one_request(srv.url, p, max_tokens)
            with lock:
                results.append(r)
    c0, s0 = cpu_clock(), srv.cpu_s()
    threads = [threading.Thread(target=client, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c1, s1 = cpu_clock(), srv.cpu_s()
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} request(s) failed, e.g. {failed[0]}")
    wall = max(r["end"] for r in results) - min(r["sent"] for r in results)
    cores = os.cpu_count() or 1
    others = ((c1[1] - c0[1]) - (c1[2] - c0[2]) - (s1 - s0)) / max(1e-9, (c1[0] - c0[0]) * cores)
    return {"streams": streams, "requests": len(results), "tokens": sum(r["tokens"] for r in results),
            "wall_s": wall, "aggregate_tok_s": sum(r["tokens"] for r in results) / wall,
            "per_stream_tok_s": statistics.median(r["decode_tok_s"] for r in results),
            "ttft_s": statistics.median(r["ttft_s"] for r in results),
            "ttft_max_s": max(r["ttft_s"] for r in results), "others_cpu_share": max(0.0, others)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    ap.add_argument("--categories", default=None,
                    help="comma-separated Spec-Bench categories to draw from (default: all)")
    ap.add_argument("--streams", default="1,2,4,8", help="comma-separated concurrent client counts")
    ap.add_argument("--per-stream", type=int, default=2, help="requests each client sends, one after another")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--serve-args", default="", help="more `edge-ssd serve` flags, e.g. '--mode ar'")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    streams = [int(x) for x in args.streams.split(",")]
    prompts = read_prompts(args.prompts, categories=set(args.categories.split(",")) if args.categories else None)
    need = sum(streams) * args.per_stream
    if len(prompts) < need:
        raise SystemExit(f"{need} distinct prompts needed, {args.prompts} has {len(prompts)}")
    prompts = [prompts[i * len(prompts) // need] for i in range(need)]  # spread over the categories
    runs: list = []
    for slots in (max(streams), 1):
        with Server(args.bundle, slots, args.serve_args.split()) as srv:
            one_request(srv.url, "Say hi.", 8)  # warm-up: first-use allocations
            used = 0
            for c in streams:
                steps0, rows0 = srv.batch_counts()
                r = run_streams(srv, prompts[used:], c, args.per_stream, args.max_tokens)
                used += c * args.per_stream
                steps1, rows1 = srv.batch_counts()
                r.update(server_slots=slots, peak_rss=srv.peak_rss(),
                         batch_occupancy=(rows1 - rows0) / (steps1 - steps0) if steps1 > steps0 else 0.0)
                runs.append(r)
                print(f"slots {slots} streams {c}: aggregate {r['aggregate_tok_s']:.1f} tok/s, per stream "
                      f"{r['per_stream_tok_s']:.1f}, TTFT {r['ttft_s']:.2f} s (max {r['ttft_max_s']:.2f}), "
                      f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB, occupancy {r['batch_occupancy']:.2f}, "
                      f"others' CPU {r['others_cpu_share']:.0%}", flush=True)
    print("\n| streams | batched aggregate tok/s | serialized aggregate | ratio | batched per stream | "
          "lone stream (batched server) | TTFT batched / serialized (s) | peak RSS batched |")
    print("|---|---|---|---|---|---|---|---|")
    by = {(r["server_slots"], r["streams"]): r for r in runs}
    lone = by[(max(streams), streams[0])]["per_stream_tok_s"]
    for c in streams:
        b, s = by[(max(streams), c)], by[(1, c)]
        print(f"| {c} | {b['aggregate_tok_s']:.1f} | {s['aggregate_tok_s']:.1f} | "
              f"{b['aggregate_tok_s'] / s['aggregate_tok_s']:.2f}x | {b['per_stream_tok_s']:.1f} | {lone:.1f} | "
              f"{b['ttft_s']:.2f} / {s['ttft_s']:.2f} | {b['peak_rss'] / 2**30:.2f} GiB |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    reexec_with_hugepages()  # measure what the edge-ssd command runs (edge_ssd/hugepages.py)
    sys.exit(main())
