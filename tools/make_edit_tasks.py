#!/usr/bin/env python3
"""Write the code-edit prompts that measure Predicted Outputs (tools/edit_tasks.jsonl).

    python tools/make_edit_tasks.py [--out tools/edit_tasks.jsonl]

Each task asks for a small edit of a ~40-70-line piece of real code (functions of Python's own
standard library, untyped and stable) and gives the code as it stands as the `prediction`: what
an editor integration would send. Three kinds, two pieces each: rename a variable, add type
hints, fix one line (the piece is given with a bug the prompt names). Lines are
`{"id", "category", "prompt", "prediction"}`, read by `edge-ssd bench --prompts` and
`tools/peer_bench.py --prompts` (mode option `prediction=given`).
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
from pathlib import Path

# (module, functions making the piece, a variable to rename, its new name, a line to break and how)
PIECES = [
    ("colorsys", ["rgb_to_hls", "hls_to_rgb", "_v"], "maxc", "max_channel",
     ("    if l <= 0.5:", "    if l < 0.5:")),
    ("textwrap", ["dedent", "indent"], "margin", "common_margin",
     ("    if margin:", "    if not margin:")),
]
REPLY = "Reply with the complete code, changed, in one ```python code block and nothing else."


def piece_source(module: str, functions: list) -> str:
    mod = __import__(module)
    src = inspect.getsource(mod)
    tree = ast.parse(src)
    lines = src.splitlines()
    parts = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in functions]
    return "\n\n\n".join("\n".join(lines[n.lineno - 1:n.end_lineno]) for n in parts)


def fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def tasks() -> list:
    out = []
    for module, functions, old, new, (good, bad) in PIECES:
        code = piece_source(module, functions)
        if good not in code:
            raise SystemExit(f"{module}: the line {good!r} to break is not in the piece")
        buggy = code.replace(good, bad, 1)
        out += [
            {"id": f"rename-{module}", "category": "edit-rename", "prediction": fenced(code),
             "prompt": f"Rename the variable `{old}` to `{new}` everywhere in this code. {REPLY}\n\n{fenced(code)}"},
            {"id": f"type-hints-{module}", "category": "edit-type-hints", "prediction": fenced(code),
             "prompt": f"Add type hints to every function in this code; change nothing else. {REPLY}\n\n{fenced(code)}"},
            {"id": f"fix-line-{module}", "category": "edit-fix-line", "prediction": fenced(buggy),
             "prompt": f"This code has a bug: the line `{bad.strip()}` should be `{good.strip()}`. Fix it. "
                       f"{REPLY}\n\n{fenced(buggy)}"},
        ]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "edit_tasks.jsonl")
    args = ap.parse_args()
    rows = tasks()
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} tasks -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
