"""The pair bundle: one folder, described by `pair.json`, that is all the runtime reads.

The schema is documented in docs/bundle-format.md. Loading checks, in order: the manifest
exists (an export that did not finish leaves none), its schema version is one we read, every
listed file lies inside the folder, exists, has its recorded size and (once per file version,
remembered in a small stamp cache) its recorded sha256.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import BundleError

MANIFEST = "pair.json"
SCHEMA = "edge-ssd/pair-bundle"
SCHEMA_VERSION = 1
STAMP_CACHE = Path(os.environ.get("EDGE_SSD_CACHE", Path.home() / ".cache" / "edge-ssd")) / "verified.json"


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
    p = (root / rel).resolve()
    if os.path.isabs(rel) or not p.is_relative_to(root):
        raise BundleError(f"{what} path {rel!r} points outside the bundle folder {root}")
    return p


def _load_stamps() -> dict:
    try:
        return json.loads(STAMP_CACHE.read_text())
    except (OSError, ValueError):
        return {}


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
    stamps = _load_stamps() if verify == "auto" else {}
    changed = False
    for entry in files:
        p = _inside(root, entry["path"], "file")
        if not p.is_file():
            raise BundleError(f"bundle file {entry['path']} is missing from {root}")
        st = p.stat()
        if st.st_size != entry["size"]:
            raise BundleError(
                f"bundle file {entry['path']} is corrupt: {st.st_size} bytes, manifest says {entry['size']}"
            )
        if verify == "size":
            continue
        key, stamp = str(p), f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{entry['sha256']}"
        if verify == "auto" and stamps.get(key) == stamp:
            continue
        if sha256_of(p) != entry["sha256"]:
            raise BundleError(f"bundle file {entry['path']} is corrupt: sha256 does not match the manifest")
        stamps[key], changed = stamp, True
    if changed:
        _save_stamps(stamps)


def _model_entry(root: Path, role: str, m: dict) -> ModelEntry:
    try:
        files = m["files"]
        return ModelEntry(
            role=role,
            graph=_inside(root, m["graph"], "graph"),
            architecture=m["architecture"],
            num_layers=int(m["num_layers"]),
            num_heads=int(m["num_heads"]),
            num_kv_heads=int(m["num_kv_heads"]),
            head_dim=int(m["head_dim"]),
            hidden_size=int(m["hidden_size"]),
            vocab_size=int(m["vocab_size"]),
            kv_dtype=m["kv_dtype"],
            max_context=int(m["max_context"]),
            quant=dict(m["quant"]),
            io=dict(m["io"]),
            weight_bytes=sum(int(f["size"]) for f in files),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"manifest entry for the {role} model is malformed: {e!r}") from e


def load_bundle(path: "str | Path", verify: str = "auto") -> Bundle:
    """Read and check a bundle folder; raise BundleError with the reason when it is not usable."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise BundleError(f"no bundle folder at {path}")
    mf = root / MANIFEST
    if not mf.is_file():
        partial = " (it looks like an export that did not finish)" if root.name.endswith(".partial") or any(
            root.glob("*.onnx*")) or any(root.glob("*/*.onnx*")) else ""
        raise BundleError(f"{root} is not a complete bundle: {MANIFEST} is missing{partial}")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{mf} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise BundleError(f"{mf} is not an edge-ssd pair manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(
            f"{mf} has schema version {manifest.get('schema_version')}; this runtime reads version {SCHEMA_VERSION}"
        )
    models = manifest.get("models") or {}
    if "target" not in models:
        raise BundleError(f"{mf} names no target model")
    all_files = [f for m in models.values() for f in m.get("files", [])]
    tok = manifest.get("tokenizer") or {}
    if "path" not in tok:
        raise BundleError(f"{mf} names no tokenizer file")
    verify_files(root, all_files + [tok], verify)
    target = _model_entry(root, "target", models["target"])
    draft = _model_entry(root, "draft", models["draft"]) if "draft" in models else None
    if draft and draft.vocab_size < int(tok.get("vocab_size", 0)) and target.vocab_size < int(tok.get("vocab_size", 0)):
        raise BundleError("tokenizer vocabulary is larger than both models' vocabularies")
    return Bundle(root, manifest, target, draft, _inside(root, tok["path"], "tokenizer"))
