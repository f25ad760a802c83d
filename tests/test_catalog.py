"""The model catalog as a user meets it: roots in the layouts of the web UIs, scans that read only
what changed, sidecars of other tools, finding and listing entries, tags and ratings, duplicates,
lineage, catalog references in recipes, and the `mergekit-sd catalog` commands.

Every test passes its catalog explicitly (a file under tmp_path); MERGEKIT_SD_CATALOG points at a
throwaway path so nothing can reach the user's real catalog."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO, run_cli, run_piped
from terminal import run_on_terminal

from catalog import scan as scan_module
from catalog.dupes import find_duplicates
from catalog.edits import add_root, remove, remove_root, set_note, set_rating, set_tags
from catalog.entries import Filters, find_entry, get_entry, list_entries
from catalog.hash_cache import hash_pending
from catalog.hashes import hash_file
from catalog.identity import parents_from_metadata
from catalog.layouts import ModelFolder, detect_layout
from catalog.lineage import Node, lineage
from catalog.resolver import CatalogResolver
from catalog.scan import PARALLEL_MIN, scan
from catalog.sidecars import write_civitai_info, write_preview
from catalog.store import ENV_VAR, SCHEMA_VERSION, Store
from mergekit_sd.errors import UserError
from mergekit_sd.testing import make_demo_workspace, write_checkpoint, write_embedding, write_lora

# the six files of `webui()`: name -> (folder, template)
WEBUI_FILES = {
    "base15": ("models/Stable-diffusion", "sd1"),
    "basexl": ("models/Stable-diffusion", "sdxl"),
    "mychar": ("models/Lora", "lora"),
    "xlstyle": ("models/LyCORIS", "lora_xl"),
    "vae": ("models/VAE", "vae"),
    "emb": ("embeddings", "emb"),
}


@pytest.fixture(autouse=True)
def _no_user_catalog(tmp_path, monkeypatch):
    """Anything that forgot to pass its catalog would land here, not in the user's data dir."""
    fallback = tmp_path / "env-catalog.sqlite"
    monkeypatch.setenv(ENV_VAR, str(fallback))
    yield
    assert not fallback.exists(), "a catalog was opened without an explicit path"


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "c.sqlite") as opened:
        yield opened


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """One tiny file of each kind, written once; tests copy them (a copy is a new inode)."""
    d = tmp_path_factory.mktemp("tiny")
    return {
        "sd1": write_checkpoint(d / "sd1.safetensors", "sd1", seed=1),
        "sdxl": write_checkpoint(d / "sdxl.safetensors", "sdxl", seed=3),
        "vae": write_checkpoint(d / "vae.safetensors", "vae-sd", seed=4),
        "lora": write_lora(d / "mychar.safetensors", "kohya-sd1", seed=5),
        "lora_xl": write_lora(d / "xlstyle.safetensors", "kohya-sdxl", seed=6),
        "emb": write_embedding(d / "emb.safetensors", "sd1"),
    }


def put(template: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, dest)
    return dest


def webui(root: Path, tiny: dict[str, Path]) -> dict[str, Path]:
    """An AUTOMATIC1111 folder with two checkpoints, two LoRAs, a VAE and an embedding."""
    return {name: put(tiny[template], root / folder / f"{name}.safetensors")
            for name, (folder, template) in WEBUI_FILES.items()}


def by_name(store: Store) -> dict:
    return {e.name: e for e in list_entries(store, Filters())}


def names(entries) -> list[str]:
    return [e.name for e in entries]


def bump_mtime(path: Path, seconds: int = 5) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


def no_reading(monkeypatch) -> None:
    """Make any model or sidecar read during a scan fail the test."""
    def refuse(*args):
        raise AssertionError(f"read during a scan that should read nothing: {args}")

    monkeypatch.setattr(scan_module, "examine", refuse)
    monkeypatch.setattr(scan_module, "read_sidecars", refuse)


def catalog_cli(catalog: Path, *args) -> subprocess.CompletedProcess:
    return run_cli("catalog", *args, "--catalog", catalog)


