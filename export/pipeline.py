"""The export pipeline: sources -> fused ONNX graphs -> quantized -> validated -> pair bundle.

The bundle is built in a hidden partial folder next to its destination and swapped into place
only after `pair.json` (written last) is complete, so a crash or Ctrl-C never leaves a folder
the runtime would load, and never removes the bundle that was there (output.py). Converted
sources (GGUF -> fp32 safetensors) and built graphs are cached under `.cache/`, keyed by source
and settings, and hard-linked into the bundle.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from edge_ssd import __version__
from edge_ssd.bundle import MANIFEST, SCHEMA, SCHEMA_VERSION, Bundle, load_bundle, sha256_of
from edge_ssd.memory import fmt_bytes, peak_rss_bytes
from edge_ssd.progress import Bar, stage

from .errors import ExportError
from .gguf_source import open_gguf_blocks, pointed_gguf
from .graph import BUILDER_VERSION, Arch, GraphIO, QuantConfig, UnsupportedModelError, build_decoder, logits_width
from .output import begin, check_destination, check_not_source, clean_stale, commit, discard, resolve_out
from .registry import CACHE
from .sources import SourceError, resolve_source
from .tokenizer_meta import ensure_tokenizer_json, load_tokenizer, tokenizer_meta
from .reference import reference_tap
from .validate import PROMPTS, check_tokenizers, choose_reference, validate_model
from .weights import open_weights

MIN_CONTEXT = 128  # the golden and agreement checks feed prompts of up to about a hundred tokens


@dataclass
class ModelPlan:
    role: str
    source: str
    quant: QuantConfig


@dataclass
class ExportPlan:
    target: ModelPlan
    draft: Optional[ModelPlan]
    out: Path
    name: str = ""
    max_context: Optional[int] = None
    validate: bool = True
    force: bool = False
    cache: Path = CACHE
    extra_provenance: dict = field(default_factory=dict)

    @property
    def models(self) -> list:
        return [m for m in (self.target, self.draft) if m is not None]


def _source_key(hf_dir: Path) -> str:
    parts = [str(hf_dir.resolve())]
    for p in sorted(hf_dir.iterdir()):
        if p.is_file():
            st = p.stat()
            parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


REFERENCE_FILE = "reference.json"  # in a graph's cache folder: the fp32 reference argmax per prompt
REFERENCE_LOGITS = "reference-logits.npz"  # beside it: the logits behind that argmax (validation's KL)


def build_graph_cached(hf_dir: Path, arch: Arch, quant: QuantConfig, max_context: Optional[int],
                       cache: Path, label: str, prompts: Optional[list] = None) -> Path:
    """Build (or reuse) the graph for these weights and settings; return its cache folder.

    Given the validation prompts, the numpy reference runs on the weights as the build reads
    them (reference.ReferenceTap) and its argmax and logits are kept beside the graph, so
    validation reads the source once, not twice.
    """
    key = hashlib.sha256(json.dumps(
        [_source_key(hf_dir), quant.to_json(), max_context, BUILDER_VERSION], sort_keys=True
    ).encode()).hexdigest()[:20]
    out = cache / "onnx" / f"{label}-{quant.weights}-{key}"
    if (out / "model.onnx").exists():
        print(f"    reusing cached {label} graph {out}")
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with stage(f"build + quantize {label} graph ({quant.weights}, {arch.num_layers} layers)"):
        bar = Bar(f"{label} layers", arch.num_layers, "layers")
        weight = open_weights(hf_dir)
        tap = reference_tap(weight, arch, prompts) if prompts else None
        gguf = pointed_gguf(hf_dir) if quant.keep_source_quant else None
        build_decoder(arch, tap or weight, quant, tmp, max_context, progress=lambda i: bar.update(1),
                      blocks=open_gguf_blocks(gguf) if gguf else None)
        bar.close()
    if tap is not None and tap.logits is not None:
        (tmp / REFERENCE_FILE).write_text(json.dumps({"prompts": prompts, "argmax": [a.tolist() for a in tap.result]}))
        np.savez(tmp / REFERENCE_LOGITS, *tap.logits)
    os.replace(tmp, out)
    return out


def _cached_reference(built: Path, prompts: list) -> Optional[list]:
    """The reference logits kept by build_graph_cached for exactly these prompts, if any."""
    try:
        if json.loads((built / REFERENCE_FILE).read_text()).get("prompts") != prompts:
            return None
        with np.load(built / REFERENCE_LOGITS) as kept:
            return [kept[f"arr_{i}"] for i in range(len(prompts))]
    except (OSError, ValueError, KeyError):
        return None


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _file_entries(root: Path, rel_dir: str) -> list:
    entries = []
    for p in sorted((root / rel_dir).iterdir()):
        entries.append({"path": f"{rel_dir}/{p.name}", "size": p.stat().st_size, "sha256": sha256_of(p)})
    return entries


def _model_manifest(arch: Arch, quant: QuantConfig, role: str, files: list, max_context: int, io) -> dict:
    return {
        "graph": f"{role}/model.onnx",
        "files": files,
        "architecture": arch.architecture,
        "num_layers": arch.num_layers,
        "num_heads": arch.num_heads,
        "num_kv_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "hidden_size": arch.hidden_size,
        "vocab_size": logits_width(arch, quant),
        "kv_dtype": quant.act_dtype,
        "max_context": max_context,
        "quant": quant.to_json(),
        "io": {"inputs": io.inputs, "outputs": io.outputs},
    }


def _tool_versions() -> dict:
    """Versions of the tools this export used: a package counts when it was imported (torch and
    transformers are absent from a GGUF or safetensors export that never needed them)."""
    import importlib.metadata as md
    import sys

    out = {"edge-ssd": __version__}
    for pkg in ("onnx", "onnxruntime", "transformers", "torch", "gguf", "safetensors", "tokenizers"):
        if pkg not in sys.modules:
            continue
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _arch_of(hf_dir: Path) -> Arch:
    """The model's shapes and family features from config.json; refuse what the builder cannot
    handle (families.py), naming the file."""
    path = hf_dir / "config.json"
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(cfg, dict):
        raise SourceError(f"{path}: must hold a JSON object")
    try:
        arch = Arch.from_config(cfg)
    except UnsupportedModelError:
        raise
    except KeyError as e:
        raise SourceError(f"{path}: has no {e.args[0]!r}, which the graph needs") from e
    except (TypeError, ValueError) as e:
        raise SourceError(f"{path}: a field the graph needs is mistyped ({e})") from e
    return arch


def _check_plan(plan: ExportPlan) -> None:
    """Settings that would fail deep inside the export, refused before it starts."""
    if plan.max_context is not None and plan.max_context < MIN_CONTEXT:
        raise ExportError(f"--max-context must be at least {MIN_CONTEXT} (the export's own checks need that "
                          f"many positions), not {plan.max_context}")


def effective_quant(quant: QuantConfig, hf_dir: Path, arch: Arch) -> QuantConfig:
    """quant as it applies to this source: keeping the source's quantization needs GGUF blocks,
    so for any other source it is off (and the manifest and cache key say so); an accuracy
    level not given is the family's default."""
    if quant.keep_source_quant and pointed_gguf(hf_dir) is None:
        quant = dataclasses.replace(quant, keep_source_quant=False)
    return quant.for_arch(arch)


