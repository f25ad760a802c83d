"""Render candidates from the command line's references: distinct labels, as the user named
them, and distinct image folders."""

from __future__ import annotations

import pytest

from mergekit_sd.render.candidates import collect_candidates, slug
from mergekit_sd.testing.checkpoints import write_checkpoint


def _candidates(folder, names):
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            write_checkpoint(path, "sd1", seed=1)
    return collect_candidates([str(folder / n) for n in names])


def _labels(folder, names):
    return [c.label for c in _candidates(folder, names)]


@pytest.mark.parametrize(("names", "labels", "folders"), [
    (["sd1.safetensors", "sd1-2.safetensors", "x/sd1.safetensors"], ["sd1", "sd1-2", "sd1-3"],
     ["sd1", "sd1-2", "sd1-3"]),
    # names that meet only as folders keep their labels; the later folder gets the number
    (["my model.safetensors", "my_model.safetensors"], ["my model", "my_model"],
     ["my_model", "my_model-2"]),
    (["Mix.safetensors", "x/mix.safetensors"], ["Mix", "mix"], ["Mix", "mix-2"]),
    (["a b.safetensors", "a_b.safetensors", "名前.safetensors", "写真.safetensors"],
     ["a b", "a_b", "名前", "写真"], ["a_b", "a_b-2", "candidate", "candidate-2"]),
    (["ünïcode 名前 x.safetensors", "-2.safetensors", "._-x.safetensors"],
     ["ünïcode 名前 x", "-2", "._-x"], ["unicode_x", "2", "x"]),
])
def test_labels_stay_as_named_and_image_folders_are_distinct(tmp_path, names, labels,
                                                            folders):
    found = _candidates(tmp_path, names)
    assert [c.label for c in found] == labels
    assert [c.folder for c in found] == folders


@pytest.mark.parametrize("label", ["名前", "-x", "--", ".-.", "é", "a" * 300])
def test_no_folder_starts_with_a_dash_or_a_dot(label):
    for suffix in ("", "-2"):
        folder = slug(label, suffix)
        assert folder and folder[0] not in "-." and folder.endswith(suffix)


LONG = "a" * 119


@pytest.mark.parametrize("names", [
    [f"{LONG}-v1.safetensors", f"{LONG}-v2.safetensors"],  # alike in their first 120
    [f"{LONG}-v1.safetensors", f"x/{LONG}-v1.safetensors"],  # one name twice
    ["b" * 200 + ".safetensors", "x/" + "b" * 200 + ".safetensors",
     "y/" + "b" * 200 + ".safetensors"],
])
def test_long_names_give_distinct_labels_and_folders_at_once(tmp_path, names):
    import signal

    def stuck(*_):
        raise AssertionError("the labels were still being made unique after 10 s")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(10)
    try:
        labels = _labels(tmp_path, names)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert len(set(labels)) == len(labels)
    assert labels[0] == names[0].removesuffix(".safetensors")  # the name itself, uncut
    folders = [c.folder for c in _candidates(tmp_path, names)]
    assert len({f.casefold() for f in folders}) == len(labels)
    assert all(len(f) <= 120 for f in folders)
    assert folders[-1].endswith(labels[-1][-4:])  # the end that tells them apart is kept


@pytest.mark.parametrize("name", ["loop", "loop.yaml", "a" * 300, "a" * 300 + ".yaml"])
def test_a_candidate_path_that_cannot_be_opened_is_one_sentence(tmp_path, name):
    from mergekit_sd.errors import UserError

    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "loop.yaml").symlink_to("loop.yaml")
    with pytest.raises(UserError,
                       match=r"^candidate .*: (cannot be opened \(.*\)|does not exist)$"):
        collect_candidates([str(tmp_path / name)])


def test_a_render_shows_the_names_given_where_only_their_folders_collide(tmp_path):
    """The sheet, manifest and PNG `Model:` say `a_b` (a file that exists), not `a_b-2`."""
    pytest.importorskip("torch")
    from PIL import Image

    from mergekit_sd.render.grids import parse_grid
    from mergekit_sd.render.manifest import read_manifest
    from mergekit_sd.render.presets import get_preset
    from mergekit_sd.render.runner import RenderOptions, render_candidates

    grid = parse_grid("prompts: [{name: cat, text: a cat}]\nseeds: [5]\nsize: 64\nsteps: 1\n",
                      "grid.yaml")
    out = tmp_path / "out"
    found = _candidates(tmp_path, ["a b.safetensors", "a_b.safetensors"])
    render_candidates(found, RenderOptions(grid, get_preset("standard"), out))
    manifest = read_manifest(out)
    assert [c["label"] for c in manifest["candidates"]] == ["a b", "a_b"]
    assert [(i["candidate"], i["file"]) for i in manifest["images"]] == [
        ("a b", "images/a_b/cat-5.png"), ("a_b", "images/a_b-2/cat-5.png")]
    with Image.open(out / "images/a_b-2/cat-5.png") as png:
        assert "Model: a_b," in png.text["parameters"]