def run_without_terminal(*args) -> subprocess.CompletedProcess:
    """run_cli with stdin that is not a terminal (so a question cannot be asked or hang)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "mergekit_sd.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300,
                          stdin=subprocess.DEVNULL)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# --- layouts ---------------------------------------------------------------------------------


def test_a1111_layout_names_each_model_folder_with_its_kind(tmp_path):
    for folder in ("models/Stable-diffusion", "models/Lora", "models/LyCORIS", "models/VAE",
                   "embeddings", "models/ESRGAN", "outputs"):
        (tmp_path / folder).mkdir(parents=True)
    layout = detect_layout(tmp_path)
    assert layout.name == "a1111"
    assert layout.folders == (
        ModelFolder(tmp_path / "models/Stable-diffusion", "checkpoint"),
        ModelFolder(tmp_path / "models/Lora", "lora"),
        ModelFolder(tmp_path / "models/LyCORIS", "lora"),
        ModelFolder(tmp_path / "models/VAE", "vae"),
        ModelFolder(tmp_path / "embeddings", "embedding"),
    )


def test_comfyui_layout_adds_the_folders_of_extra_model_paths(tmp_path):
    comfy = tmp_path / "ComfyUI"
    for folder in ("checkpoints", "loras", "vae", "clip", "unet", "diffusion_models",
                   "upscale_models"):
        (comfy / "models" / folder).mkdir(parents=True)
    webui_dir = tmp_path / "webui"
    for folder in ("models/Stable-diffusion", "models/Lora", "models/LyCORIS", "models/ESRGAN"):
        (webui_dir / folder).mkdir(parents=True)
    (comfy / "extra_model_paths.yaml").write_text(textwrap.dedent("""\
        a111:
            base_path: ../webui
            checkpoints: models/Stable-diffusion
            loras: |
                models/Lora
                models/LyCORIS
            upscale_models: models/ESRGAN
            vae: models/does-not-exist
        other:
            is_default: true
        """))
    layout = detect_layout(comfy)
    assert layout.name == "comfyui"
    assert layout.folders == (
        ModelFolder(comfy / "models/checkpoints", "checkpoint"),
        ModelFolder(comfy / "models/loras", "lora"),
        ModelFolder(comfy / "models/vae", "vae"),
        ModelFolder(comfy / "models/clip", "text_encoder"),
        ModelFolder(comfy / "models/unet", "diffusion_model"),
        ModelFolder(comfy / "models/diffusion_models", "diffusion_model"),
        ModelFolder(webui_dir / "models/Stable-diffusion", "checkpoint"),
        ModelFolder(webui_dir / "models/Lora", "lora"),
        ModelFolder(webui_dir / "models/LyCORIS", "lora"),
    )


def test_plain_folder_is_scanned_whole_and_known_folder_names_give_a_kind(tmp_path):
    plain = tmp_path / "my models"
    plain.mkdir()
    assert detect_layout(plain).name == "plain"
    assert detect_layout(plain).folders == (ModelFolder(plain, None),)
    loras = tmp_path / "Lora"
    loras.mkdir()
    assert detect_layout(loras).folders == (ModelFolder(loras, "lora"),)


def test_layout_of_a_file_or_a_missing_folder_is_a_user_error(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    for bad in (file, tmp_path / "nowhere"):
        with pytest.raises(UserError, match="not a folder"):
            detect_layout(bad)


def test_bad_extra_model_paths_yaml_is_a_user_error(tmp_path):
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    extra = tmp_path / "extra_model_paths.yaml"
    extra.write_text("a111:\n    base_path: [unclosed\n")
    with pytest.raises(UserError, match="cannot read it as YAML"):
        detect_layout(tmp_path)
    extra.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="expected sections"):
        detect_layout(tmp_path)


def test_a_broken_extra_model_paths_yaml_is_a_note_and_the_other_roots_are_scanned(
        tmp_path, store, tiny):
    comfy = tmp_path / "ComfyUI"
    put(tiny["lora"], comfy / "models" / "loras" / "comfy-lora.safetensors")
    (comfy / "extra_model_paths.yaml").write_text("a111:\n    base_path: ../webui\n")
    add_root(store, comfy)
    webui(tmp_path / "webui", tiny)
    add_root(store, tmp_path / "webui")
    (comfy / "extra_model_paths.yaml").write_text("a111:\n    base_path: [unclosed\n")
    report = scan(store, jobs=1)
    assert report.problems == [
        f"{comfy / 'extra_model_paths.yaml'}: cannot read it as YAML (ParserError); fix the "
        "file or add the model folders as roots one by one; scanned ComfyUI's own folders only"]
    assert sorted(names(list_entries(store, Filters()))) == sorted([*WEBUI_FILES, "comfy-lora"])


# --- scanning --------------------------------------------------------------------------------


def test_scan_identifies_every_file_of_a_webui_folder(tmp_path, store, tiny):
    files = webui(tmp_path / "webui", tiny)
    root_id, layout = add_root(store, tmp_path / "webui")
    assert (root_id, layout.name) == (1, "a1111")
    report = scan(store, jobs=1)
    assert (report.seen, report.new, report.changed, report.unchanged) == (6, 6, 0, 0)
    assert (report.bad, report.problems, report.partial, report.missing) == ([], [], 0, 0)
    entries = by_name(store)
    found = {n: (e.kind, e.architecture, e.base_model, e.folder_kind, e.lora_rank, e.status)
             for n, e in entries.items()}
    assert found == {
        "base15": ("checkpoint", "sd1", "SD 1.5", "checkpoint", None, "ok"),
        "basexl": ("checkpoint", "sdxl", "SDXL 1.0", "checkpoint", None, "ok"),
        "mychar": ("lora", "sd1", "SD 1.5", "lora", 4, "ok"),
        "xlstyle": ("lora", "sdxl", "SDXL 1.0", "lora", 4, "ok"),
        "vae": ("vae", "VAE (4 latent channels)", None, "vae", None, "ok"),
        "emb": ("embedding", "sd1", "SD 1.5", "embedding", None, "ok"),
    }
    # kohya's most frequent training tags; the synthetic LoRAs were trained as "mychar" ...
    assert entries["mychar"].trigger_words == ["mychar", "1girl", "solo"]
    assert entries["xlstyle"].trigger_words == ["xlstyle", "1girl", "solo"]
    assert entries["base15"].trigger_words == []
    assert entries["mychar"].lora_format == "kohya LoRA"
    assert {n: (e.path, e.size) for n, e in entries.items()} == {
        n: (str(p), p.stat().st_size) for n, p in files.items()}
    assert all(e.sha256 is None and e.source == "local" for e in entries.values())


def test_second_scan_reads_nothing_and_reports_all_unchanged(tmp_path, store, tiny, monkeypatch):
    webui(tmp_path / "webui", tiny)
    add_root(store, tmp_path / "webui")
    scan(store, jobs=1)
    before = [tuple(r) for r in store.db.execute("SELECT * FROM files ORDER BY id")]
    no_reading(monkeypatch)
    report = scan(store, jobs=1)
    assert (report.seen, report.new, report.changed, report.unchanged, report.missing) == (
        6, 0, 0, 6, 0)
    assert report.moved == [] and report.bad == []
    assert [tuple(r) for r in store.db.execute("SELECT * FROM files ORDER BY id")] == before


def test_touched_file_is_changed_and_only_it_is_read_again(tmp_path, store, tiny, monkeypatch):
    files = webui(tmp_path / "webui", tiny)
    add_root(store, tmp_path / "webui")
    scan(store, jobs=1)
    bump_mtime(files["mychar"])
    examined = []
    real = scan_module.examine
    monkeypatch.setattr(scan_module, "examine", lambda p: examined.append(p) or real(p))
    report = scan(store, jobs=1)
    assert (report.new, report.changed, report.unchanged) == (0, 1, 5)
    assert examined == [str(files["mychar"])]
    row = store.db.execute("SELECT mtime_ns FROM files WHERE name = 'mychar'").fetchone()
    assert row[0] == files["mychar"].stat().st_mtime_ns


def test_downloads_in_progress_and_hidden_files_are_skipped(tmp_path, store, tiny):
    loras = tmp_path / "webui" / "models" / "Lora"
    put(tiny["lora"], loras / "done.safetensors")
    for name in ("a.safetensors.partial", "b.safetensors.part", "c.safetensors.downloading"):
        put(tiny["lora"], loras / name)
    (loras / "notes.txt.part").write_text("not a model download")
    put(tiny["lora"], loras / ".hidden.safetensors")
    put(tiny["lora"], loras / ".cache" / "inside.safetensors")
    add_root(store, tmp_path / "webui")
    report = scan(store, jobs=1)
    assert (report.seen, report.new, report.partial) == (1, 1, 3)
    assert names(list_entries(store, Filters())) == ["done"]


def test_truncated_and_garbage_files_get_a_status_and_a_sentence(tmp_path, store, tiny):
    loras = tmp_path / "webui" / "models" / "Lora"
    good = put(tiny["lora"], loras / "good.safetensors")
    data = good.read_bytes()
    (loras / "cut.safetensors").write_bytes(data[:-1000])
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    (loras / "cut-in-header.safetensors").write_bytes(data[:header_end // 2])
    header = b'{"x": 1}'  # the prefix says 8 bytes of header; they are not a tensor table
    (loras / "garbage.safetensors").write_bytes(struct.pack("<Q", 8) + header + b"\0" * 64)
    add_root(store, tmp_path / "webui")
    report = scan(store, jobs=1)
    assert report.seen == 4
    entries = {e.name: e for e in list_entries(store, Filters())}
    assert entries["good"].status == "ok" and entries["good"].problem is None
    assert entries["cut"].status == "truncated"
    assert entries["cut"].problem == (
        f"is truncated: its tensor offsets need {len(data)} bytes but the file has "
        f"{len(data) - 1000} (1000 missing); download it again")
    cut_in_header = entries["cut-in-header"]
    assert cut_in_header.status == "truncated"
    assert cut_in_header.problem == (
        f"declares a {header_end - 8}-byte header but the file has only {header_end // 2} "
        "bytes (a truncated download, or not a safetensors file)")
    assert entries["garbage"].status == "invalid"
    assert entries["garbage"].problem
    assert entries["cut"].kind is None and entries["garbage"].kind is None
    assert sorted(p for p, _ in report.bad) == [str(loras / n) for n in (
        "cut-in-header.safetensors", "cut.safetensors", "garbage.safetensors")]


def test_text_file_saved_as_safetensors_is_invalid_not_truncated(tmp_path, store):
    loras = tmp_path / "webui" / "models" / "Lora"
    loras.mkdir(parents=True)
    # what a failed download often leaves: the site's HTML page under the model's name
    (loras / "page.safetensors").write_text("<!DOCTYPE html><html><body>Please log in</body>"
                                            "</html>\n" * 20)
    add_root(store, tmp_path / "webui")
    scan(store, jobs=1)
    assert find_entry(store, "page").status == "invalid"


def test_pickles_are_identified_from_their_contents_without_running_them(tmp_path, store, tiny):
    import torch
    from safetensors.torch import load_file

    webui_dir = tmp_path / "webui"
    checkpoints = webui_dir / "models" / "Stable-diffusion"
    checkpoints.mkdir(parents=True)
    torch.save(load_file(tiny["sd1"]), checkpoints / "old-model.ckpt")
    torch.save({"state_dict": load_file(tiny["sd1"])}, checkpoints / "lightning.ckpt")
    data = (checkpoints / "old-model.ckpt").read_bytes()
    (checkpoints / "cut.ckpt").write_bytes(data[: len(data) // 2])
    (checkpoints / "tiny.ckpt").write_bytes(b"abcdef")
    shutil.copy(tiny["sdxl"], checkpoints / "renamed.ckpt")  # a safetensors file, misnamed
    shutil.copy(tiny["sd1"], checkpoints / "base.safetensors")
    marker = tmp_path / "ran"

    class Evil:  # loaded unrestricted, it would run a command
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"model.diffusion_model.x": torch.zeros(1), "hook": Evil()},
               checkpoints / "evil.ckpt")
    embeddings = webui_dir / "embeddings"
    embeddings.mkdir()
    torch.save({"string_to_param": {"*": torch.zeros(2, 768)}}, embeddings / "easyneg.pt",
               _use_new_zipfile_serialization=False)  # a legacy pickle: not loaded
    site = webui_dir / "models" / "Lora" / "venv"
    site.mkdir(parents=True)
    (site / "distutils-precedence.pth").write_text("import _distutils_hack\n")
    add_root(store, webui_dir)
    scan(store, jobs=1)
    got = {e.name: (e.status, e.kind, e.architecture) for e in list_entries(store, Filters())}
    assert got == {
        "old-model": ("ok", "checkpoint", "sd1"), "lightning": ("ok", "checkpoint", "sd1"),
        "renamed": ("ok", "checkpoint", "sdxl"), "cut": ("truncated", None, None),
        "tiny": ("invalid", None, None), "evil": ("invalid", None, None),
        "easyneg": ("unchecked", None, None), "distutils-precedence": ("invalid", None, None),
        "base": ("ok", "checkpoint", "sd1")}
    assert not marker.exists()
    assert "would run code" in find_entry(store, "evil").problem
    assert find_entry(store, "distutils-precedence").problem == (
        "is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    assert find_entry(store, "easyneg").problem.startswith("a pickle in PyTorch's legacy format")
    assert find_entry(store, "old-model").parameters == find_entry(store, "base").parameters
    assert names(list_entries(store, Filters(kind="embedding"))) == ["easyneg"]
    assert names(list_entries(store, Filters(kind="checkpoint"))) == [
        "base", "lightning", "old-model", "renamed"]


def test_pickles_a_scan_called_ok_unread_are_read_again(tmp_path, store, tiny):
    import torch
    from safetensors.torch import load_file

    ckpt = tmp_path / "models" / "old.ckpt"
    ckpt.parent.mkdir()
    torch.save(load_file(tiny["sd1"]), ckpt)
    add_root(store, tmp_path / "models")
    scan(store, jobs=1)
    with store.write() as db:  # as scans recorded it before they read pickles
        db.execute("UPDATE files SET kind = 'pickle', architecture = NULL")
    assert scan(store, jobs=1).changed == 1
    assert (find_entry(store, "old").kind, find_entry(store, "old").architecture) == (
        "checkpoint", "sd1")


def test_broken_links_and_link_loops_are_reported_and_the_scan_goes_on(tmp_path, store, tiny):
    loras = tmp_path / "webui" / "models" / "Lora"
    put(tiny["lora"], loras / "real.safetensors")
    broken = loras / "broken.safetensors"
    broken.symlink_to(loras / "gone.safetensors")
    loop = loras / "sub" / "loop"
    loop.parent.mkdir()
    loop.symlink_to(loras)  # a folder linking back to its parent's parent
    (loras / "one.safetensors").symlink_to("two.safetensors")  # two links to each other
    (loras / "two.safetensors").symlink_to("one.safetensors")
    add_root(store, tmp_path / "webui")
    report = scan(store, jobs=1)
    assert (report.seen, report.new) == (1, 1)
    assert sorted(report.problems) == sorted([
        f"{broken}: a broken link; skipped",
        f"{loras / 'one.safetensors'}: a link loop; skipped",
        f"{loras / 'two.safetensors'}: a link loop; skipped",
        f"{loop}: links back to a folder already scanned (a link loop or a second link); "
        "walked once",
    ])
    assert names(list_entries(store, Filters())) == ["real"]


def test_names_that_are_not_utf8_are_reported_and_the_rest_is_scanned(tmp_path, store, tiny):
    odd = tmp_path / "odd"
    for i in range(9):
        put(tiny["emb"], odd / f"good{i}.safetensors")
    put(tiny["emb"], Path(os.fsdecode(bytes(odd) + b"/bad\xff.safetensors")))
    put(tiny["emb"], Path(os.fsdecode(bytes(odd) + b"/sub\xe9/inner.safetensors")))
    add_root(store, odd)
    report = scan(store, jobs=1)
    assert sorted(report.problems) == [
        f"{odd}/bad\\xff.safetensors: its name is not valid UTF-8; skipped (rename it to scan it)",
        f"{odd}/sub\\xe9: its name is not valid UTF-8; skipped (rename it to scan it)"]
    assert report.new == 9 and len(list_entries(store, Filters())) == 9
    assert scan(store, jobs=1).unchanged == 9
    with pytest.raises(UserError, match=r"sub\\xe9: its name is not valid UTF-8"):
        add_root(store, Path(os.fsdecode(bytes(odd) + b"/sub\xe9")))


def test_a_sidecar_with_half_a_surrogate_pair_costs_no_file_its_row(tmp_path, store, tiny):
    loras = tmp_path / "loras"
    put(tiny["lora"], loras / "a.safetensors")
    put(tiny["lora_xl"], loras / "b.safetensors")
    # valid JSON that Python reads as text no UTF-8 encoder takes
    (loras / "a.civitai.info").write_text('{"trainedWords": ["x\\udcff"], '
                                          '"model": {"name": "N\\ud800"}}')
    add_root(store, loras)
    report = scan(store, jobs=1)
    assert (report.new, report.problems) == (2, [])
    entry = find_entry(store, "a")
    assert (entry.trigger_words, entry.details["sidecar"]["model_name"]) == (["x\ufffd"],
                                                                            "N\ufffd")


def test_fifos_named_like_models_or_sidecars_are_skipped_not_waited_on(tmp_path, tiny):
    loras = tmp_path / "webui" / "models" / "Lora"
    put(tiny["lora"], loras / "real.safetensors")
    os.mkfifo(loras / "stuck.safetensors")
    os.mkfifo(loras / "real.civitai.info")
    catalog = tmp_path / "c.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    # a scan that opens a FIFO waits for a writer forever: the timeout turns that into a failure
    result = subprocess.run([sys.executable, "-m", "mergekit_sd.cli", "catalog", "add-root",
                             tmp_path / "webui", "--scan", "--catalog", catalog],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert f"{loras / 'stuck.safetensors'}: not a regular file" in out
    with Store.open(catalog) as opened:
        assert names(list_entries(opened, Filters())) == ["real"]


def test_json_nested_deeper_than_the_parser_goes_is_ignored_like_bad_json(tmp_path, store, tiny):
    folder = tmp_path / "models"
    put(tiny["sd1"], folder / "sidecar.safetensors")
    deep = "[" * 100_000 + "]" * 100_000
    (folder / "sidecar.civitai.info").write_text(deep)
    write_checkpoint(folder / "meta.safetensors", "sd1", seed=2,
                     metadata={"sd_merge_models": deep, "sd_merge_recipe": deep})
    add_root(store, folder)
    report = scan(store, jobs=1)
    assert report.new == 2
    assert {e.name: e.status for e in list_entries(store, Filters())} == {
        "meta": "ok", "sidecar": "ok"}


def test_deleted_file_becomes_missing_and_keeps_its_tags(tmp_path, store, tiny):
    files = webui(tmp_path / "webui", tiny)
    add_root(store, tmp_path / "webui")
    scan(store, jobs=1)
    entry = find_entry(store, "mychar")
    set_tags(store, entry, ["style", "keep"], [])
    set_note(store, entry, "the good one")
    files["mychar"].unlink()
    report = scan(store, jobs=1)
    assert (report.seen, report.missing, report.unchanged, report.moved) == (5, 1, 5, [])
    gone = get_entry(store, entry.id)
    assert (gone.status, gone.tags, gone.notes, gone.path) == (
        "missing", ["keep", "style"], "the good one", str(files["mychar"]))
    assert names(list_entries(store, Filters(status="missing"))) == ["mychar"]
    # back in place (an unplugged drive came back): the same entry is ok again
    put(tiny["lora"], files["mychar"])
    report = scan(store, jobs=1)
    assert (report.changed, report.missing) == (1, 0)
    back = get_entry(store, entry.id)
    assert (back.status, back.tags) == ("ok", ["keep", "style"])


def test_a_root_that_is_gone_marks_its_files_missing(tmp_path, store, tiny):
    webui(tmp_path / "drive" / "webui", tiny)
    add_root(store, tmp_path / "drive" / "webui")
    scan(store, jobs=1)
    set_tags(store, find_entry(store, "basexl"), ["best"], [])
    os.rename(tmp_path / "drive", tmp_path / "unplugged")
    report = scan(store, jobs=1)
    assert report.problems == [f"{tmp_path / 'drive' / 'webui'}: the root folder is not there "
                               "(an unplugged drive?); its files are marked missing"]
    assert (report.seen, report.missing) == (0, 6)
    assert names(list_entries(store, Filters(status="missing"))) == sorted(WEBUI_FILES)
    os.rename(tmp_path / "unplugged", tmp_path / "drive")
    report = scan(store, jobs=1)
    assert (report.changed, report.new, report.missing, report.problems) == (6, 0, 0, [])
    assert find_entry(store, "basexl").tags == ["best"]


def test_renamed_file_is_reported_moved_and_keeps_its_entry(tmp_path, store, tiny, monkeypatch):
    files = webui(tmp_path / "webui", tiny)
    add_root(store, tmp_path / "webui")
    scan(store, jobs=1)
    hash_pending(store)
    entry = find_entry(store, "mychar")
    set_tags(store, entry, ["style"], [])
    set_rating(store, entry, 4, True)
    renamed = files["mychar"].with_name("mychar-v2.safetensors")
    os.rename(files["mychar"], renamed)
    monkeypatch.setattr(scan_module, "examine", lambda p: pytest.fail(f"{p} was read again"))
    report = scan(store, jobs=1)
    assert report.moved == [(str(files["mychar"]), str(renamed))]
    assert (report.new, report.missing, report.changed, report.unchanged) == (0, 0, 0, 5)
    moved = get_entry(store, entry.id)
    assert (moved.name, moved.path, moved.status, moved.tags, moved.rating, moved.favourite) == (
        "mychar-v2", str(renamed), "ok", ["style"], 4, True)
    assert moved.sha256 == entry.sha256 and moved.kind == "lora"
    assert store.db.execute("SELECT count(*) FROM files").fetchone()[0] == 6
    assert hash_pending(store).hashed == 0  # the hashes still hold for the renamed file


def test_files_renamed_or_deleted_while_a_scan_runs_are_left_to_the_next_scan(tmp_path, store,
                                                                             tiny):
    files = webui(tmp_path / "webui", tiny)
    add_root(store, tmp_path / "webui")
    renamed = files["mychar"].with_name("renamed.safetensors")

    def meanwhile(stage: str, done: int, total: int) -> None:
        if (stage, done) == ("identifying", 0):  # walked, not read yet
            os.rename(files["mychar"], renamed)
            files["vae"].unlink()

    report = scan(store, jobs=1, progress=meanwhile)
    assert (report.new, report.bad) == (4, [])
    assert report.problems == ["2 file(s) were renamed or deleted while the scan ran; the next "
                               "scan records where they went"]
    assert names(list_entries(store, Filters())) == ["base15", "basexl", "emb", "xlstyle"]
    report = scan(store, jobs=1)
    assert (report.new, report.missing, report.problems) == (1, 0, [])
    entry = find_entry(store, "renamed")
    assert (entry.status, entry.kind) == ("ok", "lora")


def test_an_entry_a_scan_got_wrong_is_read_again_in_place_or_moved(tmp_path, store, tiny):
    """What a scan recorded of a file that vanished while it ran, before such files were left
    to the next scan: "invalid: does not exist", for a file that is there."""
    files = webui(tmp_path / "webui", tiny)
    add_root(store, tmp_path / "webui")
    scan(store, jobs=1)
    with store.write() as db:
        db.execute("UPDATE files SET status = 'invalid', problem = 'does not exist', kind = NULL "
                   "WHERE name IN ('mychar', 'vae')")
    renamed = files["mychar"].with_name("renamed.safetensors")
    os.rename(files["mychar"], renamed)
    report = scan(store, jobs=1)
    assert report.moved == [(str(files["mychar"]), str(renamed))]
    assert [(e.name, e.status, e.kind) for e in (find_entry(store, n) for n in (
        "renamed", "vae"))] == [("renamed", "ok", "lora"), ("vae", "ok", "vae")]


def test_file_moved_to_another_disk_takes_over_its_entry_once_hashed(tmp_path, store, tiny):
    files = webui(tmp_path / "webui", tiny)
    other = tmp_path / "other-disk"
    other.mkdir()
    add_root(store, tmp_path / "webui")
    add_root(store, other)
    scan(store, jobs=1)
    hash_pending(store)
    old = find_entry(store, "mychar")
    set_tags(store, old, ["style"], [])
    set_note(store, old, "from civitai")
    set_rating(store, old, 5, True)
    copy = put(files["mychar"], other / "mychar.safetensors")  # a copy has a new inode
    files["mychar"].unlink()
    report = scan(store, jobs=1)
    assert (report.new, report.missing, report.moved) == (1, 1, [])
    # annotated before it was hashed: both entries' data is kept
    set_tags(store, find_entry(store, str(copy)), ["new"], [])
    set_note(store, find_entry(store, str(copy)), "copied")
    hashed = hash_pending(store)
    assert hashed.moved == [(str(files["mychar"]), str(copy))]
    assert hashed.hashed == 1
    new = find_entry(store, "mychar")
    assert (new.path, new.status, new.tags, new.notes, new.rating, new.favourite) == (
        str(copy), "ok", ["new", "style"], "from civitai\ncopied", 5, True)
    assert new.id != old.id and new.sha256 == old.sha256
    assert store.db.execute("SELECT count(*) FROM files WHERE path = ?",
                            (str(files["mychar"]),)).fetchone()[0] == 0
    assert store.db.execute("SELECT count(*) FROM tags WHERE file_id = ?",
                            (old.id,)).fetchone()[0] == 0


def test_an_unplugged_backup_drive_keeps_its_entries_and_data(tmp_path, store, tiny):
    internal = put(tiny["sd1"], tmp_path / "internal" / "model.safetensors")
    backup = put(tiny["sd1"], tmp_path / "external" / "model-backup.safetensors")
    add_root(store, tmp_path / "internal")
    add_root(store, tmp_path / "external")
    scan(store, jobs=1)
    hash_pending(store)
    model, copy = find_entry(store, "model"), find_entry(store, "model-backup")
    set_note(store, model, "internal: use at cfg 5")
    set_note(store, copy, "backup: archive copy")
    set_tags(store, copy, ["archive"], [])
    os.rename(tmp_path / "external", tmp_path / "unplugged")
    report = scan(store, jobs=1)
    assert (report.moved, report.missing) == ([], 1)
    assert names(list_entries(store, Filters(status="missing"))) == ["model-backup"]
    # a copy of the model hashed meanwhile is not the unplugged file moved
    put(internal, tmp_path / "internal" / "model-copy.safetensors")
    scan(store, jobs=1)
    assert hash_pending(store).moved == []
    os.rename(tmp_path / "unplugged", tmp_path / "external")
    scan(store, jobs=1)
    back, model = find_entry(store, str(backup)), find_entry(store, "model")
    assert (back.id, back.status, back.tags, back.notes) == (
        copy.id, "ok", ["archive"], "backup: archive copy")
    assert (model.tags, model.notes) == ([], "internal: use at cfg 5")


def test_deleting_one_of_two_copies_keeps_its_entry_until_it_is_restored(tmp_path, store, tiny):
    first = put(tiny["sd1"], tmp_path / "sw" / "c.safetensors")
    second = put(tiny["sd1"], tmp_path / "sw" / "c2.safetensors")
    add_root(store, tmp_path / "sw")
    scan(store, jobs=1)
    hash_pending(store)
    c = find_entry(store, "c")
    set_tags(store, c, ["keeper"], [])
    set_note(store, c, "the one I use")
    set_note(store, find_entry(store, "c2"), "scratch copy")
    trash = tmp_path / "trash"
    trash.mkdir()
    os.rename(first, trash / first.name)  # another disk's trash would be a copy: the same here
    report = scan(store, jobs=1)
    assert (report.moved, report.missing) == ([], 1)
    assert hash_pending(store).moved == []
    assert (find_entry(store, "c2").notes, find_entry(store, "c2").tags) == ("scratch copy", [])
    os.rename(trash / first.name, first)
    scan(store, jobs=1)
    back = find_entry(store, str(first))
    assert (back.id, back.status, back.tags, back.notes) == (c.id, "ok", ["keeper"],
                                                             "the one I use")
    assert find_entry(store, str(second)).notes == "scratch copy"


def test_move_found_when_the_new_disk_is_scanned_first(tmp_path, store, tiny):
    files = webui(tmp_path / "webui", tiny)
    other = tmp_path / "other-disk"
    other.mkdir()
    old_root, _ = add_root(store, tmp_path / "webui")
    new_root, _ = add_root(store, other)
    scan(store, jobs=1)
    hash_pending(store)
    set_tags(store, find_entry(store, "mychar"), ["style"], [])
    copy = put(files["mychar"], other / "mychar.safetensors")
    files["mychar"].unlink()
    # `catalog scan OTHER-DISK --hash`, later `catalog scan --hash`
    scan(store, root_ids=[new_root], jobs=1)
    hash_pending(store, root_ids=[new_root])
    scan(store, jobs=1)
    hash_pending(store)
    assert find_entry(store, str(copy)).tags == ["style"]
    assert store.db.execute("SELECT count(*) FROM files WHERE path = ?",
                            (str(files["mychar"]),)).fetchone()[0] == 0


def test_nested_roots_rescan_reads_nothing(tmp_path, store, tiny, monkeypatch):
    webui(tmp_path / "webui", tiny)
    add_root(store, tmp_path / "webui")
    add_root(store, tmp_path / "webui" / "models" / "Lora")
    scan(store, jobs=1)
    scan(store, jobs=1)
    no_reading(monkeypatch)
    report = scan(store, jobs=1)
    assert (report.new, report.changed) == (0, 0)


def test_a_root_inside_another_counts_its_files_once_and_hashes_them_when_named(tmp_path,
                                                                                 tiny):
    catalog = tmp_path / "c.sqlite"
    webui(tmp_path / "webui", tiny)
    put(tiny["lora_xl"], tmp_path / "webui" / "models" / "Lora" / "second.safetensors")
    inner = tmp_path / "webui" / "models" / "Lora"
    with Store.open(catalog) as store:
        add_root(store, tmp_path / "webui")
        inner_id, _ = add_root(store, inner)
        report = scan(store, jobs=1)
        assert (report.seen, report.new, report.unchanged) == (7, 7, 0)
        report = scan(store, root_ids=[inner_id], jobs=1)
        assert (report.seen, report.new, report.unchanged) == (2, 0, 2)
        hashed = hash_pending(store, root_ids=[inner_id])
        assert hashed.hashed == 2
        assert {e.name for e in list_entries(store, Filters()) if e.sha256} == {"mychar",
                                                                                "second"}
        # the inner root's file vanishes: a scan of the inner root alone marks it missing
        (inner / "second.safetensors").unlink()
        assert scan(store, root_ids=[inner_id], jobs=1).missing == 1
    assert catalog_cli(catalog, "roots").stdout.splitlines() == [
        f"#1 {tmp_path / 'webui'} (a1111, 7 files)", f"#2 {inner} (plain, 2 files)"]


def test_add_root_notes_the_folders_a_root_shares_with_the_root_around_it(tmp_path, tiny):
    catalog = tmp_path / "c.sqlite"
    root = tmp_path / "webui"
    webui(root, tiny)
    put(tiny["sd1"], root / "merges" / "mix.safetensors")
    catalog_cli(catalog, "add-root", root)
    # a web UI root scans its model folders only: its merges folder is no folder of it
    beside = catalog_cli(catalog, "add-root", root / "merges")
    assert beside.returncode == 0 and "note:" not in beside.stdout, beside.stdout
    assert json.loads(catalog_cli(catalog, "scan", root, "--json").stdout)["scan"]["seen"] == (
        len(WEBUI_FILES))
    # a root around some of its model folders shares those
    models = catalog_cli(catalog, "add-root", root / "models")
    shared = ", ".join(str(root / "models" / f) for f in ("Stable-diffusion", "Lora", "LyCORIS",
                                                           "VAE"))
    assert models.stdout.splitlines()[-1] == (
        f"note: inside root #1 {root}; the files under {shared} are found by scans of either "
        "root and catalogued once")


def test_a_folder_reached_through_a_link_is_one_root_and_its_files_one_entry_each(tmp_path,
                                                                                  tiny):
    catalog = tmp_path / "c.sqlite"
    files = webui(tmp_path / "webui", tiny)
    link = tmp_path / "webui-link"
    link.symlink_to(tmp_path / "webui")
    added = catalog_cli(catalog, "add-root", link, "--scan")
    assert added.stdout.startswith(f"root #1: {link} -> {tmp_path / 'webui'} (a1111 layout)\n")
    again = catalog_cli(catalog, "add-root", tmp_path / "webui")
    assert again.stdout.startswith(f"root #1: {tmp_path / 'webui'} (a1111 layout), already a "
                                   "root\n"), again.stdout
    inner = catalog_cli(catalog, "add-root", link / "models" / "Lora")
    assert (f"note: inside root #1 {tmp_path / 'webui'}; the files under "
            f"{tmp_path / 'webui' / 'models' / 'Lora'} are found by scans of either root and "
            "catalogued once\n" in inner.stdout), inner.stdout
    catalog_cli(catalog, "scan", link, "--hash")
    with Store.open(catalog) as store:
        assert len(list_entries(store, Filters())) == len(WEBUI_FILES)
        assert find_duplicates(store) == []
        entry = find_entry(store, str(files["vae"]))
        assert entry.path == str(files["vae"])
        assert find_entry(store, str(link / "models" / "VAE" / "vae.safetensors")).id == entry.id
    shown = catalog_cli(catalog, "show", link / "models" / "VAE" / "vae.safetensors", "--json")
    assert json.loads(shown.stdout)["id"] == entry.id


def test_folders_linked_into_a_web_ui_are_catalogued_once(tmp_path, store, tiny):
    """Stability Matrix: a package's models/Lora and models/Stable-diffusion are links to the
    shared Data/Models folders, and both are roots."""
    data = tmp_path / "Data" / "Models"
    put(tiny["lora"], data / "Lora" / "mychar.safetensors")
    put(tiny["sd1"], data / "StableDiffusion" / "base.safetensors")
    package = tmp_path / "Data" / "Packages" / "Forge"
    (package / "models").mkdir(parents=True)
    (package / "models" / "Lora").symlink_to(data / "Lora")
    (package / "models" / "Stable-diffusion").symlink_to(data / "StableDiffusion")
    # a file linked on its own, and a second link to a linked file
    (package / "models" / "Lora" / "alias.safetensors").symlink_to(data / "Lora" /
                                                                   "mychar.safetensors")
    add_root(store, data)
    add_root(store, package)
    report = scan(store, jobs=1)
    assert (report.seen, report.new) == (2, 2)
    listed = {e.path: e.folder_kind for e in list_entries(store, Filters())}
    assert listed == {str(data / "Lora" / "mychar.safetensors"): None,
                      str(data / "StableDiffusion" / "base.safetensors"): None}
    assert scan(store, jobs=1).unchanged == 2


def test_entries_recorded_under_a_link_move_to_the_real_path_with_their_data(tmp_path, store,
                                                                             tiny):
    """A catalog from before files were recorded by their real paths."""
    webui(tmp_path / "webui", tiny)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "webui")
    add_root(store, tmp_path / "webui")
    scan(store, jobs=1)
    with store.write() as db:
        db.execute("UPDATE files SET path = replace(path, ?, ?)",
                   (str(tmp_path / "webui"), str(link)))
        db.execute("UPDATE roots SET path = ?", (str(link),))
    entry = find_entry(store, "mychar")
    assert entry.path.startswith(str(link))
    set_tags(store, entry, ["keep"], [])
    report = scan(store, jobs=1)
    assert (report.new, report.moved, report.unchanged) == (0, [], len(WEBUI_FILES))
    moved = get_entry(store, entry.id)
    assert (moved.path, moved.tags) == (str(tmp_path / "webui" / "models" / "Lora" /
                                             "mychar.safetensors"), ["keep"])
    assert len(list_entries(store, Filters())) == len(WEBUI_FILES)
    assert add_root(store, tmp_path / "webui")[0] == 1


# --- the process pool ------------------------------------------------------------------------

COMPARED = ("path, folder_kind, name, status, problem, device, inode, size, mtime_ns, kind, "
            "architecture, base_model, label, layout, dtype, parameters, lora_format, lora_rank, "
            "trigger_words, details, sidecars, source, source_ids, preview")


def test_many_new_files_scan_in_worker_processes_with_the_same_result(tmp_path, tiny,
                                                                      monkeypatch):
    loras = tmp_path / "loras"
    count = 60
    assert count > PARALLEL_MIN
    for i in range(count - 1):
        put(tiny["lora"], loras / f"lora{i:02d}.safetensors")
    (loras / "lora59.safetensors").write_bytes(tiny["lora"].read_bytes()[:-10])
    (loras / "lora00.json").write_text(json.dumps({"activation text": "abc"}))

    def refuse(*args, **kwargs):
        raise AssertionError("jobs=1 must identify in-process")

    pools = []

    class Recording(ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(args)
            super().__init__(*args, **kwargs)

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one usable core: a scan never starts worker processes")
    results = []
    for jobs in (1, 2):
        monkeypatch.setattr(scan_module, "ProcessPoolExecutor", refuse if jobs == 1 else Recording)
        with Store.open(tmp_path / f"jobs{jobs}.sqlite") as store:
            add_root(store, loras)
            report = scan(store, jobs=jobs)
            assert (report.new, len(report.bad)) == (count, 1)
            results.append([tuple(r) for r in store.db.execute(
                f"SELECT {COMPARED} FROM files ORDER BY path")])
        assert len(pools) == jobs - 1  # the pool was started for jobs=2 only
    assert len(results[0]) == count
    assert results[0] == results[1]
    statuses = [row[3] for row in results[1]]
    assert statuses == ["ok"] * (count - 1) + ["truncated"]


def test_scan_jobs_are_checked_and_capped_at_the_usable_cores(tmp_path, tiny, monkeypatch):
    for i in range(PARALLEL_MIN + 2):
        put(tiny["emb"], tmp_path / "embs" / f"e{i}.safetensors")
    pools = []

    class Recording(ProcessPoolExecutor):
        def __init__(self, workers, *args, **kwargs):
            pools.append(workers)
            super().__init__(workers, *args, **kwargs)

    monkeypatch.setattr(scan_module, "ProcessPoolExecutor", Recording)
    catalog = tmp_path / "c.sqlite"
    with Store.open(catalog) as store:
        add_root(store, tmp_path / "embs")
        assert scan(store, jobs=10_000).new == PARALLEL_MIN + 2  # not a process per file
    cores = len(os.sched_getaffinity(0))
    assert pools == ([cores] if cores > 1 else [])
    for jobs in ("0", "-3"):
        assert one_line_error(catalog_cli(catalog, "scan", "--jobs", jobs)) == (
            f"error: --jobs {jobs}: give 1 or more (leave it out for one per core, up to 8)")


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (the fork server's workers are grandchildren)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_ctrl_c_on_a_scan_says_what_the_catalog_keeps_and_to_scan_again(tmp_path, tiny,
                                                                         monkeypatch, capsys):
    from mergekit_sd.cli import main

    catalog = tmp_path / "c.sqlite"
    webui(tmp_path / "webui", tiny)
    catalog_cli(catalog, "add-root", tmp_path / "webui")

    def ctrl_c(path):  # the user's Ctrl-C, while the scan reads a file
        raise KeyboardInterrupt

    monkeypatch.setattr(scan_module, "examine", ctrl_c)
    monkeypatch.setattr(sys, "argv", ["mergekit-sd", "catalog", "scan", "--catalog",
                                      str(catalog)])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        "interrupted: the catalog keeps what the scan recorded so far; run the scan again to "
        "finish")
    monkeypatch.undo()
    again = json.loads(catalog_cli(catalog, "scan", "--json").stdout)["scan"]
    assert again["seen"] == len(WEBUI_FILES) and again["new"] + again["unchanged"] == again["seen"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_a_killed_scan_leaves_no_worker_process_and_no_open_pipe(tmp_path, tiny):
    paths = [str(put(tiny["emb"], tmp_path / "embs" / f"e{i}.safetensors"))
             for i in range(PARALLEL_MIN + 2)]
    # a scan killed between two results: its pool's workers are started and idle
    script = textwrap.dedent(f"""\
        import time
        from catalog.scan import examine_files
        results = examine_files({paths!r}, 2)
        next(results)
        print("identifying", flush=True)
        time.sleep(300)
        """)
    scanning = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    workers = []
    try:
        assert scanning.stdout.readline() == b"identifying\n"
        workers = _descendants(scanning.pid)
        assert len(workers) >= 3  # resource tracker, fork server, workers
        scanning.kill()
        scanning.wait()
        # the killed command's stdout ends: nothing holds it open any more
        ready, _, _ = select.select([scanning.stdout], [], [], 20)
        assert ready and scanning.stdout.read() == b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in workers):
            time.sleep(0.1)
        assert [p for p in workers if Path(f"/proc/{p}").exists()] == []
    finally:
        scanning.kill()
        for pid in workers:  # what a failing run would leave behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        scanning.stdout.close()


# --- sidecars --------------------------------------------------------------------------------

CIVITAI = {"id": 123, "modelId": 45, "name": "v1.0", "baseModel": "Pony",
           "trainedWords": ["mychar"],
           "model": {"name": "My Char", "type": "LORA", "nsfw": False},
           "files": [{"name": "mychar.safetensors", "type": "Model", "primary": True}]}
A1111 = {"description": "", "sd version": "SDXL", "activation text": "foo, bar",
         "preferred weight": 0.8, "notes": "n"}
STABILITY = {"ModelName": "SM Char", "VersionName": "sm-v2", "ModelId": 1, "VersionId": 2,
             "BaseModel": "Illustrious", "TrainedWords": ["x"]}


def sidecar_library(tmp_path: Path, tiny) -> Path:
    """Four copies of one SD1 LoRA: header only, + AUTOMATIC1111's json, + Stability Matrix's,
    + Civitai's (and a preview)."""
    loras = tmp_path / "webui" / "models" / "Lora"
    layers = {"header": {}, "a1111": {".json": A1111},
              "matrix": {".json": A1111, ".cm-info.json": STABILITY},
              "civitai": {".json": A1111, ".cm-info.json": STABILITY, ".civitai.info": CIVITAI}}
    for name, sidecars in layers.items():
        put(tiny["lora"], loras / f"{name}.safetensors")
        for suffix, doc in sidecars.items():
            (loras / f"{name}{suffix}").write_text(json.dumps(doc))
    (loras / "civitai.preview.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return loras


def test_sidecars_give_base_model_trigger_words_and_source_in_order(tmp_path, store, tiny):
    loras = sidecar_library(tmp_path, tiny)
    add_root(store, tmp_path / "webui")
    assert scan(store, jobs=1).new == 4
    got = {e.name: (e.base_model, e.trigger_words, e.source, e.source_ids, e.preview)
           for e in (find_entry(store, n) for n in ("header", "a1111", "matrix", "civitai"))}
    assert got == {
        "header": ("SD 1.5", ["mychar", "1girl", "solo"], "local", {}, None),
        "a1111": ("SDXL 1.0", ["foo", "bar"], "local", {}, None),
        "matrix": ("Illustrious", ["x"], "civitai",
                   {"civitai": {"model_id": 1, "version_id": 2}}, None),
        "civitai": ("Pony", ["mychar"], "civitai",
                    {"civitai": {"model_id": 45, "version_id": 123}},
                    str(loras / "civitai.preview.png")),
    }
    civitai = find_entry(store, "civitai")
    assert civitai.architecture == "sd1"  # the weights still say what they are
    sidecar = civitai.details["sidecar"]
    assert (sidecar["model_name"], sidecar["version_name"], sidecar["preferred_weight"],
            sidecar["notes"], sidecar["nsfw"]) == ("My Char", "v1.0", 0.8, "n", False)
    assert sorted(sidecar["read"]) == ["civitai.civitai.info", "civitai.cm-info.json",
                                       "civitai.json"]
    assert civitai.details["header"]["base_model"] == "SD 1.5"


def test_an_edited_sidecar_is_read_without_reading_the_model(tmp_path, store, tiny, monkeypatch):
    loras = sidecar_library(tmp_path, tiny)
    add_root(store, tmp_path / "webui")
    scan(store, jobs=1)
    (loras / "civitai.civitai.info").write_text(json.dumps(
        {**CIVITAI, "baseModel": "NoobAI", "trainedWords": ["newword"]}))
    (loras / "header.json").write_text(json.dumps({"activation text": "added later"}))
    monkeypatch.setattr(scan_module, "examine", lambda p: pytest.fail(f"{p} was read again"))
    report = scan(store, jobs=1)
    assert (report.new, report.changed, report.unchanged) == (0, 0, 4)
    civitai = find_entry(store, "civitai")
    assert (civitai.base_model, civitai.trigger_words) == ("NoobAI", ["newword"])
    assert civitai.source_ids == {"civitai": {"model_id": 45, "version_id": 123}}
    header = find_entry(store, "header")
    assert (header.base_model, header.trigger_words) == ("SD 1.5", ["added later"])


def test_a_corrupt_sidecar_is_reported_and_ignored(tmp_path, store, tiny):
    loras = tmp_path / "webui" / "models" / "Lora"
    put(tiny["lora"], loras / "broken.safetensors")
    put(tiny["lora"], loras / "fine.safetensors")
    bad = loras / "broken.civitai.info"
    bad.write_text('{"id": 123, "baseModel": "Pony"')
    (loras / "broken.cm-info.json").write_text("[1, 2]")
    add_root(store, tmp_path / "webui")
    report = scan(store, jobs=1)
    assert (report.new, report.bad) == (2, [])
    entry = find_entry(store, "broken")
    assert (entry.status, entry.base_model, entry.source) == ("ok", "SD 1.5", "local")
    expected = [
        f"{bad}: not readable as JSON (JSONDecodeError); ignored",
        f"{loras / 'broken.cm-info.json'}: expected a JSON object; ignored",
    ]
    assert sorted(entry.details["sidecar"]["problems"]) == expected
    assert sorted(report.problems) == expected  # the scan says so, not only `catalog show`
    # a sidecar that goes bad later, the model untouched: the rescan that re-reads it says so
    (loras / "fine.json").write_text("{nope")
    report = scan(store, jobs=1)
    assert report.unchanged == 2
    assert report.problems == [f"{loras / 'fine.json'}: not readable as JSON "
                               "(JSONDecodeError); ignored"]


def test_written_civitai_info_and_preview_are_read_by_the_next_scan(tmp_path, store, tiny):
    loras = tmp_path / "webui" / "models" / "Lora"
    model = put(tiny["lora"], loras / "mychar.safetensors")
    add_root(store, tmp_path / "webui")
    scan(store, jobs=1)
    info = write_civitai_info(model, CIVITAI)
    preview = write_preview(model, b"\x89PNG\r\n\x1a\npreview")
    assert (info, preview) == (loras / "mychar.civitai.info", loras / "mychar.preview.png")
    assert json.loads(info.read_text(encoding="utf-8")) == CIVITAI
    assert preview.read_bytes() == b"\x89PNG\r\n\x1a\npreview"
    assert sorted(p.name for p in loras.iterdir()) == [
        "mychar.civitai.info", "mychar.preview.png", "mychar.safetensors"]
    report = scan(store, jobs=1)
    assert (report.unchanged, report.partial) == (1, 0)
    entry = find_entry(store, "mychar")
    assert (entry.base_model, entry.trigger_words, entry.preview, entry.source) == (
        "Pony", ["mychar"], str(preview), "civitai")
    assert entry.source_ids == {"civitai": {"model_id": 45, "version_id": 123}}


def civitai_info_for(sha256: str) -> dict:
    """CIVITAI, listing one file with this SHA256 (upper case, as Civitai writes it)."""
    return {**CIVITAI, "files": [{**CIVITAI["files"][0], "hashes": {"SHA256": sha256.upper()}}]}


def test_a_civitai_info_of_another_file_gives_nothing_once_the_file_is_hashed(tmp_path, store,
                                                                             tiny):
    """A model replaced under the same name (a newer download, or `rm --delete-file` and then
    another file) keeps the old `.civitai.info`: it names another file's version and base."""
    loras = tmp_path / "webui" / "models" / "Lora"
    model = put(tiny["lora"], loras / "mychar.safetensors")
    mine, other = hash_file(model).sha256, "ab" * 32
    info = loras / "mychar.civitai.info"
    info.write_text(json.dumps(civitai_info_for(other)))
    add_root(store, tmp_path / "webui")
    scan(store, jobs=1)
    entry = find_entry(store, "mychar")
    assert (entry.source, entry.base_model) == ("civitai", "Pony")  # trusted until hashed
    stale = (f"{info}: describes another file (SHA256 {other[:12]}..., not this file's "
             f"{mine[:12]}...); ignored: delete it, or look the file up with `mergekit-sd "
             "catalog identify`")
    assert hash_pending(store).problems == [stale]
    entry = find_entry(store, "mychar")
    assert (entry.source, entry.source_ids, entry.base_model, entry.trigger_words) == (
        "local", {}, "SD 1.5", ["mychar", "1girl", "solo"])
    assert "model_name" not in entry.details["sidecar"]
    assert entry.details["sidecar"]["problems"] == [stale]
    # a stale sidecar appearing beside a hashed file is refused by the scan that reads it
    info.write_text(json.dumps({**civitai_info_for(other), "id": 124}))
    assert scan(store, jobs=1).problems == [stale]
    assert find_entry(store, "mychar").source_ids == {}
    # the file's own sidecar is taken
    info.write_text(json.dumps(civitai_info_for(mine)))
    assert scan(store, jobs=1).problems == []
    entry = find_entry(store, "mychar")
    assert (entry.source, entry.base_model) == ("civitai", "Pony")
    assert entry.source_ids == {"civitai": {"model_id": 45, "version_id": 123}}


def test_sidecars_a_catalog_read_before_hashes_were_compared_are_read_again(tmp_path, store,
                                                                            tiny):
    loras = tmp_path / "webui" / "models" / "Lora"
    put(tiny["lora"], loras / "mychar.safetensors")
    (loras / "mychar.civitai.info").write_text(json.dumps(civitai_info_for("ab" * 32)))
    add_root(store, tmp_path / "webui")
    scan(store, jobs=1)
    hash_pending(store)
    with store.write() as db:  # as an older version left it: the ids taken, the hashes unseen
        db.execute("UPDATE files SET source = 'civitai', source_ids = ?, details = "
                   "json_remove(details, '$.sidecar.problems'), sidecars = "
                   "substr(sidecars, instr(sidecars, '|') + 1)",
                   (json.dumps({"civitai": {"model_id": 45, "version_id": 123}}),))
    assert "describes another file" in scan(store, jobs=1).problems[0]
    assert find_entry(store, "mychar").source_ids == {}


def matrix_for(sha256: str | None) -> dict:
    """STABILITY as Stability Matrix writes it for a file: its Civitai hashes in `Hashes`
    (upper case); None: an older one, with none."""
    if sha256 is None:
        return STABILITY
    return {**STABILITY, "Hashes": {"SHA256": sha256.upper(), "CRC32": "0A1B2C3D",
                                    "BLAKE3": "B" * 64}}


def test_a_cm_info_of_another_file_gives_nothing_once_the_file_is_hashed(tmp_path, store, tiny):
    """Stability Matrix's `.cm-info.json` left by the file that had this name names its SHA256:
    once the file is hashed, its ids, names and base model are not this file's."""
    loras = tmp_path / "webui" / "models" / "Lora"
    model = put(tiny["lora"], loras / "sm.safetensors")
    mine, other = hash_file(model).sha256, "cd" * 32
    sidecar = loras / "sm.cm-info.json"
    sidecar.write_text(json.dumps(matrix_for(other)))
    add_root(store, tmp_path / "webui")
    scan(store, jobs=1)
    entry = find_entry(store, "sm")
    assert (entry.source, entry.base_model) == ("civitai", "Illustrious")  # trusted until hashed
    stale = (f"{sidecar}: describes another file (SHA256 {other[:12]}..., not this file's "
             f"{mine[:12]}...); ignored: delete it, or look the file up with `mergekit-sd "
             "catalog identify`")
    assert hash_pending(store).problems == [stale]
    entry = find_entry(store, "sm")
    assert (entry.source, entry.source_ids, entry.base_model, entry.trigger_words) == (
        "local", {}, "SD 1.5", ["mychar", "1girl", "solo"])
    assert "model_name" not in entry.details["sidecar"]
    assert "sm.cm-info.json" not in entry.details["sidecar"].get("read", [])
    assert entry.details["sidecar"]["problems"] == [stale]
    # one appearing beside a hashed file is refused by the scan that reads it
    sidecar.write_text(json.dumps({**matrix_for(other), "VersionId": 3}))
    assert scan(store, jobs=1).problems == [stale]
    assert find_entry(store, "sm").source_ids == {}
    # the file's own is taken; so is one with no hash, which cannot be checked
    for doc in (matrix_for(mine), matrix_for(None)):
        sidecar.write_text(json.dumps(doc) + " " * len(sidecar.read_text()))  # another size
        assert scan(store, jobs=1).problems == []
        entry = find_entry(store, "sm")
        assert (entry.source, entry.base_model) == ("civitai", "Illustrious")
        assert entry.source_ids == {"civitai": {"model_id": 1, "version_id": 2}}


def test_a_stale_cm_info_takes_no_ids_a_civitai_info_of_the_file_gives(tmp_path, store, tiny):
    """Another file of the same version left its `.cm-info.json`: the version is still this
    file's, by its own `.civitai.info`."""
    loras = tmp_path / "webui" / "models" / "Lora"
    model = put(tiny["lora"], loras / "both.safetensors")
    (loras / "both.cm-info.json").write_text(json.dumps(
        {**matrix_for("cd" * 32), "ModelId": 45, "VersionId": 123}))
    (loras / "both.civitai.info").write_text(json.dumps(civitai_info_for(
        hash_file(model).sha256)))
    add_root(store, tmp_path / "webui")
    scan(store, jobs=1)
    assert "describes another file" in hash_pending(store).problems[0]
    entry = find_entry(store, "both")
    assert (entry.source, entry.base_model) == ("civitai", "Pony")
    assert entry.source_ids == {"civitai": {"model_id": 45, "version_id": 123}}


def test_cm_info_a_catalog_read_before_its_hash_was_compared_is_read_again(tmp_path, store,
                                                                           tiny):
    loras = tmp_path / "webui" / "models" / "Lora"
    put(tiny["lora"], loras / "sm.safetensors")
    (loras / "sm.cm-info.json").write_text(json.dumps(matrix_for("cd" * 32)))
    add_root(store, tmp_path / "webui")
    scan(store, jobs=1)
    hash_pending(store)
    with store.write() as db:  # as the version before left it: the ids taken, the hash unseen
        db.execute("UPDATE files SET source = 'civitai', source_ids = ?, details = "
                   "json_remove(details, '$.sidecar.problems'), sidecars = "
                   "'2' || substr(sidecars, instr(sidecars, '|'))",
                   (json.dumps({"civitai": {"model_id": 1, "version_id": 2}}),))
    assert "describes another file" in scan(store, jobs=1).problems[0]
    assert find_entry(store, "sm").source_ids == {}


# --- finding and listing ---------------------------------------------------------------------


@pytest.fixture
def library(tmp_path, store, tiny):
    """The webui folder scanned and hashed, with tags, a note and a favourite."""
    files = webui(tmp_path / "webui", tiny)
    add_root(store, tmp_path / "webui")
    scan(store, jobs=1)
    hash_pending(store)
    set_tags(store, find_entry(store, "mychar"), ["style", "anime"], [])
    set_tags(store, find_entry(store, "xlstyle"), ["style"], [])
    set_note(store, find_entry(store, "base15"), "Great for portraits")
    set_rating(store, find_entry(store, "basexl"), 5, True)
    return SimpleNamespace(store=store, files=files, root=tmp_path / "webui")


def test_find_entry_by_every_kind_of_reference(library):
    store, files = library.store, library.files
    entry = find_entry(store, "mychar")
    assert entry.path == str(files["mychar"]) and len(entry.sha256) == 64
    for ref in (f"#{entry.id}", str(entry.id), "mychar", "MyChar", "catalog:mychar",
                f"sha256:{entry.sha256[:10]}", f"sha256:{entry.sha256.upper()}",
                f"autov3:{entry.autov3[:12]}", str(files["mychar"]), "  mychar  "):
        assert find_entry(store, ref).id == entry.id, ref


def test_find_entry_says_which_entries_an_ambiguous_name_matches(tmp_path, store, tiny):
    first = put(tiny["lora"], tmp_path / "loras" / "a" / "twin.safetensors")
    second = put(tiny["lora_xl"], tmp_path / "loras" / "b" / "twin.safetensors")
    add_root(store, tmp_path / "loras")
    scan(store, jobs=1)
    with pytest.raises(UserError) as error:
        find_entry(store, "twin")
    assert str(error.value) == (f"'twin' matches 2 entries (#1 {first}; #2 {second}); use the "
                                "#id or a longer hash")
    assert find_entry(store, "#2").path == str(second)
    assert find_entry(store, str(first)).id == 1


def test_find_entry_of_something_unknown_is_a_user_error(library):
    for ref in ("nope", "catalog:nope", "#999", "sha256:0000000000", str(library.root / "x")):
        with pytest.raises(UserError, match="no catalog entry matches"):
            find_entry(library.store, ref)
    with pytest.raises(UserError, match="at least 10 hex digits"):
        find_entry(library.store, "sha256:abc")
    with pytest.raises(UserError, match="at least 10 hex digits"):
        find_entry(library.store, "sha256:xyzxyzxyzxyz")


def test_refs_of_digits_that_are_no_id_are_unmatched_names_not_crashes(library):
    # past SQLite's 64-bit integers, and digits int() refuses or reads as another number
    third = find_entry(library.store, "#3")
    for ref in ("99999999999999999999999", "#99999999999999999999999", "²", "#²", "#٣"):
        with pytest.raises(UserError, match="no catalog entry matches"):
            find_entry(library.store, ref)
    # a file named with such digits is found by its name
    put(library.files["vae"], library.root / "models" / "VAE" / "٣.safetensors")
    scan(library.store, jobs=1)
    assert find_entry(library.store, "٣").id not in (third.id, None)


def test_cli_show_of_an_impossible_id_is_one_line(tmp_path):
    catalog = tmp_path / "c.sqlite"
    Store.open(catalog).close()
    for ref in ("99999999999999999999999", "#²"):
        assert f"{ref!r}: no catalog entry matches" in one_line_error(
            catalog_cli(catalog, "show", ref))


def test_sha256_ref_of_a_file_with_an_identical_copy_resolves(tmp_path, store, tiny):
    put(tiny["lora"], tmp_path / "loras" / "mychar.safetensors")
    put(tiny["lora"], tmp_path / "loras" / "backup" / "mychar-copy.safetensors")
    add_root(store, tmp_path / "loras")
    scan(store, jobs=1)
    hash_pending(store)
    sha = hash_file(tiny["lora"]).sha256
    resolved = CatalogResolver(store)(f"sha256:{sha[:12]}")
    assert resolved.sha256 == sha
    assert find_entry(store, f"sha256:{sha}").sha256 == sha


def test_list_filters_by_kind_architecture_and_base_model(library):
    store = library.store
    assert names(list_entries(store, Filters(kind="lora"))) == ["mychar", "xlstyle"]
    assert names(list_entries(store, Filters(kind="checkpoint"))) == ["base15", "basexl"]
    assert names(list_entries(store, Filters(architecture="sdxl"))) == ["basexl", "xlstyle"]
    assert names(list_entries(store, Filters(base_model="sd 1.5"))) == [
        "base15", "emb", "mychar"]
    assert names(list_entries(store, Filters(kind="lora", architecture="sd1"))) == ["mychar"]
    assert names(list_entries(store, Filters(kind="vae"))) == ["vae"]


def test_list_filters_are_checked_and_take_any_case(library):
    store = library.store
    assert names(list_entries(store, Filters(kind="LoRA"))) == ["mychar", "xlstyle"]
    assert names(list_entries(store, Filters(status="OK"))) == sorted(WEBUI_FILES)
    for filters, sentence in (
            (Filters(kind="unet"), "--kind 'unet': choose one of checkpoint, diffusion_model, "
                                   "lora, vae, text_encoder, embedding, unknown"),
            (Filters(status="bogus"), "--status 'bogus': choose one of ok, missing, truncated, "
                                      "invalid, unreadable, unchecked"),
            (Filters(limit=0), "--limit 0: give 1 or more (leave it out to list every entry)"),
            (Filters(limit=-3), "--limit -3: give 1 or more")):
        with pytest.raises(UserError, match=re.escape(sentence)):
            list_entries(store, filters)


def test_cli_list_refuses_unknown_filter_values_and_an_empty_answer_is_not_a_scan_hint(
        tmp_path, tiny):
    catalog = tmp_path / "c.sqlite"
    Store.open(catalog).close()
    assert catalog_cli(catalog, "list").stdout.startswith("no entries yet: no roots yet in ")
    assert one_line_error(catalog_cli(catalog, "list", "--status", "bogus")) == (
        "error: --status 'bogus': choose one of ok, missing, truncated, invalid, unreadable, "
        "unchecked")
    assert "--limit 0: give 1 or more" in one_line_error(catalog_cli(catalog, "list",
                                                                     "--limit", "0"))
    put(tiny["lora"], tmp_path / "loras" / "a.safetensors")
    catalog_cli(catalog, "add-root", tmp_path / "loras", "--scan")
    assert catalog_cli(catalog, "list", "--kind", "vae").stdout == (
        "no entries match these filters\n")
    assert one_line_error(catalog_cli(catalog, "tag", "a", "")) == (
        "error: tag '': a tag cannot be empty or only spaces; give a word")
    assert one_line_error(catalog_cli(catalog, "list", "--tag", " ")) == (
        "error: --tag ' ': a tag cannot be empty or only spaces; give a word")


def test_list_filters_by_tags_text_status_and_favourites(library):
    store = library.store
    assert names(list_entries(store, Filters(tags=["style"]))) == ["mychar", "xlstyle"]
    assert names(list_entries(store, Filters(tags=["style", "anime"]))) == ["mychar"]
    assert names(list_entries(store, Filters(tags=["anime", "nope"]))) == []
    assert names(list_entries(store, Filters(tags=["STYLE", " Anime "]))) == ["mychar"]
    with pytest.raises(UserError, match="--tag '': a tag cannot be empty or only spaces"):
        list_entries(store, Filters(tags=[""]))
    assert names(list_entries(store, Filters(search="BASEX"))) == ["basexl"]  # name
    assert names(list_entries(store, Filters(search="solo"))) == ["mychar", "xlstyle"]  # triggers
    assert names(list_entries(store, Filters(search="portraits"))) == ["base15"]  # notes
    assert names(list_entries(store, Filters(favourite=True))) == ["basexl"]
    assert names(list_entries(store, Filters(status="ok"))) == sorted(WEBUI_FILES)
    library.files["emb"].unlink()
    scan(store, jobs=1)
    assert names(list_entries(store, Filters(status="missing"))) == ["emb"]


def test_search_finds_non_ascii_trigger_words(tmp_path, store, tiny):
    loras = tmp_path / "webui" / "models" / "Lora"
    put(tiny["lora"], loras / "neko.safetensors")
    (loras / "neko.civitai.info").write_text(json.dumps({**CIVITAI,
                                                         "trainedWords": ["猫耳", "café"]}))
    add_root(store, tmp_path / "webui")
    scan(store, jobs=1)
    assert find_entry(store, "neko").trigger_words == ["猫耳", "café"]
    assert names(list_entries(store, Filters(search="猫耳"))) == ["neko"]
    assert names(list_entries(store, Filters(search="café"))) == ["neko"]


def test_search_finds_sidecar_model_names_and_web_ui_notes(tmp_path, store, tiny):
    loras = tmp_path / "webui" / "models" / "Lora"
    put(tiny["lora"], loras / "ponystyle.safetensors")
    (loras / "ponystyle.civitai.info").write_text(json.dumps(
        {**CIVITAI, "name": "v2 Ünïcode", "model": {"name": "Pony Style", "type": "LORA"}}))
    put(tiny["lora"], loras / "a1.safetensors")
    (loras / "a1.json").write_text(json.dumps({**A1111, "notes": "from a1111"}))
    put(tiny["lora"], loras / "sm.safetensors")
    (loras / "sm.cm-info.json").write_text(json.dumps(STABILITY))
    add_root(store, tmp_path / "webui")
    scan(store, jobs=1)
    for text, found in (("pony style", ["ponystyle"]), ("ünïcode", ["ponystyle"]),
                        ("FROM A1111", ["a1"]), ("SM Char", ["sm"]), ("sm-v2", ["sm"]),
                        ("version_name", [])):
        assert names(list_entries(store, Filters(search=text))) == found, text


def test_list_sorts_and_limits(library):
    store = library.store
    by_size = sorted(WEBUI_FILES, key=lambda n: (-library.files[n].stat().st_size, n))
    listed = list_entries(store, Filters(sort="size"))
    assert [e.size for e in listed] == sorted((e.size for e in listed), reverse=True)
    assert names(listed)[0] == by_size[0] == "basexl"
    assert names(list_entries(store, Filters(sort="name", limit=2))) == ["base15", "basexl"]
    assert names(list_entries(store, Filters(sort="rating", limit=1))) == ["basexl"]
    with pytest.raises(UserError, match="--sort 'biggest': choose one of name, size"):
        list_entries(store, Filters(sort="biggest"))


# --- edits -----------------------------------------------------------------------------------


def test_tags_notes_ratings_and_favourites(library):
    store = library.store
    entry = find_entry(store, "emb")
    assert set_tags(store, entry, ["  neg ", "hands"], []) == ["hands", "neg"]
    assert set_tags(store, entry, ["neg", "extra"], ["hands", "absent"]) == ["extra", "neg"]
    # one spelling per tag, kept as first given; removing ignores case too
    assert set_tags(store, entry, ["NEG", "Anime", "anime"], []) == ["Anime", "extra", "neg"]
    assert set_tags(store, entry, [], ["ANIME"]) == ["extra", "neg"]
    for blank in ("", "  "):
        with pytest.raises(UserError, match=f"tag {blank!r}: a tag cannot be empty or only "
                                            "spaces; give a word"):
            set_tags(store, entry, ["fine", blank], [])
        assert get_entry(store, entry.id).tags == ["extra", "neg"]  # nothing was added
    set_note(store, entry, "  use at 0.7  ")
    set_rating(store, entry, 3, None)
    set_rating(store, entry, None, True)
    got = get_entry(store, entry.id)
    assert (got.tags, got.notes, got.rating, got.favourite) == (["extra", "neg"], "use at 0.7",
                                                                  3, True)
    for bad in (6, -1):
        with pytest.raises(UserError, match=f"rating {bad}: give 0 \\(none\\) to 5 stars"):
            set_rating(store, entry, bad, None)
    set_rating(store, entry, 0, False)
    got = get_entry(store, entry.id)
    assert (got.rating, got.favourite) == (0, False)


def test_remove_forgets_the_entry_and_deletes_the_file_only_when_asked(library):
    store, files = library.store, library.files
    kept = find_entry(store, "emb")
    assert remove(store, kept, delete_file=False) is False
    assert files["emb"].exists()
    with pytest.raises(UserError, match="no catalog entry"):
        get_entry(store, kept.id)
    deleted = find_entry(store, "vae")
    assert remove(store, deleted, delete_file=True) is True
    assert not files["vae"].exists()
    assert names(list_entries(store, Filters())) == ["base15", "basexl", "mychar", "xlstyle"]
    # the kept file comes back as a new entry on the next scan
    assert scan(store, jobs=1).new == 1


def test_cli_rm_says_a_file_left_on_disk_comes_back_on_the_next_scan(tmp_path, tiny):
    catalog = tmp_path / "c.sqlite"
    files = webui(tmp_path / "webui", tiny)
    catalog_cli(catalog, "add-root", tmp_path / "webui", "--scan")
    kept = catalog_cli(catalog, "rm", "emb").stdout.splitlines()
    assert kept[1] == ("note: its file is still there, so the next scan adds it again as a new "
                       "entry (with a new id); --delete-file deletes it, `catalog remove-root` "
                       "stops scanning its root")
    assert files["emb"].exists()
    deleted = run_without_terminal("catalog", "rm", "vae", "--delete-file", "--yes",
                                   "--catalog", catalog).stdout.splitlines()
    assert len(deleted) == 1 and deleted[0].endswith("vae and deleted its file")


def test_remove_root_forgets_the_entries_no_other_root_holds(tmp_path, store, tiny):
    webui(tmp_path / "webui", tiny)
    put(tiny["lora"], tmp_path / "loose" / "loose.safetensors")
    outer, _ = add_root(store, tmp_path / "webui")
    inner, _ = add_root(store, tmp_path / "webui" / "models" / "Lora")
    loose, _ = add_root(store, tmp_path / "loose")
    scan(store, jobs=1)
    set_tags(store, find_entry(store, "basexl"), ["best"], [])
    # the inner root's file is the outer root's too: nothing forgotten
    removed = remove_root(store, inner)
    assert (removed.forgotten, removed.kept, removed.annotated) == (0, 1, 0)
    assert len(list_entries(store, Filters())) == len(WEBUI_FILES) + 1
    plan = remove_root(store, outer, dry_run=True)
    assert (plan.forgotten, plan.annotated) == (len(WEBUI_FILES), 1)
    assert len(list_entries(store, Filters())) == len(WEBUI_FILES) + 1
    removed = remove_root(store, outer)
    assert names(list_entries(store, Filters())) == ["loose"]
    assert [r[0] for r in store.db.execute("SELECT id FROM roots")] == [loose]
    assert (tmp_path / "webui" / "models" / "Stable-diffusion" / "basexl.safetensors").exists()
    assert scan(store, jobs=1).seen == 1  # the removed roots are not walked


def test_cli_remove_root_asks_before_forgetting_annotated_entries(tmp_path, tiny):
    catalog = tmp_path / "c.sqlite"
    webui(tmp_path / "webui", tiny)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "webui")
    catalog_cli(catalog, "add-root", tmp_path / "webui", "--scan")
    catalog_cli(catalog, "tag", "base15", "mine")
    refused = run_without_terminal("catalog", "remove-root", link, "--catalog", catalog)
    assert one_line_error(refused) == (
        f"error: {tmp_path / 'webui'}: 1 of its {len(WEBUI_FILES)} entries have tags, notes or "
        "ratings; forget them (pass --yes: there is no terminal to ask on)")
    assert one_line_error(catalog_cli(catalog, "remove-root", tmp_path / "webui" / "models")) \
        == (f"error: {tmp_path / 'webui' / 'models'}: not a catalog root; `mergekit-sd catalog "
            "roots` lists them")
    done = run_without_terminal("catalog", "remove-root", link, "--yes", "--catalog", catalog)
    assert done.stdout == (f"removed root #1 {tmp_path / 'webui'}: forgot {len(WEBUI_FILES)} "
                           "entries; no file was touched\n")
    assert catalog_cli(catalog, "roots").stdout == (
        f"no roots yet in the catalog {catalog}; add a model folder with `mergekit-sd catalog "
        f"add-root FOLDER --catalog {catalog}`\n")


