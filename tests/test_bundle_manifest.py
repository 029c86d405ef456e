"""A damaged bundle is one `error:` line through the real CLI, naming the file and the field.

Each case corrupts a copy of a real exported bundle (its pair.json, or a file's content under
--verify size, where checksums do not catch it) and runs `edge-ssd generate` on it.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Union

import pytest

from edge_ssd.bundle import load_bundle
from edge_ssd.cli import main
from edge_ssd.errors import BundleError
from edge_ssd.graphinfo import GraphFormatError, read_graph

Mutation = Callable[[dict], Union[None, bytes, object]]  # edits in place, or returns what to write instead


def _walk(m: dict, dotted: str) -> tuple:
    *parents, last = dotted.split(".")
    node = m
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node, (int(last) if isinstance(node, list) else last)


def set_(dotted: str, value) -> Mutation:
    def mutate(m: dict) -> None:
        node, key = _walk(m, dotted)
        node[key] = value
    return mutate


def drop(dotted: str) -> Mutation:
    def mutate(m: dict) -> None:
        node, key = _walk(m, dotted)
        del node[key]
    return mutate


def swap(a: str, b: str) -> Mutation:
    def mutate(m: dict) -> None:
        (na, ka), (nb, kb) = _walk(m, a), _walk(m, b)
        na[ka], nb[kb] = nb[kb], na[ka]
    return mutate


def replace_with(content) -> Mutation:
    return lambda m: content


T = "models.target"
# (case, mutation, text the single error line must contain)
CORRUPTIONS = [
    ("not-an-object", replace_with([1, 2]), "pair.json must hold a JSON object, got a list"),
    ("not-json", replace_with(b'{"schema": "edge-ssd/pair-bundle",'), "pair.json is not valid JSON"),
    ("not-utf8", replace_with('{"name": "caf\u00e9"}'.encode("latin-1")), "pair.json is not UTF-8"),
    ("empty-object", replace_with({}), "it has no schema field"),
    ("schema-name", set_("schema", "edge-ssd/other"), 'it has schema "edge-ssd/other"'),
    ("schema-version-string", set_("schema_version", "1"), 'schema_version must be an integer, got "1"'),
    ("schema-version-missing", drop("schema_version"), "schema_version must be an integer, got nothing"),
    ("schema-version-newer", set_("schema_version", 2), "schema version 2, a newer format"),
    ("schema-version-bool", set_("schema_version", True), "schema_version must be an integer, got true"),
    ("models-list", set_("models", ["target"]), "models must be an object, got a list"),
    ("no-target", drop(f"{T}"), "models.target is missing"),
    ("tokenizer-string", set_("tokenizer", "tokenizer.json"), 'tokenizer must be an object, got "tokenizer.json"'),
    ("tokenizer-no-path", drop("tokenizer.path"), "tokenizer.path is missing"),
    ("sha256-missing", drop(f"{T}.files.0.sha256"), "models.target.files[0].sha256 is missing"),
    ("sha256-short", set_("models.draft.files.1.sha256", "abc"), "models.draft.files[1].sha256 must be a sha256"),
    ("size-missing", drop("models.draft.files.1.size"), "models.draft.files[1].size is missing"),
    ("size-string", set_(f"{T}.files.0.size", "7805"), 'models.target.files[0].size must be an integer >= 0, got "'),
    ("size-negative", set_("tokenizer.size", -1), "tokenizer.size must be an integer >= 0, got -1"),
    ("size-float", set_(f"{T}.files.1.size", 1.5), "models.target.files[1].size must be an integer >= 0, got 1.5"),
    ("files-empty", set_(f"{T}.files", []),
     "models.target.files must be a list of at least 1 item(s), got an empty list"),
    ("file-not-object", set_(f"{T}.files.0", "target/model.onnx"), "models.target.files[0] must be an object"),
    ("path-nul", set_(f"{T}.files.0.path", "target/\u0000x"), "models.target.files[0].path must be a relative path"),
    ("path-absolute", set_(f"{T}.files.0.path", "/etc/passwd"), "models.target.files[0].path must be a relative"),
    ("path-escapes", set_(f"{T}.files.1.path", "../../x"),
     "models.target.files[1].path '../../x' points outside"),
    ("data-unlisted", drop(f"{T}.files.1"),
     "target/model.onnx reads its weights from target/model.onnx.data, which models.target.files does not list"),
    ("graph-unlisted", set_(f"{T}.graph", "tokenizer.json"), "models.target.graph \"tokenizer.json\" is not one of"),
    ("eos-not-list", set_("tokenizer.eos_ids", 2), "tokenizer.eos_ids must be a list, got 2"),
    ("eos-string", set_("tokenizer.eos_ids", [2, "3"]), 'tokenizer.eos_ids[1] must be an integer >= 0, got "3"'),
    ("eos-float", set_("tokenizer.eos_ids", [2.0]), "tokenizer.eos_ids[0] must be an integer >= 0, got 2.0"),
    ("special-token-id", set_("tokenizer.special_tokens", {"<|im_end|>": "2"}),
     'tokenizer.special_tokens.<|im_end|> must be an integer >= 0, got "2"'),
    ("add-bos-string", set_("tokenizer.add_bos", "false"), 'tokenizer.add_bos must be true or false, got "false"'),
    ("tokenizer-vocab", set_("tokenizer.vocab_size", 5000), "tokenizer.vocab_size is 5000, larger than every"),
    ("name-number", set_("name", 7), "name must be a non-empty string, got 7"),
    ("layers-string", set_(f"{T}.num_layers", "2"), 'models.target.num_layers must be an integer >= 1, got "2"'),
    ("layers-zero", set_(f"{T}.num_layers", 0), "models.target.num_layers must be an integer >= 1, got 0"),
    ("layers-more", set_(f"{T}.num_layers", 3), "models.target.num_layers is 3, but target/model.onnx has 2 layers"),
    ("layers-fewer", set_("models.draft.num_layers", 1), "models.draft.num_layers is 1, but draft/model.onnx has 2"),
    ("head-dim", set_(f"{T}.head_dim", 32),
     "models.target.head_dim is 32, but target/model.onnx has 16 as head dim in past_key_values.0.key"),
    ("kv-heads", set_(f"{T}.num_kv_heads", 4),
     "models.target.num_kv_heads is 4, but target/model.onnx has 2 KV heads in past_key_values.0.key"),
    ("kv-heads-bool", set_(f"{T}.num_kv_heads", True),
     "models.target.num_kv_heads must be an integer >= 1, got true"),
    ("vocab", set_(f"{T}.vocab_size", 512), "models.target.vocab_size is 512, but target/model.onnx returns 300"),
    ("kv-dtype", set_(f"{T}.kv_dtype", "float16"), 'models.target.kv_dtype is "float16", but target/model.onnx keeps'),
    ("kv-dtype-unknown", set_(f"{T}.kv_dtype", "bfloat16"), 'models.target.kv_dtype must be one of "float32"'),
    ("max-context-beyond", set_(f"{T}.max_context", 4096),
     "models.target.max_context is 4096, but target/model.onnx has rotary positions for 256"),
    ("max-context-zero", set_(f"{T}.max_context", 0), "models.target.max_context must be an integer >= 1"),
    ("quant-weights", set_(f"{T}.quant.weights", "int3"), 'models.target.quant.weights must be one of "fp32"'),
    ("quant-missing", drop(f"{T}.quant"), "models.target.quant is missing"),
    ("io-missing", drop(f"{T}.io"), "models.target.io is missing"),
    ("io-input-name", set_(f"{T}.io.inputs.input_ids", "ids"),
     'models.target.io.inputs.input_ids is "ids", but target/model.onnx has no input of that name'),
    ("io-output-name", set_("models.draft.io.outputs.logits", "scores"),
     'models.draft.io.outputs.logits is "scores", but draft/model.onnx has no output'),
    ("io-swapped", swap(f"{T}.io.inputs.seqlens_k", f"{T}.io.inputs.total_sequence_length"),
     "models.target.io.inputs.seqlens_k names target/model.onnx's input total_sequence_length"),
    ("io-layer-no-index", set_(f"{T}.io.inputs.past_key", "past_key_values.0.key"),
     'models.target.io.inputs.past_key must be a string with "{i}"'),
    ("io-layer-bad-format", set_(f"{T}.io.inputs.past_key", "past.{i}.{j}"),
     "models.target.io.inputs.past_key must be"),
    ("io-layer-wrong", set_(f"{T}.io.inputs.past_key", "past.{i}.key"),
     'models.target.io.inputs.past_key (layer 0) is "past.0.key", but target/model.onnx has no input'),
    ("io-present-wrong", set_(f"{T}.io.outputs.present_value", "present.{i}.v"),
     "models.target.io.outputs.present_value (layer 0)"),
    ("validation-type", set_("validation.target.rows_invariant", "yes"),
     'validation.target.rows_invariant must be true or false, got "yes"'),
    ("validation-list", set_("validation", [{}]), "validation must be an object, got a list"),
]


@pytest.fixture
def bundle_copy(fp32_bundle, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(fp32_bundle.path, copy)
    return copy


def corrupt_manifest(folder: Path, mutation: Mutation) -> None:
    mf = folder / "pair.json"
    manifest = json.loads(mf.read_text())
    out = mutation(manifest)
    out = manifest if out is None else out
    mf.write_bytes(out if isinstance(out, bytes) else json.dumps(out).encode())


def one_error_line(capsys, argv: list) -> str:
    """Run the real CLI in-process; return its only stderr line (exit 1, no traceback)."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def generate(folder: Path, *extra: str) -> list:
    return ["generate", "--bundle", str(folder), "--prompt", "hi", "--max-new-tokens", "1", *extra]


