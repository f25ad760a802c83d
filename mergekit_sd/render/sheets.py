"""Contact sheets (rows: prompt and seed, columns: candidates), A/B sheets and difference heat
maps, drawn with Pillow."""

from __future__ import annotations

from functools import cache

CELL = 256  # longest side of an image on a contact sheet
MIN_AB_CELL = 192  # A/B sheets show images at their size, small ones enlarged to this
PAD = 6
LABEL_WIDTH = 150  # the left column holding row labels
FONT_SIZE = 13
BACKGROUND = (24, 24, 24)
TEXT = (230, 230, 230)
# A difference of this much (mean over R, G, B, of 255) or more shows at full heat: merges that
# change a picture's content differ by far more, while dithering and rounding stay near black.
HEAT_FULL_SCALE = 64.0
# black -> purple -> red-orange -> yellow -> white, at evenly spaced heat values
_HEAT_STOPS = ((0, 0, 0), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164))


@cache
def _font():
    from PIL import ImageFont

    return ImageFont.load_default(size=FONT_SIZE)


def _line_height() -> int:
    return FONT_SIZE + 4


def _fit_text(draw, text: str, width: int, middle: bool = False) -> str:
    """`text`, shortened with an ellipsis to fit `width` pixels: at the end, or with `middle`
    in the middle. Labels take the middle one: candidates' names (`…_alpha0.25`, `…-v2`) and
    prompt names differ in their ends, which an ellipsis at the end would hide."""
    if draw.textlength(text, font=_font()) <= width:
        return text
    for kept in range(len(text) - 1, -1, -1):
        tail = (kept + 1) // 2 if middle else 0  # the end gets the odd character
        short = text[:kept - tail] + "…" + (text[len(text) - tail:] if tail else "")
        if draw.textlength(short, font=_font()) <= width:
            return short
    return "…"


def _scaled(image, side: int):
    from PIL import Image

    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size == image.size:
        return image
    method = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST
    return image.resize(size, method)


def grid_sheet(title: str, rows: list[str], columns: list[str],
               cells: dict[tuple[int, int], object], cell: int = CELL,
               label_width: int = LABEL_WIDTH):
    """A sheet of `cells[(row, column)]` images under column titles, beside row labels
    (several lines where a label holds newlines)."""
    from PIL import Image, ImageDraw

    line = _line_height()
    header = PAD + line + PAD + line + PAD  # title, then column titles
    width = label_width + len(columns) * (cell + PAD) + PAD
    height = header + len(rows) * (cell + PAD)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, PAD), _fit_text(draw, title, width - 2 * PAD), font=_font(), fill=TEXT)
    for c, name in enumerate(columns):
        x = label_width + c * (cell + PAD)
        draw.text((x, PAD + line + PAD), _fit_text(draw, name, cell, middle=True),
                  font=_font(), fill=TEXT)
    for r, name in enumerate(rows):
        y = header + r * (cell + PAD)
        for i, part in enumerate(name.split("\n")):
            draw.text((PAD, y + i * line),
                      _fit_text(draw, part, label_width - 2 * PAD, middle=True),
                      font=_font(), fill=TEXT)
        for c in range(len(columns)):
            image = cells.get((r, c))
            if image is not None:
                sheet.paste(_scaled(image.convert("RGB"), cell),
                            (label_width + c * (cell + PAD), y))
    return sheet


def heat_map(a, b):
    """(heat map image, mean absolute difference of 255) of two same-size images."""
    import numpy as np
    from PIL import Image

    left = np.asarray(a.convert("RGB"), dtype=np.float32)
    right = np.asarray(b.convert("RGB"), dtype=np.float32)
    diff = np.abs(left - right).mean(axis=2)
    heat = np.clip(diff / HEAT_FULL_SCALE, 0.0, 1.0) * (len(_HEAT_STOPS) - 1)
    low = np.minimum(np.floor(heat).astype(np.int64), len(_HEAT_STOPS) - 2)
    frac = (heat - low)[..., None]
    stops = np.asarray(_HEAT_STOPS, dtype=np.float32)
    colours = stops[low] * (1 - frac) + stops[low + 1] * frac
    return Image.fromarray(np.round(colours).astype(np.uint8), "RGB"), float(diff.mean())


def ab_sheet(title: str, label_a: str, label_b: str, a, b, with_heat: bool = True,
             cell: int | None = None):
    """One prompt and seed: A and B side by side (and their difference heat map)."""
    side = cell or max(MIN_AB_CELL, max(a.size))
    columns = [f"A: {label_a}", f"B: {label_b}"]
    cells = {(0, 0): a, (0, 1): b}
    if with_heat:
        heat, mean = heat_map(a, b)
        columns.append(f"|A-B| (mean {mean:.1f})")
        cells[(0, 2)] = heat
    return grid_sheet(title, [""], columns, cells, cell=side, label_width=PAD)