def test_an_empty_catalog_says_which_file_it_read_and_what_to_do_next(tmp_path):
    # `make demo` keeps its own catalog: a user who lists the default one instead must see
    # which file was read, and a scan cannot help a catalog without roots
    catalog = tmp_path / "c.sqlite"
    Store.open(catalog).close()
    add_root = f"`mergekit-sd catalog add-root FOLDER --scan --catalog {catalog}`"
    assert catalog_cli(catalog, "list").stdout == (
        f"no entries yet: no roots yet in the catalog {catalog}; add a model folder with "
        f"{add_root}\n")
    roots = catalog_cli(catalog, "roots")
    assert (roots.returncode, roots.stdout) == (0, (
        f"no roots yet in the catalog {catalog}; add a model folder with `mergekit-sd catalog "
        f"add-root FOLDER --catalog {catalog}`\n"))
    (tmp_path / "models").mkdir()
    catalog_cli(catalog, "add-root", tmp_path / "models")  # no --scan: nothing listed yet
    assert catalog_cli(catalog, "list").stdout == (
        f"no entries yet in the catalog {catalog}; `mergekit-sd catalog scan --catalog "
        f"{catalog}` adds the files of its 1 root(s)\n")
    # the catalog $MERGEKIT_SD_CATALOG names is read by the next command too: no --catalog
    named = run_cli("catalog", "list", env={"MERGEKIT_SD_CATALOG": str(catalog)})
    assert named.stdout == (f"no entries yet in the catalog {catalog}; `mergekit-sd catalog "
                            "scan` adds the files of its 1 root(s)\n")