def _read_by(plan: ExportPlan) -> dict:
    """What the export reads from disk, which --out must not touch: the sources given as paths
    (hub ids are not paths) and the cache."""
    read = {f"the {m.role} source": Path(m.source).expanduser() for m in plan.models}
    return {**{k: p for k, p in read.items() if p.exists()}, "the export cache": plan.cache}


def _resolve(plan: ExportPlan, out: Path) -> tuple:
    """Each model's local Hugging Face folder and shapes; unusable sources are refused here,
    before any graph is built, and so is an --out that a resolved folder (a hub snapshot, a
    conversion) would be inside."""
    hf: dict = {}
    arch: dict = {}
    for m in plan.models:
        with stage(f"resolve {m.role} source {m.source}"):
            hf[m.role] = resolve_source(m.source, plan.cache)
            arch[m.role] = _arch_of(hf[m.role])
            open_weights(hf[m.role])  # no weights, or a truncated file: refused now
    check_not_source(out, {f"the {role} model's Hugging Face folder": p for role, p in hf.items()})
    return hf, arch


def preflight(plan: ExportPlan) -> Path:
    """Refuse in the first second what would fail (or destroy something) later: the settings,
    a destination that is not ours to replace, one that a source is in or is in a source, and
    one whose folder cannot be written. Returns the destination, resolved."""
    _check_plan(plan)
    out = resolve_out(plan.out)
    check_not_source(out, _read_by(plan))
    clean_stale(out)
    check_destination(out, plan.force)
    discard(begin(out))  # the folder takes a partial bundle: it is writable
    return out