@pytest.mark.parametrize("mutation,expected", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_manifest_corruption_is_one_line_naming_the_field(bundle_copy, capsys, mutation, expected):
    corrupt_manifest(bundle_copy, mutation)
    line = one_error_line(capsys, generate(bundle_copy))
    assert expected in line
    assert "pair.json" in line


def test_the_untouched_copy_generates(bundle_copy, capsys):
    """The corruption table's baseline: without a corruption the same command succeeds."""
    assert main(generate(bundle_copy)) == 0


@pytest.mark.parametrize("file,expected", [("tokenizer.json", "tokenizer.json is not a usable tokenizer file"),
                                           ("target/model.onnx", "models.target.graph target/model.onnx is not a "
                                                                 "readable ONNX graph")])
def test_garbage_content_of_the_right_size_is_named(bundle_copy, capsys, file, expected):
    """--verify size skips checksums, so a same-size garbage file reaches the parsers."""
    path = bundle_copy / file
    size = path.stat().st_size
    path.write_bytes((b'{"model": \xff garbage ' * size)[:size])
    assert expected in one_error_line(capsys, generate(bundle_copy, "--verify", "size"))


def test_real_entry_point_prints_one_line(bundle_copy):
    """The installed command's path: `python -m edge_ssd.cli`, in a fresh process."""
    corrupt_manifest(bundle_copy, set_("models.target.num_layers", "2"))
    proc = subprocess.run([sys.executable, "-m", "edge_ssd.cli", *generate(bundle_copy)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f'error: {bundle_copy}/pair.json: models.target.num_layers must be an integer >= 1, got "2"']


def test_graph_reader_agrees_with_onnx(fp32_bundle):
    onnx = pytest.importorskip("onnx")
    path = fp32_bundle.path / "target" / "model.onnx"
    ours = read_graph(path, "target/model.onnx")
    model = onnx.load(str(path), load_external_data=False)

    def shape(v) -> tuple:
        return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim)

    assert {v.name: (v.type.tensor_type.elem_type, shape(v)) for v in model.graph.input} == {
        t.name: (t.elem_type, t.shape) for t in ours.inputs.values()}
    assert {v.name: (v.type.tensor_type.elem_type, shape(v)) for v in model.graph.output} == {
        t.name: (t.elem_type, t.shape) for t in ours.outputs.values()}
    cos = next(i for i in model.graph.initializer if i.name == "cos_cache")
    assert ours.rotary_positions == cos.dims[0] == fp32_bundle.target.max_context


@pytest.mark.parametrize("content", [b"", b"\x08", b"\x3a\xff\xff\xff\x0f", b"\x0b\x0c", b"not an onnx file"])
def test_graph_reader_refuses_what_is_not_a_graph(tmp_path, content):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(GraphFormatError):
        read_graph(path, "model.onnx")


def test_load_error_names_the_path_as_given(bundle_copy, monkeypatch):
    corrupt_manifest(bundle_copy, set_("models.draft.head_dim", 8))
    monkeypatch.chdir(bundle_copy.parent)
    with pytest.raises(BundleError, match=r"^bundle/pair\.json: models\.draft\.head_dim is 8, but draft/model\.onnx"):
        load_bundle("bundle")


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", "\udcff"])
def test_a_damaged_stamp_cache_only_costs_a_rehash(bundle_copy, tmp_path, monkeypatch, content):
    from edge_ssd import bundle as bundle_module

    stamps = tmp_path / "verified.json"
    stamps.write_text(content, errors="surrogateescape")
    monkeypatch.setattr(bundle_module, "STAMP_CACHE", stamps)
    assert load_bundle(bundle_copy).target.num_layers == 2
    assert str(bundle_copy / "target" / "model.onnx") in json.loads(stamps.read_text())


def test_full_verification_keeps_other_bundles_stamps(bundle_copy, tmp_path, monkeypatch):
    from edge_ssd import bundle as bundle_module

    stamps = tmp_path / "verified.json"
    stamps.write_text(json.dumps({"/elsewhere/model.onnx": "1:2:3:abc"}))
    monkeypatch.setattr(bundle_module, "STAMP_CACHE", stamps)
    load_bundle(bundle_copy, verify="full")
    assert "/elsewhere/model.onnx" in json.loads(stamps.read_text())


def test_a_byte_order_mark_is_accepted(bundle_copy):
    mf = bundle_copy / "pair.json"
    mf.write_bytes(b"\xef\xbb\xbf" + mf.read_bytes())
    assert load_bundle(bundle_copy).draft is not None


@pytest.mark.parametrize("location,expected", [
    ("../target/model.onnx.data", "draft/model.onnx reads external data from '../target/model.onnx.data', which "
                                  "escapes model directory draft/"),
    ("weights.bin", "draft/model.onnx reads its weights from draft/weights.bin, which models.draft.files does not "
                    "list"),
])
def test_graph_weights_outside_the_checked_files_are_refused(bundle_copy, capsys, location, expected):
    """The graph itself (rewritten, with its checksum updated) names where its weights are."""
    onnx = pytest.importorskip("onnx")
    from edge_ssd.bundle import sha256_of

    graph = bundle_copy / "draft" / "model.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(model, str(graph))
    shutil.copy(bundle_copy / "draft" / "model.onnx.data", bundle_copy / "draft" / "weights.bin")
    corrupt_manifest(bundle_copy, set_("models.draft.files.0", {
        "path": "draft/model.onnx", "size": graph.stat().st_size, "sha256": sha256_of(graph)}))
    assert expected in one_error_line(capsys, generate(bundle_copy))