# --- duplicates ------------------------------------------------------------------------------


def test_identical_copies_and_same_weights_with_other_metadata(tmp_path, store, tiny):
    loras = tmp_path / "loras"
    a = put(tiny["lora"], loras / "a.safetensors")
    b = put(tiny["lora"], loras / "copies" / "b.safetensors")
    c = write_lora(loras / "c.safetensors", "kohya-sdxl", seed=9, metadata={"title": "first"})
    d = write_lora(loras / "d.safetensors", "kohya-sdxl", seed=9,
                   metadata={"title": "second, re-titled"})
    put(tiny["lora_xl"], loras / "unrelated.safetensors")
    add_root(store, loras)
    scan(store, jobs=1)
    assert find_duplicates(store) == []  # nothing hashed yet
    hash_pending(store)
    groups = find_duplicates(store)
    assert [(g.match, g.paths) for g in groups] == [
        ("same weights", [str(c), str(d)]),
        ("identical", [str(a), str(b)]),
    ]
    same, identical = groups
    hc, hd = hash_file(c), hash_file(d)
    assert hc.autov3 == hd.autov3 and hc.sha256 != hd.sha256
    assert same.hash == hc.autov3
    assert same.sizes == [c.stat().st_size, d.stat().st_size]
    assert same.reclaimable == min(same.sizes)
    assert identical.hash == hash_file(a).sha256
    assert identical.reclaimable == a.stat().st_size == identical.sizes[0]


