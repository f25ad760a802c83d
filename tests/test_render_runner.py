"""render_candidates as a whole: which weights each candidate renders with, whatever the order of
the candidates, and what the output folder holds."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from mergekit_sd.render.candidates import collect_candidates  # noqa: E402
from mergekit_sd.render.grids import parse_grid  # noqa: E402
from mergekit_sd.render.manifest import read_manifest  # noqa: E402
from mergekit_sd.render.presets import get_preset  # noqa: E402
from mergekit_sd.render.runner import RenderOptions, render_candidates  # noqa: E402
from mergekit_sd.testing.checkpoints import write_checkpoint  # noqa: E402

GRID = "prompts: [{name: cat, text: a photo of a cat}]\nseeds: [5]\nsize: 64\nsteps: 2\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runner-models")
    for name, variant, seed in [("a", "sd1", 1), ("b", "sd1", 2), ("unet", "sd1-unet", 3)]:
        write_checkpoint(folder / f"{name}.safetensors", variant, seed=seed)
    return folder


def _render(models, names, out, grid=GRID, overwrite=False):
    torch.set_num_threads(1)
    options = RenderOptions(parse_grid(grid, "grid.yaml"), get_preset("standard"), out,
                            overwrite=overwrite)
    candidates = collect_candidates([str(models / f"{n}.safetensors") for n in names])
    return render_candidates(candidates, options)


def test_a_unet_only_candidate_keeps_the_base_checkpoints_other_weights_in_any_order(
        models, tmp_path):
    alone = _render(models, ["a", "unet"], tmp_path / "alone")
    after_b = _render(models, ["a", "b", "unet"], tmp_path / "after-b")
    assert (alone.image_file("unet", "cat", 5).read_bytes()
            == after_b.image_file("unet", "cat", 5).read_bytes())
    entry = read_manifest(tmp_path / "after-b")["candidates"][2]
    assert entry["label"] == "unet"
    assert entry["components"] == {"text_encoder": "a", "unet": "unet", "vae": "a"}


def test_a_prompt_longer_than_the_text_encoder_reads_is_one_note_not_a_warning(models, tmp_path,
                                                                               capfd):
    long = "a photo of a cat " + "very " * 100
    grid = f"prompts: [{{name: long, text: {long}}}]\nseeds: [5]\nsize: 64\nsteps: 1\n"
    result = _render(models, ["a"], tmp_path / "out", grid)
    assert result.manifest.notes == [
        "prompt long: 310 tokens, cut to the 16 the text encoder reads"]
    assert "indexing errors" not in capfd.readouterr().err


def test_a_run_that_ends_early_claims_its_files_and_the_next_run_removes_them(models,
                                                                               tmp_path):
    """The run before's manifest and sheets never describe a mix of old and new images, and
    the manifest a stopped run leaves lists its files, so --overwrite clears them all."""
    from mergekit_sd.errors import Cancelled
    from mergekit_sd.progress import CancelToken

    out = tmp_path / "out"
    _render(models, ["a", "b"], out)
    assert read_manifest(out)["complete"] is True
    assert (out / "contact-sheet.png").exists()

    token = CancelToken()
    options = RenderOptions(parse_grid(GRID.replace("steps: 2", "steps: 1"), "grid.yaml"),
                            get_preset("standard"), out, overwrite=True)
    candidates = collect_candidates([str(models / f"{n}.safetensors") for n in ("a", "unet")])
    with pytest.raises(Cancelled):
        render_candidates(candidates, options, progress=lambda *_: token.cancel(),
                          cancel=token)
    stopped = read_manifest(out)
    assert stopped["complete"] is False
    # the images written before the stop, and only those, are listed as done
    assert [i["file"] for i in stopped["images"]] == ["images/a/cat-5.png"]
    assert stopped["outputs"] == ["images/a/cat-5.png", "images/unet/cat-5.png",
                                  "contact-sheet.png", "manifest.json"]
    assert not (out / "contact-sheet.png").exists() and not (out / "images" / "b").exists()
    assert (out / "images" / "a" / "cat-5.png").exists()  # the one image it wrote

    _render(models, ["b"], out, overwrite=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "contact-sheet.png", "images", "images/b", "images/b/cat-5.png", "manifest.json"]