def export_pair(plan: ExportPlan) -> Bundle:
    """Run the whole export; return the loaded (and so re-verified) bundle.

    The destination is checked first (see output.py): nothing that is not a bundle is ever
    replaced, and the old bundle stays in place until the new one is complete.
    """
    t_start = time.perf_counter()
    out = preflight(plan)
    tmp = begin(out)
    try:
        hf, arch = _resolve(plan, out)
        _write_bundle(tmp, plan, hf, arch, out.name, t_start)
        load_bundle(tmp, verify="size")  # the runtime's own checks, before the old bundle goes
        commit(tmp, out)
    except BaseException:
        discard(tmp)
        raise
    bundle = load_bundle(out, verify="full")
    print(f"bundle written: {out} in {time.perf_counter() - t_start:.1f}s, peak RSS {fmt_bytes(peak_rss_bytes())}")
    return bundle


def _write_bundle(tmp: Path, plan: ExportPlan, hf: dict, arch: dict, name: str, t_start: float) -> None:
    """Graphs, tokenizer and (last) pair.json into the partial folder."""
    tok_file = ensure_tokenizer_json(hf["target"], plan.cache)
    if plan.draft:
        with stage("check draft/target tokenizers"):
            check_tokenizers(ensure_tokenizer_json(hf["draft"], plan.cache), tok_file)
    meta = tokenizer_meta(hf["target"], tok_file)
    prompts = _encoder(tok_file)
    manifest_models, built = {}, {}
    for m in plan.models:
        a = arch[m.role]
        quant = effective_quant(m.quant, hf[m.role], a)
        max_ctx = min(a.max_position_embeddings, plan.max_context or a.max_position_embeddings)
        built[m.role] = build_graph_cached(hf[m.role], a, quant, max_ctx, plan.cache, m.role,
                                           [prompts(p) for p in PROMPTS] if plan.validate else None)
        for fname in ("model.onnx", "model.onnx.data"):
            _link_or_copy(built[m.role] / fname, tmp / m.role / fname)
        with stage(f"checksum {m.role} files"):
            files = _file_entries(tmp, m.role)
        manifest_models[m.role] = _model_manifest(a, quant, m.role, files, max_ctx, GraphIO())
    shutil.copy2(tok_file, tmp / "tokenizer.json")
    manifest = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "name": plan.name or name,
        "models": manifest_models,
        "tokenizer": {"path": "tokenizer.json", "size": (tmp / "tokenizer.json").stat().st_size,
                      "sha256": sha256_of(tmp / "tokenizer.json"), **meta},
        "provenance": {
            "sources": {m.role: m.source for m in plan.models},
            "tools": _tool_versions(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **plan.extra_provenance,
        },
    }
    if plan.validate:
        manifest["validation"] = _validate(tmp, manifest, hf, arch, built)
    manifest["provenance"]["export_seconds"] = round(time.perf_counter() - t_start, 1)
    manifest["provenance"]["export_peak_rss_bytes"] = peak_rss_bytes()
    _write_manifest(tmp, manifest)


def _write_manifest(folder: Path, manifest: dict) -> None:
    path = folder / MANIFEST
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _encoder(tok_file: Path):
    """text -> ids with the bundle's tokenizer, as validation and the runtime encode."""
    tok = load_tokenizer(tok_file)
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def _validate(folder: Path, manifest: dict, hf: dict, arch: dict, built: dict) -> dict:
    """Golden check, fp32 agreement and KL divergence per model, on the files as they will ship."""
    from edge_ssd.bundle import model_entry

    encode = _encoder(folder / "tokenizer.json")
    report = {}
    for role, m in manifest["models"].items():
        entry = model_entry(folder, role, m)
        with stage(f"validate {role} graph (golden check, top-1 agreement and KL vs fp32)"):
            kept = _cached_reference(built[role], [encode(p) for p in PROMPTS])
            reference, name = ((lambda prompts, kept=kept: kept), "numpy-fp32") if kept else \
                choose_reference(hf[role], arch[role])
            report[role] = validate_model(entry, encode, reference, reference_name=name)
        r = report[role]
        agree = r.get("top1_agreement_vs_fp32")
        print(f"    {role}: K+1-vs-one-at-a-time max |diff| {r['golden_max_abs_diff']:.3g}"
              + (f", top-1 agreement vs fp32 ({r['reference']}) {agree:.1%}, KL {r['kl_vs_fp32']:.4f} nats/token"
                 if agree is not None else "")
              + f", rows invariant for >= 2 rows (--exact possible): {r['rows_invariant']}")
    return report