def test_a_hard_link_frees_nothing(tmp_path, store, tiny):
    loras = tmp_path / "loras"
    a = put(tiny["lora"], loras / "a.safetensors")
    os.link(a, loras / "linked.safetensors")
    add_root(store, loras)
    scan(store, jobs=1)
    hash_pending(store)
    groups = find_duplicates(store)
    assert [(g.match, g.paths, g.reclaimable) for g in groups] == [
        ("identical", [str(a), str(loras / "linked.safetensors")], 0)]


def test_a_rewritten_file_is_no_longer_reported_identical(tmp_path, store, tiny):
    loras = tmp_path / "loras"
    put(tiny["lora"], loras / "a.safetensors")
    b = put(tiny["lora"], loras / "b.safetensors")
    add_root(store, loras)
    scan(store, jobs=1)
    hash_pending(store)
    assert len(find_duplicates(store)) == 1
    write_lora(b, "kohya-sd1", seed=42)  # retrained under the same name
    assert scan(store, jobs=1).changed == 1
    assert find_duplicates(store) == []


# --- lineage and catalog references in recipes -----------------------------------------------


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """The demo workspace in a catalog, merged by a recipe that names its inputs by catalog
    name and by hash, and scanned again with --hash."""
    root = tmp_path_factory.mktemp("merged")
    env = {ENV_VAR: str(root / "env-catalog.sqlite")}
    make_demo_workspace(root / "webui")
    catalog = root / "c.sqlite"
    with Store.open(catalog) as store:
        add_root(store, root / "webui")
        scan(store, jobs=1)
        hash_pending(store)
        base = find_entry(store, "demo-sd15-base")
        anime = find_entry(store, "demo-sd15-anime")
    recipe = root / "mix.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        version: 1
        models:
          base: "catalog:demo-sd15-base"
          anime: "sha256:{anime.sha256[:12]}"
        steps:
          - name: mix
            method: weighted_sum
            inputs: [base, anime]
            params:
              alpha: 0.5
        output:
          path: webui/models/Stable-diffusion/demo-mix.safetensors
          dtype: fp16
        """))
    merge = run_cli("merge", recipe, "--catalog", catalog, env=env)
    rescan = run_cli("catalog", "scan", "--hash", "--json", "--catalog", catalog, env=env)
    assert not (root / "env-catalog.sqlite").exists()
    return SimpleNamespace(root=root, catalog=catalog, recipe=recipe, merge=merge, rescan=rescan,
                           base=base, anime=anime,
                           output=root / "webui/models/Stable-diffusion/demo-mix.safetensors")


def test_recipe_with_catalog_references_merges(merged):
    assert merged.merge.returncode == 0, merged.merge.stderr
    last = merged.merge.stdout.strip().splitlines()[-1]
    assert last.startswith("wrote mix -> ") and Path(last[13:]).resolve() == merged.output
    assert merged.output.is_file()
    assert merged.rescan.returncode == 0, merged.rescan.stderr
    doc = json.loads(merged.rescan.stdout)
    assert (doc["scan"]["new"], doc["scan"]["unchanged"], doc["scan"]["bad"]) == (1, 7, [])
    assert (doc["hash"]["hashed"], doc["hash"]["cached"]) == (1, 7)


def test_lineage_of_a_merge_names_its_inputs_and_the_inputs_name_it(merged):
    with Store.open(merged.catalog) as store:
        mix = find_entry(store, "demo-mix")
        assert (mix.kind, mix.architecture, mix.dtype) == ("checkpoint", "sd1", "F16")
        tree = lineage(store, mix).tree
        assert (tree.name, tree.entry_id, tree.ref) == ("demo-mix", mix.id, mix.sha256)
        parents = sorted((p.role, p.name, p.ref, p.entry_id, p.path, p.parents)
                         for p in tree.parents)
        assert parents == sorted(
            ("merge input", e.name, e.sha256, e.id, e.path, [])
            for e in (merged.base, merged.anime))
        for parent in (merged.base, merged.anime):
            found = lineage(store, find_entry(store, f"#{parent.id}"))
            assert found.tree.parents == []
            assert found.children == [Node("merge input", "demo-mix", "", mix.id, mix.path)]
        assert lineage(store, find_entry(store, "demo-sd15-photo")).children == []


def test_lineage_of_a_bake_names_its_base_and_lora_as_such(tmp_path):
    files = make_demo_workspace(tmp_path / "webui")
    models = tmp_path / "webui" / "models"
    base = models / "Stable-diffusion" / "demo-sd15-base.safetensors"
    baked = models / "Stable-diffusion" / ("a-bake-whose-name-is-long-enough-to-wrap-" * 2
                                           + "mychar.safetensors")
    lora = models / "Lora" / "demo-lora-mychar.safetensors"
    assert {base, lora} <= set(files)
    made = run_cli("bake", base, f"{lora}:0.7", "-o", baked)
    assert made.returncode == 0, made.stderr
    catalog = tmp_path / "c.sqlite"
    assert catalog_cli(catalog, "add-root", tmp_path / "webui", "--scan").returncode == 0
    assert catalog_cli(catalog, "scan", "--hash").returncode == 0
    doc = json.loads(catalog_cli(catalog, "lineage", baked.stem, "--json").stdout)
    assert sorted((p["role"], p["name"]) for p in doc["ancestry"]["parents"]) == [
        ("bake base", "demo-sd15-base"), ("baked LoRA", "demo-lora-mychar")]
    children = json.loads(catalog_cli(catalog, "lineage", "demo-lora-mychar",
                                      "--json").stdout)["children"]
    assert [(c["role"], c["name"]) for c in children] == [("baked LoRA", baked.stem)]
    # at 80 columns the child's line wraps under its own start, as the parents' lines do
    shown = run_cli("catalog", "lineage", "demo-sd15-base", "--catalog", catalog,
                    env={"COLUMNS": "80"}).stdout.splitlines()
    made_from = shown[shown.index("made from it:") + 1:]
    assert made_from[0].startswith("└── bake base of:"), shown
    assert len(made_from) > 1 and all(line.startswith("    ") for line in made_from[1:]), shown
    assert baked.stem in "".join(line.strip() for line in made_from).replace("└──", ""), shown


def test_lineage_of_a_lora_merge_and_a_lora_extract_names_their_inputs(tmp_path):
    """`lora merge` and `lora extract` record their inputs by SHA256 in keys of their own
    (mergekit_sd.merged_loras, mergekit_sd.extracted_from): lineage shows them as parents,
    and the inputs show what was made from them."""
    from mergekit_sd.lora.combine import merge_loras
    from mergekit_sd.lora.extract import extract_lora
    from mergekit_sd.testing import write_checkpoint, write_lora

    root = tmp_path / "models"
    base = write_checkpoint(root / "base.safetensors", "sd1", seed=1)
    tuned = write_checkpoint(root / "tuned.safetensors", "sd1", seed=2)
    one = write_lora(root / "one.safetensors", "kohya-sd1", seed=1)
    two = write_lora(root / "two.safetensors", "kohya-sd1", seed=2)
    merge_loras([(one, 1.0), (two, 0.5)], root / "merged.safetensors", base=base)
    extract_lora(tuned, base, root / "extracted.safetensors", rank=4)
    catalog = tmp_path / "c.sqlite"
    assert catalog_cli(catalog, "add-root", root, "--scan").returncode == 0
    assert catalog_cli(catalog, "scan", "--hash").returncode == 0

    def parents(name):
        doc = json.loads(catalog_cli(catalog, "lineage", name, "--json").stdout)
        return sorted((p["role"], p["name"], p["entry_id"] is not None)
                      for p in doc["ancestry"]["parents"])

    assert parents("merged") == [("merged LoRA input", "one", True),
                                 ("merged LoRA input", "two", True)]
    assert parents("extracted") == [("extracted from (tuned)", "tuned", True),
                                    ("extraction base", "base", True)]
    children = json.loads(catalog_cli(catalog, "lineage", "base", "--json").stdout)["children"]
    assert [(c["role"], c["name"]) for c in children] == [("extraction base", "extracted")]


def test_lineage_finds_an_unhashed_parent_by_its_remembered_sha256_or_says_to_hash(
        tmp_path, monkeypatch):
    """A parent is joined by hash: one the catalog holds unhashed is found by its file name and
    the SHA256 mergekit-sd remembered (here the base's); one not remembered (the LoRA's) is
    not called "not in the catalog" while entries await `catalog scan --hash`."""
    from mergekit_sd.io import hash_cache
    from mergekit_sd.io.hashing import file_sha256

    root = tmp_path / "models"
    base = write_checkpoint(root / "base.safetensors", "sd1", seed=1)
    lora = write_lora(root / "style.safetensors", "kohya-sd1")
    assert run_cli("bake", base, lora, "-o", root / "baked.safetensors").returncode == 0
    monkeypatch.setattr(hash_cache, "SETTLED_NS", 0)  # the file is seconds old
    hash_cache.remember_sha256(base, file_sha256(base), hash_cache.identity(base))
    catalog = tmp_path / "c.sqlite"
    assert catalog_cli(catalog, "add-root", root, "--scan").returncode == 0
    doc = json.loads(catalog_cli(catalog, "lineage", "baked", "--json").stdout)
    parents = {p["role"]: p for p in doc["ancestry"]["parents"]}
    assert (parents["bake base"]["name"], parents["bake base"]["hashed"]) == ("base", False)
    assert parents["baked LoRA"]["entry_id"] is None and doc["unhashed_entries"] == 3
    shown = " ".join(run_cli("catalog", "lineage", "baked", "--catalog", catalog,
                             env={"COLUMNS": "300"}).stdout.split())
    assert f"{base}; not hashed in the catalog yet: `catalog scan --hash`" in shown, shown
    assert "no hashed catalog entry; 3 entries are not hashed yet" in shown, shown
    assert "not in the catalog" not in shown


def test_roles_of_a_recipe_that_merges_then_bakes():
    shas = {n: f"{i:064x}" for i, n in enumerate(["base", "anime", "style"], 1)}
    recipe = {"version": 1, "models": {n: {"ref": f"{n}.safetensors", "sha256": sha}
                                       for n, sha in shas.items()},
              "steps": [{"name": "mix", "method": "weighted_sum", "inputs": ["base", "anime"]},
                        {"name": "styled", "method": "bake_lora", "inputs": ["mix"],
                         "loras": [{"model": "style", "strength": 0.5}]}]}
    parents = parents_from_metadata({"mergekit_sd.recipe": json.dumps(recipe)})
    assert sorted((p.role, p.name) for p in parents) == [
        ("baked LoRA", "style.safetensors"), ("merge input", "anime.safetensors"),
        ("merge input", "base.safetensors")]


def test_lora_trained_on_a_checkpoint_names_it_as_training_base(tmp_path, store, tiny):
    folder = tmp_path / "models"
    base = put(tiny["sdxl"], folder / "my-sdxl.safetensors")
    autov1 = hash_file(base).autov1
    assert autov1 is not None and len(autov1) == 8
    lora = write_lora(folder / "trained.safetensors", "kohya-sdxl", seed=11,
                      metadata={"ss_sd_model_hash": autov1,
                                "ss_sd_model_name": "sd_xl_base_1.0.safetensors"})
    write_lora(folder / "unknown-base.safetensors", "kohya-sdxl", seed=12,
               metadata={"ss_sd_model_hash": "0badc0de", "ss_sd_model_name": "lost.ckpt"})
    add_root(store, folder)
    scan(store, jobs=1)
    hash_pending(store)
    checkpoint = find_entry(store, "my-sdxl")
    assert checkpoint.autov1 == autov1
    tree = lineage(store, find_entry(store, "trained")).tree
    assert tree.parents == [Node("training base", "my-sdxl", autov1, checkpoint.id, str(base))]
    orphan = lineage(store, find_entry(store, "unknown-base")).tree
    assert orphan.parents == [Node("training base", "lost.ckpt", "0badc0de", None, None)]
    assert lineage(store, checkpoint).children == [
        Node("training base", "trained", "", find_entry(store, "trained").id, str(lora))]


def test_unknown_catalog_reference_in_a_recipe_is_one_line_naming_file_and_field(merged):
    recipe = merged.root / "broken.yaml"
    recipe.write_text(merged.recipe.read_text().replace('"catalog:demo-sd15-base"',
                                                        '"catalog:nope"'))
    result = run_cli("merge", recipe, "--catalog", merged.catalog)
    line = one_line_error(result)
    assert "broken.yaml" in line and "models.base" in line and "'catalog:nope'" in line
    assert "no catalog entry matches" in line


def test_resolver_refuses_missing_files_and_download_references(tmp_path, store, tiny):
    model = put(tiny["lora"], tmp_path / "loras" / "gone.safetensors")
    add_root(store, tmp_path / "loras")
    scan(store, jobs=1)
    resolver = CatalogResolver(store)
    resolved = resolver("catalog:gone")
    assert (resolved.path, resolved.sha256) == (model, None)  # not hashed: no sha256 to reuse
    hash_pending(store)
    assert resolver("catalog:gone").sha256 == hash_file(model).sha256
    model.unlink()
    with pytest.raises(LookupError, match=r"is catalog entry #1, whose file .* is missing"):
        resolver("catalog:gone")
    with pytest.raises(LookupError, match="has no copy in the catalog yet; run `mergekit-sd pull"):
        resolver("hf://org/repo/model.safetensors")
    with pytest.raises(LookupError, match="no catalog entry matches"):
        resolver("catalog:other")


# --- the command line ------------------------------------------------------------------------


def test_cli_session_add_scan_list_show_tag_rate_dupes_rm(tmp_path, tiny):
    catalog = tmp_path / "c.sqlite"
    root = tmp_path / "webui"
    files = webui(root, tiny)
    copy = put(tiny["lora"], root / "models" / "Lora" / "backup" / "mychar-copy.safetensors")

    added = catalog_cli(catalog, "add-root", root)
    assert added.returncode == 0, added.stderr
    lines = added.stdout.splitlines()
    assert lines[0] == f"root #1: {root} (a1111 layout)"
    assert [line.split() for line in lines[1:]] == [
        ["checkpoint", str(root / "models/Stable-diffusion")],
        ["lora", str(root / "models/Lora")], ["lora", str(root / "models/LyCORIS")],
        ["vae", str(root / "models/VAE")], ["embedding", str(root / "embeddings")]]

    scanned = catalog_cli(catalog, "scan", "--json")
    assert scanned.returncode == 0, scanned.stderr
    doc = json.loads(scanned.stdout)
    assert (doc["scan"]["seen"], doc["scan"]["new"], doc["scan"]["roots"], doc["hash"]) == (
        7, 7, [str(root)], None)
    doc = json.loads(catalog_cli(catalog, "scan", "--hash", "--json").stdout)
    assert (doc["scan"]["unchanged"], doc["hash"]["hashed"], doc["hash"]["cached"]) == (7, 7, 0)
    plain = catalog_cli(catalog, "scan")
    assert plain.stdout.strip().startswith("scanned 1 root(s): 7 model files, 0 new, 0 changed, "
                                   "7 unchanged, 0 moved, 0 now missing (")
    assert catalog_cli(catalog, "roots").stdout.strip() == f"#1 {root} (a1111, 7 files)"

    listed = json.loads(catalog_cli(catalog, "list", "--json", "--kind", "lora").stdout)
    assert [e["name"] for e in listed] == ["mychar", "mychar-copy", "xlstyle"]
    listed = json.loads(catalog_cli(catalog, "list", "--json", "--arch", "sdxl").stdout)
    assert [(e["name"], e["base_model"]) for e in listed] == [("basexl", "SDXL 1.0"),
                                                              ("xlstyle", "SDXL 1.0")]
    listed = json.loads(catalog_cli(catalog, "list", "--json", "--sort", "size",
                                    "--limit", "1").stdout)
    assert [e["name"] for e in listed] == ["basexl"]
    assert "unknown architecture 'sdx9'" in one_line_error(
        catalog_cli(catalog, "list", "--arch", "sdx9"))

    shown = json.loads(catalog_cli(catalog, "show", "mychar", "--json").stdout)
    assert (shown["path"], shown["kind"], shown["lora_rank"], shown["trigger_words"]) == (
        str(files["mychar"]), "lora", 4, ["mychar", "1girl", "solo"])
    assert shown["autov2"] == shown["sha256"][:10] and len(shown["sha256"]) == 64
    table = {line.split("│")[0].strip(): line.split("│")[1].strip()
             for line in catalog_cli(catalog, "show", "mychar").stdout.splitlines()
             if "│" in line}
    assert (table["entry"], table["trigger words"], table["LoRA"], table["base model"],
            table["SHA256"]) == (f"#{shown['id']} mychar", "mychar, 1girl, solo",
                                 "kohya LoRA, rank 4", "SD 1.5", shown["sha256"])

    tagged = catalog_cli(catalog, "tag", "mychar", "style", "fav")
    assert tagged.stdout.strip() == f"#{shown['id']} mychar: fav, style"
    untagged = catalog_cli(catalog, "tag", "mychar", "--remove", "fav")
    assert untagged.stdout.strip() == f"#{shown['id']} mychar: style"
    noted = catalog_cli(catalog, "note", "mychar", "trained on 40 images")
    assert noted.stdout.strip() == f"#{shown['id']} mychar: note set"
    rated = catalog_cli(catalog, "rate", "mychar", "3", "--favourite")
    assert rated.stdout.strip() == f"#{shown['id']} mychar: 3 star(s), favourite"
    assert "rating 9" in one_line_error(catalog_cli(catalog, "rate", "mychar", "9"))
    shown = json.loads(catalog_cli(catalog, "show", f"#{shown['id']}", "--json").stdout)
    assert (shown["tags"], shown["notes"], shown["rating"], shown["favourite"]) == (
        ["style"], "trained on 40 images", 3, True)
    listed = json.loads(catalog_cli(catalog, "list", "--json", "--tag", "style").stdout)
    assert [e["name"] for e in listed] == ["mychar"]
    listed = json.loads(catalog_cli(catalog, "list", "--json", "--favourites").stdout)
    assert [e["name"] for e in listed] == ["mychar"]

    dupes = json.loads(catalog_cli(catalog, "dupes", "--json").stdout)
    assert dupes == [{"match": "identical", "hash": shown["sha256"],
                      "paths": [str(copy), str(files["mychar"])],
                      "sizes": [copy.stat().st_size] * 2, "reclaimable": copy.stat().st_size}]
    plain = catalog_cli(catalog, "dupes").stdout.splitlines()
    assert plain[0].startswith(f"identical ({shown['sha256'][:12].upper()}), ")
    assert plain[0].endswith(" to reclaim:")
    assert [line.split()[-1] for line in plain[1:3]] == [str(copy), str(files["mychar"])]
    family = json.loads(catalog_cli(catalog, "lineage", "mychar", "--json").stdout)
    assert family == {"ancestry": {"role": "", "name": "mychar", "ref": shown["sha256"],
                                   "entry_id": shown["id"], "path": str(files["mychar"]),
                                   "hashed": True, "parents": []},
                      "children": [], "unhashed_entries": 0}

    refused = run_without_terminal("catalog", "rm", "mychar-copy", "--delete-file",
                                   "--catalog", catalog)
    assert "pass --yes" in one_line_error(refused)
    assert copy.exists()
    removed = catalog_cli(catalog, "rm", "mychar-copy", "--delete-file", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.strip().endswith("mychar-copy and deleted its file")
    assert not copy.exists()
    forgotten = catalog_cli(catalog, "rm", "emb")
    assert forgotten.returncode == 0 and files["emb"].exists()
    assert json.loads(catalog_cli(catalog, "dupes", "--json").stdout) == []
    listed = json.loads(catalog_cli(catalog, "list", "--json").stdout)
    assert [e["name"] for e in listed] == ["base15", "basexl", "mychar", "vae", "xlstyle"]


def run_in_terminal(columns: int, *args) -> str:
    """What the CLI prints to a terminal `columns` wide."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": str(columns), "TERM": "xterm"}
    code, _, shown = run_on_terminal(args, env)
    assert code == 0, shown
    return shown


