"""Render outputs: PNG parameters, atomic writes, sheets and heat maps, the tiny tokenizer."""

from __future__ import annotations

import pytest

from mergekit_sd.io.writer import write_bytes_atomic
from mergekit_sd.render.outputs import a1111_parameters, png_bytes
from mergekit_sd.render.tiny_tokenizer import TINY_CLIP, TINY_DIR, build_clip_tokenizer

Image = pytest.importorskip("PIL.Image")


def test_parameters_read_as_automatic1111_infotext():
    text = a1111_parameters("a cat, sitting", "blurry", {
        "Steps": 4, "Sampler": "Euler a", "CFG scale": 1.0, "Seed": 7, "Size": "64x64",
        "Model hash": None, "Model": "mix@alpha=0.3", "Lora hashes": "lcm: 0123456789ab"})
    assert text == ("a cat, sitting\nNegative prompt: blurry\nSteps: 4, Sampler: Euler a, "
                    "CFG scale: 1.0, Seed: 7, Size: 64x64, Model: mix@alpha=0.3, "
                    'Lora hashes: "lcm: 0123456789ab"')


def test_a_png_carries_its_parameters_and_the_same_image_gives_the_same_bytes(tmp_path):
    image = Image.new("RGB", (8, 8), (10, 200, 30))
    data = png_bytes(image, "a cat\nSteps: 4")
    assert data == png_bytes(image.copy(), "a cat\nSteps: 4")
    path = write_bytes_atomic(tmp_path / "out" / "x.png", data)
    assert not list(tmp_path.rglob("*.partial"))
    with Image.open(path) as back:
        assert back.text["parameters"] == "a cat\nSteps: 4"


def test_the_heat_map_is_black_for_equal_images_and_bright_where_they_differ():
    from mergekit_sd.render.sheets import heat_map

    a = Image.new("RGB", (16, 16), (100, 100, 100))
    b = a.copy()
    b.paste((255, 255, 255), (0, 0, 8, 16))  # left half differs by 155
    same, mean_same = heat_map(a, a)
    diff, mean_diff = heat_map(a, b)
    assert same.getextrema() == ((0, 0), (0, 0), (0, 0)) and mean_same == 0
    assert diff.getpixel((0, 0)) == (252, 255, 164) and diff.getpixel((15, 0)) == (0, 0, 0)
    assert mean_diff == pytest.approx(155 / 2)


def test_a_contact_sheet_has_a_cell_per_prompt_seed_and_candidate():
    from mergekit_sd.render.sheets import CELL, LABEL_WIDTH, PAD, grid_sheet

    cells = {(r, c): Image.new("RGB", (64, 64), (r * 90, c * 90, 0))
             for r in range(3) for c in range(2)}
    sheet = grid_sheet("title", ["a\nseed 1", "a\nseed 2", "b\nseed 1"], ["x", "y"], cells)
    assert sheet.width == LABEL_WIDTH + 2 * (CELL + PAD) + PAD
    # the last cell is the (row 2, column 1) image, enlarged
    x, y = LABEL_WIDTH + CELL + PAD + CELL // 2, sheet.height - PAD - CELL // 2
    assert sheet.getpixel((x, y)) == (180, 90, 0)


def test_the_shipped_tiny_tokenizer_is_what_its_builder_writes(tmp_path):
    build_clip_tokenizer((TINY_DIR / "corpus.txt").read_text(encoding="utf-8"), tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (TINY_CLIP / name).read_bytes()


def test_the_tiny_tokenizer_loads_offline_and_fits_tiny_text_encoders():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(TINY_CLIP), local_files_only=True)
    ids = tokenizer("a photo of a woman with freckles", padding="max_length",
                    max_length=16, truncation=True).input_ids
    assert len(tokenizer) == 772 and len(ids) == 16
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert max(ids) < 772
    short = tokenizer("a red house").input_ids
    assert tokenizer.decode(short, skip_special_tokens=True) == "a red house"


def _column_title(sheet, x: int, width: int):
    """The pixels of the column title that starts at `x`."""
    from mergekit_sd.render.sheets import FONT_SIZE, PAD

    top = PAD + FONT_SIZE + 4 + PAD
    return sheet.crop((x, top, x + width, top + FONT_SIZE + 4)).tobytes()


NAMES = [f"myMerge_realisticVision_v51_x_dreamshaper8_alpha{a}" for a in ("0.25", "0.50", "0.75")]


def test_contact_sheet_columns_whose_labels_differ_at_the_end_read_differently():
    from mergekit_sd.render.sheets import CELL, LABEL_WIDTH, PAD, grid_sheet

    cells = {(0, c): Image.new("RGB", (64, 64)) for c in range(3)}
    sheet = grid_sheet("title", ["face\nseed 1"], NAMES, cells)
    titles = {_column_title(sheet, LABEL_WIDTH + c * (CELL + PAD), CELL) for c in range(3)}
    assert len(titles) == 3


def test_ab_sheet_labels_keep_the_end_that_tells_the_candidates_apart():
    from mergekit_sd.render.sheets import MIN_AB_CELL, PAD, ab_sheet

    image = Image.new("RGB", (64, 64))
    first = ab_sheet("face, seed 1", NAMES[0], NAMES[2], image, image)
    second = ab_sheet("face, seed 1", NAMES[1], NAMES[2], image, image)
    assert _column_title(first, PAD, MIN_AB_CELL) != _column_title(second, PAD, MIN_AB_CELL)


def test_a_long_label_is_cut_in_the_middle_to_fit():
    from PIL import ImageDraw

    from mergekit_sd.render.sheets import _fit_text, _font

    draw = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    text = "A: " + NAMES[2]
    short = _fit_text(draw, text, 192, middle=True)
    assert "…" in short and short.startswith("A: myM") and short.endswith("alpha0.75")
    assert draw.textlength(short, font=_font()) <= 192
    assert _fit_text(draw, text, 1000, middle=True) == text
    assert _fit_text(draw, text, 192).endswith("…")  # titles, prose: cut at the end
