"""The pair bundle: one folder, described by `pair.json`, that is all the runtime reads.

The schema is documented in docs/bundle-format.md. Loading checks, in order: the manifest
exists (an export that did not finish leaves none) and is a UTF-8 JSON object; its schema name
and version are ones we read; every field has the type and range the runtime relies on; every
listed file lies inside the folder, exists, has its recorded size and (once per file version,
remembered in a small stamp cache) its recorded sha256; and each model's ONNX graph has the
inputs, outputs and shapes the manifest claims. Any failure is a BundleError naming the file
and the field, raised before a session is created.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

from .checks import is_int
from .errors import BundleError
from .graphinfo import DTYPE_NAMES, FLOAT, FLOAT16, INT32, INT64, GraphFormatError, GraphInfo, Tensor, read_graph

MANIFEST = "pair.json"
SCHEMA = "edge-ssd/pair-bundle"
SCHEMA_VERSION = 1
STAMP_CACHE = Path(os.environ.get("EDGE_SSD_CACHE", Path.home() / ".cache" / "edge-ssd")) / "verified.json"
ROLES = ("target", "draft")
WEIGHT_QUANTS = ("fp32", "fp16", "int8", "int4")
KV_DTYPES = {"float32": FLOAT, "float16": FLOAT16}


@dataclass(frozen=True)
class ModelEntry:
    """One decoder of the pair, as the manifest describes it."""

    role: str
    graph: Path
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    kv_dtype: str
    max_context: int
    quant: dict
    io: dict
    weight_bytes: int

    @property
    def kv_bytes_per_token(self) -> int:
        """2 (K and V) x layers x KV heads x head dim x dtype size."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * (2 if self.kv_dtype == "float16" else 4)


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict
    target: ModelEntry
    draft: Optional[ModelEntry]
    tokenizer_file: Path

    @property
    def tokenizer(self) -> dict:
        return self.manifest["tokenizer"]

    @property
    def name(self) -> str:
        return self.manifest.get("name", self.path.name)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def _inside(root: Path, rel: str, what: str) -> Path:
    try:
        p = (root / rel).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # too long, a symlink loop, a NUL byte
        raise BundleError(f"{what} {rel!r} cannot be resolved in the bundle folder {root}: {e}") from e
    if os.path.isabs(rel) or not p.is_relative_to(root):
        raise BundleError(f"{what} {rel!r} points outside the bundle folder {root}")
    return p


def _load_stamps() -> dict:
    """The stamp cache; a damaged one is only a cache, so it counts as empty."""
    try:
        stamps = json.loads(STAMP_CACHE.read_text())
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _save_stamps(stamps: dict) -> None:
    try:
        STAMP_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = STAMP_CACHE.with_suffix(".tmp")
        tmp.write_text(json.dumps(stamps))
        os.replace(tmp, STAMP_CACHE)
    except OSError:
        pass  # a read-only home only costs a re-hash next time


def verify_files(root: Path, files: list, verify: str = "auto") -> None:
    """Check presence, size and sha256 of each file entry {path, size, sha256}.

    verify: "full" hashes every file, "auto" hashes a file only when its (size, mtime, inode)
    stamp was not verified before, "size" checks sizes only.
    """
    stamps = _load_stamps() if verify != "size" else {}  # "full" records stamps too, keeping the others
    changed = False
    for entry in files:
        try:
            changed |= _verify_file(root, entry, verify, stamps)
        except OSError as e:
            raise BundleError(f"bundle file {entry['path']} in {root} cannot be read: {e.strerror}") from e
    if changed:
        _save_stamps(stamps)


def _verify_file(root: Path, entry: dict, verify: str, stamps: dict) -> bool:
    """Check one file; return True when it was hashed and its stamp recorded."""
    p = _inside(root, entry["path"], "file path")
    if not p.is_file():
        raise BundleError(f"bundle file {entry['path']} is missing from {root}")
    st = p.stat()
    if st.st_size != entry["size"]:
        raise BundleError(f"bundle file {entry['path']} is corrupt: {st.st_size} bytes, manifest says {entry['size']}")
    if verify == "size":
        return False
    key, stamp = str(p), f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{entry['sha256']}"
    if verify == "auto" and stamps.get(key) == stamp:
        return False
    if sha256_of(p) != entry["sha256"]:
        raise BundleError(f"bundle file {entry['path']} is corrupt: sha256 does not match the manifest")
    stamps[key] = stamp
    return True