def test_paths_and_summaries_stay_on_one_line_in_a_pipe_and_a_narrow_terminal(tmp_path, tiny):
    catalog = tmp_path / "c.sqlite"
    root = tmp_path / "webui"
    files = webui(root, tiny)
    copy = put(tiny["lora"], root / "models" / "Lora" / ("a-copy-whose-name-is-long-enough-to-"
                                                         "be-wrapped-" * 2 + "x.safetensors"))
    catalog_cli(catalog, "add-root", root)
    scanned = run_piped("catalog", "scan", "--hash", "--catalog", catalog).stdout.splitlines()
    assert scanned[0].startswith("scanned 1 root(s): 7 model files, 7 new, "), scanned
    assert scanned[0].endswith(" s)"), scanned
    dupes = run_piped("catalog", "dupes", "--catalog", catalog).stdout.splitlines()
    assert [line.split()[-1] for line in dupes[1:3]] == [str(copy), str(files["mychar"])], dupes
    assert all(line.startswith("  ") and len(line.split()) == 3 for line in dupes[1:3]), dupes
    renamed = copy.rename(copy.with_name("renamed-" + copy.name))
    moved = run_piped("catalog", "scan", "--catalog", catalog).stdout.splitlines()
    assert f"moved: {copy} -> {renamed}" in moved, moved
    shown = run_piped("catalog", "show", renamed, "--catalog", catalog).stdout.splitlines()
    assert shown[1].split("│")[1].strip() == str(renamed), shown
    # a terminal 60 columns wide: messages are not broken (the terminal wraps them itself)
    narrow = run_in_terminal(60, "catalog", "dupes", "--catalog", catalog).splitlines()
    assert [line.split()[-1] for line in narrow[1:3]] == sorted([str(renamed),
                                                                 str(files["mychar"])]), narrow


def test_cli_lineage_of_a_merge_as_json(merged):
    result = catalog_cli(merged.catalog, "lineage", "demo-mix", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["ancestry"]["name"] == "demo-mix"
    assert sorted((p["role"], p["entry_id"], p["ref"]) for p in doc["ancestry"]["parents"]) == \
        sorted(("merge input", e.id, e.sha256) for e in (merged.base, merged.anime))
    children = json.loads(catalog_cli(merged.catalog, "lineage", "demo-sd15-base",
                                      "--json").stdout)["children"]
    assert [(c["role"], c["name"]) for c in children] == [("merge input", "demo-mix")]
    tree = catalog_cli(merged.catalog, "lineage", "demo-mix").stdout.splitlines()
    assert tree[0].startswith("demo-mix (#")
    for parent in (merged.base, merged.anime):
        label = (f"merge input: {parent.name} [{parent.sha256[:12]}] "
                 f"(#{parent.id} {parent.path})")
        assert sum(line.endswith(label) for line in tree) == 1, tree


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    catalog = tmp_path / "c.sqlite"
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    assert "not a folder" in one_line_error(catalog_cli(catalog, "add-root", file))
    assert "'nope': no catalog entry matches" in one_line_error(
        catalog_cli(catalog, "show", "nope"))
    assert one_line_error(catalog_cli(catalog, "scan", tmp_path)) == (
        f"error: {tmp_path}: not a catalog root; add it first with `mergekit-sd catalog "
        "add-root`")
    empty = catalog_cli(catalog, "scan")
    assert (empty.returncode, empty.stdout.strip()) == (
        0, f"no roots yet in the catalog {catalog}; add a model folder with `mergekit-sd "
        f"catalog add-root FOLDER --catalog {catalog}`")
    empty = catalog_cli(catalog, "scan", "--json", "--hash")
    assert empty.returncode == 0
    doc = json.loads(empty.stdout)
    assert (doc["hash"], doc["scan"]["roots"], doc["scan"]["seen"]) == (None, [], 0)
    line = one_line_error(catalog_cli(catalog, "list", "--arch", "bogus"))
    assert line.startswith("error: --arch 'bogus': unknown architecture 'bogus'"), line
    assert '"' not in line
    not_a_db = tmp_path / "junk.sqlite"
    not_a_db.write_bytes(b"this is not a database" * 100)
    assert "cannot open the catalog" in one_line_error(catalog_cli(not_a_db, "list"))


def test_a_catalog_path_that_is_not_there_is_refused_except_by_add_root(tmp_path, tiny):
    typo = tmp_path / "typo" / "c.sqlite"
    webui(tmp_path / "webui", tiny)
    refused = (f"error: no catalog at {typo} (named by --catalog); check the path, or create "
               "one with `mergekit-sd catalog add-root FOLDER`")
    for command in (["list"], ["show", "1"], ["dupes"], ["lineage", "base15"], ["roots"],
                    ["tag", "base15", "x"], ["rate", "base15", "3"], ["rm", "base15"],
                    ["scan"], ["scan", tmp_path / "webui"], ["remove-root", tmp_path / "webui"]):
        assert one_line_error(catalog_cli(typo, *command)) == refused, command
    by_env = run_cli("catalog", "list", env={ENV_VAR: str(typo)})
    assert one_line_error(by_env) == refused.replace("--catalog", f"${ENV_VAR}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nmodels: {a: 'catalog:base15', b: 'catalog:base15'}\n"
                      "steps: [{name: mix, method: weighted_sum, inputs: [a, b]}]\n"
                      "output: {path: out.safetensors}\n")
    assert one_line_error(run_cli("plan", recipe, "--catalog", typo)) == refused
    assert not (tmp_path / "typo").exists()  # no stray folder, no empty catalog
    added = catalog_cli(typo, "add-root", tmp_path / "webui", "--scan")
    assert added.returncode == 0, added.stderr
    assert [e["name"] for e in json.loads(catalog_cli(typo, "list", "--json").stdout)] == sorted(
        WEBUI_FILES)


def test_a_damaged_or_foreign_database_is_one_sentence_and_left_as_it_is(tmp_path, tiny):
    damaged = tmp_path / "damaged.sqlite"
    with Store.open(damaged) as store:
        add_root(store, webui(tmp_path / "webui", tiny)["base15"].parents[2])
        scan(store, jobs=1)
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(damaged.read_bytes())
    data[4096:] = b"\xab" * (len(data) - 4096)  # page 1 (the schema) intact, the tables gone
    damaged.write_bytes(bytes(data))
    for command in (["list"], ["roots"], ["show", "1"], ["scan"]):
        assert "the catalog is damaged" in one_line_error(catalog_cli(damaged, *command))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nmodels: {a: 'catalog:base15', b: 'catalog:base15'}\n"
                      "steps: [{name: mix, method: weighted_sum, inputs: [a, b]}]\n"
                      "output: {path: out.safetensors}\n")
    assert "the catalog is damaged" in one_line_error(
        run_cli("plan", recipe, "--catalog", damaged))

    for version in (0, 1):
        foreign = tmp_path / f"foreign{version}.sqlite"
        db = sqlite3.connect(foreign)
        db.execute("CREATE TABLE things (x)")
        db.execute(f"PRAGMA user_version = {version}")
        db.commit()
        db.close()
        before = foreign.read_bytes()
        assert "not a mergekit-sd catalog" in one_line_error(catalog_cli(foreign, "list"))
        assert foreign.read_bytes() == before