# ---------------------------------------------------------------------------------------------
# The manifest schema. A spec checks one value and, on failure, raises a BundleError that names
# the manifest file and the field's path (models.target.files[0].sha256), says what the value
# must be and shows what it is, so a hand-edited or damaged manifest is one readable line.


def _shown(v: object) -> str:
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "a list" if v else "an empty list"
    text = json.dumps(v, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _field_path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


class _Spec:
    expect: str
    required: bool

    def fail(self, value: object, where: str, manifest: str) -> BundleError:
        return BundleError(f"{manifest}: {where} must be {self.expect}, got {_shown(value)}")

    def check(self, value: object, where: str, manifest: str) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Leaf(_Spec):
    """A value checked by a predicate."""

    expect: str
    ok: Callable[[object], bool]
    required: bool = True

    def check(self, value: object, where: str, manifest: str) -> None:
        if not self.ok(value):
            raise self.fail(value, where, manifest)


@dataclass(frozen=True)
class Obj(_Spec):
    """A JSON object with known fields; fields it does not list are allowed (and ignored)."""

    fields: dict
    required: bool = True
    expect: str = "an object"

    def check(self, value: object, where: str, manifest: str) -> None:
        if not isinstance(value, dict):
            raise self.fail(value, where or "the manifest", manifest)
        for key, spec in self.fields.items():
            if key in value:
                spec.check(value[key], _field_path(where, key), manifest)
            elif spec.required:
                raise BundleError(f"{manifest}: {_field_path(where, key)} is missing (it must be {spec.expect})")


@dataclass(frozen=True)
class ListOf(_Spec):
    """A JSON list whose every item matches `item`."""

    item: _Spec
    min_len: int = 0
    required: bool = True

    @property
    def expect(self) -> str:
        return "a list" if self.min_len == 0 else f"a list of at least {self.min_len} item(s)"

    def check(self, value: object, where: str, manifest: str) -> None:
        if not isinstance(value, list) or len(value) < self.min_len:
            raise self.fail(value, where, manifest)
        for i, item in enumerate(value):
            self.item.check(item, f"{where}[{i}]", manifest)


@dataclass(frozen=True)
class MapOf(_Spec):
    """A JSON object whose every value matches `value`, whatever its keys."""

    value: _Spec
    required: bool = True
    expect: str = "an object"

    def check(self, value: object, where: str, manifest: str) -> None:
        if not isinstance(value, dict):
            raise self.fail(value, where, manifest)
        for key, item in value.items():
            self.value.check(item, _field_path(where, key), manifest)


def optional(spec: _Spec) -> _Spec:
    return dataclasses.replace(spec, required=False)


def integer(minimum: int) -> Leaf:
    return Leaf(f"an integer >= {minimum}", lambda v: is_int(v) and v >= minimum)


def one_of(*choices: str) -> Leaf:
    return Leaf("one of " + ", ".join(json.dumps(c) for c in choices), lambda v: isinstance(v, str) and v in choices)


def _is_layer_name(v: object) -> bool:
    """A per-layer io name: `{i}` is the layer index and nothing else may be formatted."""
    if not isinstance(v, str) or "{i}" not in v:
        return False
    try:
        return v.format(i=0) != v.format(i=1)
    except (KeyError, IndexError, ValueError):
        return False


STRING = Leaf("a non-empty string", lambda v: isinstance(v, str) and v != "")
PATH = Leaf("a relative path", lambda v: isinstance(v, str) and v != "" and "\0" not in v and not os.path.isabs(v))
TEXT = Leaf("a string or null", lambda v: v is None or isinstance(v, str))
BOOL = Leaf("true or false", lambda v: isinstance(v, bool))
SHA256 = Leaf("a sha256 of 64 hex digits", lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None)
LAYER_NAME = Leaf('a string with "{i}" for the layer index', _is_layer_name)
FIXED_INPUTS = {"input_ids": (INT64, 2), "seqlens_k": (INT32, 1), "total_sequence_length": (INT32, 0),
                "logits_to_keep": (INT64, 1)}  # io key -> (element type, rank) the runtime binds

FILE = Obj({"path": PATH, "size": integer(0), "sha256": SHA256})
MODEL = Obj({
    "graph": PATH,
    "files": ListOf(FILE, min_len=1),
    "architecture": STRING,
    "num_layers": integer(1),
    "num_heads": integer(1),
    "num_kv_heads": integer(1),
    "head_dim": integer(1),
    "hidden_size": integer(1),
    "vocab_size": integer(1),
    "kv_dtype": one_of(*KV_DTYPES),
    "max_context": integer(1),
    "quant": Obj({"weights": one_of(*WEIGHT_QUANTS), "block_size": optional(integer(1))}),
    "io": Obj({
        "inputs": Obj({**{k: STRING for k in FIXED_INPUTS}, "past_key": LAYER_NAME, "past_value": LAYER_NAME}),
        "outputs": Obj({"logits": STRING, "present_key": LAYER_NAME, "present_value": LAYER_NAME}),
    }),
})
VALIDATION = Obj({"rows_invariant": optional(BOOL)}, required=False)
MANIFEST_SPEC = Obj({
    "name": optional(STRING),
    "models": Obj({"target": MODEL, "draft": optional(MODEL)}),
    "tokenizer": Obj({
        **FILE.fields,
        "vocab_size": integer(1),
        "eos_ids": ListOf(integer(0)),
        "bos_token": optional(TEXT),
        "add_bos": optional(BOOL),
        "special_tokens": optional(MapOf(integer(0))),
        "chat_template": optional(TEXT),
    }),
    "provenance": optional(Obj({})),
    "validation": optional(Obj({role: VALIDATION for role in ROLES})),
})


def _read_manifest(mf: Path, manifest: str) -> dict:
    """Parse pair.json as UTF-8 JSON (whatever the locale says)."""
    try:
        text = mf.read_bytes().decode("utf-8-sig")  # a byte-order mark from a Windows editor is fine
    except OSError as e:
        raise BundleError(f"{manifest} cannot be read: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise BundleError(f"{manifest} is not UTF-8 text (byte {e.start} is not valid UTF-8)") from e
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise BundleError(f"{manifest} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise BundleError(f"{manifest} must hold a JSON object, got {_shown(data)}")
    return data


def _check_schema_id(data: dict, manifest: str) -> None:
    """Refuse a file that is not our manifest, or a version we do not read, saying which it is."""
    if data.get("schema") != SCHEMA:
        got = f"schema {_shown(data['schema'])}" if "schema" in data else "no schema field"
        raise BundleError(f"{manifest} is not an edge-ssd pair manifest: it has {got}, expected {json.dumps(SCHEMA)}")
    version = data.get("schema_version")
    if not is_int(version):
        raise BundleError(f"{manifest}: schema_version must be an integer, got "
                          + (_shown(version) if "schema_version" in data else "nothing (it is missing)"))
    if version != SCHEMA_VERSION:
        which = "a newer" if version > SCHEMA_VERSION else "an older"
        raise BundleError(f"{manifest} has schema version {version}, {which} format than this runtime reads "
                          f"(version {SCHEMA_VERSION}); use an edge-ssd that reads it, or re-export the bundle")


def check_manifest(data: dict, manifest: str) -> None:
    """Schema name and version first (another file would fail every field), then every field."""
    _check_schema_id(data, manifest)
    MANIFEST_SPEC.check(data, "", manifest)


def _check_consistency(data: dict, manifest: str) -> None:
    """What no single field shows: an unchecked graph, a tokenizer wider than the models."""
    for role in ROLES:
        m = data["models"].get(role)
        if m is not None and m["graph"] not in {f["path"] for f in m["files"]}:
            raise BundleError(f"{manifest}: models.{role}.graph {json.dumps(m['graph'])} is not one of "
                              f"models.{role}.files, so it would load unchecked")
    tok_vocab = data["tokenizer"]["vocab_size"]
    widest = max(data["models"][r]["vocab_size"] for r in ROLES if r in data["models"])
    if tok_vocab > widest:
        raise BundleError(f"{manifest}: tokenizer.vocab_size is {tok_vocab}, larger than every model's "
                          f"vocab_size (at most {widest})")


def model_entry(root: Path, role: str, m: dict) -> ModelEntry:
    """The ModelEntry of a manifest model entry that check_manifest accepted."""
    return ModelEntry(
        role=role, graph=_inside(root, m["graph"], f"models.{role}.graph"), architecture=m["architecture"],
        num_layers=m["num_layers"], num_heads=m["num_heads"], num_kv_heads=m["num_kv_heads"],
        head_dim=m["head_dim"], hidden_size=m["hidden_size"], vocab_size=m["vocab_size"],
        kv_dtype=m["kv_dtype"], max_context=m["max_context"], quant=dict(m["quant"]), io=dict(m["io"]),
        weight_bytes=sum(f["size"] for f in m["files"]),
    )


# ---------------------------------------------------------------------------------------------
# The manifest against the graph: what the runtime will bind must be what the graph declares.


KV_IO = (("inputs", "past_key"), ("inputs", "past_value"), ("outputs", "present_key"), ("outputs", "present_value"))


class _GraphCheck:
    """One model's manifest entry against its graph; every failure names the field and the file."""

    def __init__(self, entry: ModelEntry, graph: GraphInfo, manifest: str):
        self.entry, self.graph, self.manifest = entry, graph, manifest
        self.at = f"models.{entry.role}"

    def mismatch(self, field: str, actual: str) -> BundleError:
        claimed = json.dumps(getattr(self.entry, field))
        return BundleError(f"{self.manifest}: {self.at}.{field} is {claimed}, but {self.graph.name} {actual}")

    def tensor(self, side: str, key: str, dtype: Optional[int], rank: int, layer: Optional[int] = None) -> Tensor:
        """The graph tensor that io.{side}.{key} names, with the element type and rank the runtime binds."""
        name = self.entry.io[side][key] if layer is None else self.entry.io[side][key].format(i=layer)
        field = f"{self.at}.io.{side}.{key}" + ("" if layer is None else f" (layer {layer})")
        tensors = self.graph.inputs if side == "inputs" else self.graph.outputs
        t = tensors.get(name)
        if t is None:
            listed = ", ".join(list(tensors)[:6]) + (", ..." if len(tensors) > 6 else "")
            raise BundleError(f"{self.manifest}: {field} is {json.dumps(name)}, but {self.graph.name} has no "
                              f"{side[:-1]} of that name (its {side}: {listed})")
        if (dtype is not None and t.elem_type != dtype) or (t.shape is not None and len(t.shape) != rank):
            want = (DTYPE_NAMES[dtype] + " " if dtype is not None else "") + f"of rank {rank}"
            raise BundleError(f"{self.manifest}: {field} names {self.graph.name}'s {side[:-1]} {name}, which is "
                              f"{t.dtype} of shape {list(t.shape or [])}; the runtime binds {want} there")
        return t

    def layers(self) -> int:
        """How many layers the graph has, counted by the past-key inputs the io template names."""
        n = 0
        while self.entry.io["inputs"]["past_key"].format(i=n) in self.graph.inputs:
            n += 1
        return n

    def kv(self, t: Tensor) -> None:
        """A KV buffer the runtime allocates from kv_dtype, num_kv_heads and head_dim."""
        if t.elem_type != KV_DTYPES[self.entry.kv_dtype]:
            raise self.mismatch("kv_dtype", f"keeps {t.name} in {t.dtype}")
        for dim, field, what in ((1, "num_kv_heads", "KV heads"), (3, "head_dim", "as head dim")):
            size = t.shape[dim] if t.shape else None
            if isinstance(size, int) and size != getattr(self.entry, field):
                raise self.mismatch(field, f"has {size} {what} in {t.name}")

    def all_inputs_named(self, layers: int) -> None:
        io = self.entry.io["inputs"]
        named = {io[k] for k in FIXED_INPUTS} | {io[key].format(i=i) for i in range(layers)
                                                 for side, key in KV_IO if side == "inputs"}
        extra = [name for name in self.graph.inputs if name not in named]
        if extra:
            raise BundleError(f"{self.manifest}: {self.graph.name} has input {extra[0]}, which {self.at}.io does not "
                              "name (the runtime would leave it unbound)")


def check_graph_files(role: str, m: dict, graph: GraphInfo, manifest: str) -> None:
    """The weights a graph loads (external data) must lie in its folder, as onnxruntime also
    requires, and be files the manifest lists, so that they are checked."""
    folder = PurePosixPath(m["graph"]).parent
    listed = {f["path"] for f in m["files"]}
    for location in sorted(graph.external_files):
        loc = PurePosixPath(location.replace("\\", "/"))
        if loc.is_absolute() or ".." in loc.parts:
            raise BundleError(f"{manifest}: {graph.name} reads external data from {location!r}, which escapes "
                              f"model directory {folder}/ (onnxruntime refuses it too)")
        rel = str(folder / loc)
        if rel not in listed:
            raise BundleError(f"{manifest}: {graph.name} reads its weights from {rel}, which models.{role}.files "
                              "does not list, so they would load unchecked")


def check_graph(entry: ModelEntry, graph: GraphInfo, manifest: str) -> None:
    """Check the manifest's claims about one model against its graph (see graphinfo.read_graph).

    Catches at load what would otherwise fail inside onnxruntime mid-generation: io names the
    graph does not have, a layer count, KV heads, head dim, KV dtype or vocabulary that differ
    from the graph's, and a max_context beyond the rotary cache (GroupQueryAttention refuses a
    position past it).
    """
    c = _GraphCheck(entry, graph, manifest)
    for key, (dtype, rank) in FIXED_INPUTS.items():
        c.tensor("inputs", key, dtype, rank)
    logits = c.tensor("outputs", "logits", FLOAT, 3)
    layers = c.layers()
    if layers == 0:
        c.tensor("inputs", "past_key", None, 4, layer=0)  # raises: the template names no input
    if layers != entry.num_layers:
        raise c.mismatch("num_layers", f"has {layers} layers")
    for i in range(layers):
        for side, key in KV_IO:
            c.kv(c.tensor(side, key, None, 4, layer=i))
    c.all_inputs_named(layers)
    vocab = logits.shape[2] if logits.shape else None
    if isinstance(vocab, int) and vocab != entry.vocab_size:
        raise c.mismatch("vocab_size", f"returns {vocab} logits per row")
    if graph.rotary_positions is not None and entry.max_context > graph.rotary_positions:
        raise c.mismatch("max_context", f"has rotary positions for {graph.rotary_positions} tokens only")


def _read_model_graph(root: Path, role: str, m: dict, manifest: str) -> GraphInfo:
    try:
        return read_graph(_inside(root, m["graph"], f"models.{role}.graph"), m["graph"])
    except (GraphFormatError, OSError) as e:
        raise BundleError(f"{manifest}: models.{role}.graph {m['graph']} is not a readable ONNX graph: {e}") from e


def _check_paths(root: Path, data: dict, manifest: str) -> None:
    """Every path the manifest gives must stay inside the bundle folder (symlinks resolved)."""
    for role in ROLES:
        m = data["models"].get(role)
        if m is not None:
            _inside(root, m["graph"], f"{manifest}: models.{role}.graph")
            for i, f in enumerate(m["files"]):
                _inside(root, f["path"], f"{manifest}: models.{role}.files[{i}].path")
    _inside(root, data["tokenizer"]["path"], f"{manifest}: tokenizer.path")


def load_bundle(path: "str | Path", verify: str = "auto") -> Bundle:
    """Read and check a bundle folder; raise BundleError with the reason when it is not usable."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise BundleError(f"no bundle folder at {path}")
    mf, manifest = root / MANIFEST, str(Path(path) / MANIFEST)
    if not mf.is_file():
        partial = " (it looks like an export that did not finish)" if ".partial" in root.name or any(
            root.glob("*.onnx*")) or any(root.glob("*/*.onnx*")) else ""
        raise BundleError(f"{root} is not a complete bundle: {MANIFEST} is missing{partial}")
    data = _read_manifest(mf, manifest)
    check_manifest(data, manifest)
    models, tok = data["models"], data["tokenizer"]
    roles = [r for r in ROLES if r in models]
    _check_paths(root, data, manifest)
    _check_consistency(data, manifest)
    entries = {r: model_entry(root, r, models[r]) for r in roles}
    verify_files(root, [f for r in roles for f in models[r]["files"]] + [tok], verify)
    for r in roles:
        graph = _read_model_graph(root, r, models[r], manifest)
        check_graph_files(r, models[r], graph, manifest)
        check_graph(entries[r], graph, manifest)
    return Bundle(root, data, entries["target"], entries.get("draft"), _inside(root, tok["path"], "tokenizer.path"))