def test_an_entry_id_is_never_given_to_another_file(tmp_path, store, tiny):
    files = webui(tmp_path / "webui", tiny)
    add_root(store, tmp_path / "webui")
    scan(store, jobs=1)
    last = max(e.id for e in list_entries(store, Filters()))
    remove(store, get_entry(store, last), delete_file=True)
    put(tiny["sdxl"], files["base15"].with_name("other-model.safetensors"))
    scan(store, jobs=1)
    assert find_entry(store, "other-model").id == last + 1
    with pytest.raises(UserError, match=f"#{last}"):
        find_entry(store, f"#{last}")


def test_a_version_1_catalog_is_upgraded_keeping_ids_tags_and_notes(tmp_path, tiny):
    """A catalog written before ids were kept unique: version 1's schema, entries #1 and #5
    (#2-#4 deleted), #5 tagged and noted."""
    from catalog.store import _SCHEMA_V1

    loras = tmp_path / "loras"
    first = put(tiny["lora"], loras / "first.safetensors")
    fifth = put(tiny["lora_xl"], loras / "fifth.safetensors")
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA_V1)
    db.execute("INSERT INTO roots (id, path, layout, added_at) VALUES (1, ?, 'plain', 0)",
               (str(loras),))
    for file_id, file in ((1, first), (5, fifth)):
        db.execute("INSERT INTO files (id, path, root_id, name, status, size, mtime_ns, "
                   "first_seen, last_seen, updated_at) VALUES (?, ?, 1, ?, 'ok', 1, 1, 0, 0, 0)",
                   (file_id, str(file), file.stem))
    db.execute("UPDATE files SET notes = 'keep me' WHERE id = 5")
    db.execute("INSERT INTO tags (file_id, tag) VALUES (5, 'style')")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with Store.open(path) as store:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        scan(store, jobs=1)  # device and inode differ from the rows: both read again, in place
        kept = find_entry(store, "fifth")
        assert (kept.id, kept.tags, kept.notes, kept.kind) == (5, ["style"], "keep me", "lora")
        assert find_entry(store, "first").id == 1
        remove(store, kept, delete_file=True)
        put(tiny["lora"], loras / "newer.safetensors")
        scan(store, jobs=1)
        assert find_entry(store, "newer").id == 6
    with Store.open(path) as store:  # opened again: nothing more to migrate
        assert [e.id for e in list_entries(store, Filters())] == [1, 6]


def test_help_lists_every_command_and_the_catalog_group_is_built_on_use():
    top = run_cli("--help")
    assert top.returncode == 0
    for command in ("inspect", "convert", "plan", "merge", "blocks", "recipe", "catalog"):
        assert f"  {command} " in top.stdout, top.stdout
    sub = run_cli("catalog", "--help")
    assert sub.returncode == 0
    assert "The model library" in sub.stdout
    for command in ("add-root", "remove-root", "roots", "scan", "list", "show", "tag", "note",
                    "rate", "dupes", "lineage", "rm"):
        assert f"  {command} " in sub.stdout, sub.stdout
