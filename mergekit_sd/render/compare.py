"""`compare`: two candidates on the same grid, side by side per prompt and seed, with an
optional difference heat map, plus one sheet of all pairs; every pair's mean difference goes
into the manifest, heat map or not."""

from __future__ import annotations

from collections.abc import Callable

from mergekit_sd.errors import UserError
from mergekit_sd.progress import CancelToken, ProgressCallback, no_progress
from mergekit_sd.recipe.refs import Resolver
from mergekit_sd.render.candidates import RenderCandidate
from mergekit_sd.render.estimate import FirstBatch
from mergekit_sd.render.folder import AB_DIR, AB_SHEET, ab_file
from mergekit_sd.render.outputs import png_bytes
from mergekit_sd.render.runner import RenderOptions, RenderResult, render_candidates


def compare_candidates(a: RenderCandidate, b: RenderCandidate, options: RenderOptions,
                       with_heat: bool = True, resolver: Resolver | None = None,
                       progress: ProgressCallback = no_progress,
                       cancel: CancelToken | None = None,
                       on_first_batch: Callable[[FirstBatch], None] | None = None
                       ) -> RenderResult:
    from PIL import Image

    from mergekit_sd.render.sheets import CELL, ab_sheet, grid_sheet, heat_map

    if a.layout.family != b.layout.family:
        raise UserError(f"compare: {a.label} and {b.label} are different architectures; "
                        "A/B sheets compare the same prompt and noise on the same pipeline")
    options.command = "compare"
    result = render_candidates([a, b], options, resolver, progress, cancel, on_first_batch)
    grid, folder = options.grid, result.folder
    pairs, rows, cells = [], [], {}
    for prompt in grid.prompts:
        for seed in grid.seeds:
            with Image.open(result.image_file(a.label, prompt.name, seed)) as image:
                left = image.convert("RGB")
            with Image.open(result.image_file(b.label, prompt.name, seed)) as image:
                right = image.convert("RGB")
            title = f"{prompt.name}, seed {seed}: {prompt.text}"
            file = ab_file(prompt.name, seed)
            sheet = ab_sheet(title, a.label, b.label, left, right, with_heat)
            folder.write(file, png_bytes(sheet))
            entry = {"prompt_name": prompt.name, "seed": seed, "file": file}
            row = len(rows)
            rows.append(f"{prompt.name}\nseed {seed}")
            cells[(row, 0)], cells[(row, 1)] = _thumb(left, CELL), _thumb(right, CELL)
            # the mean is the one objective score, and cheap: kept with or without the map
            heat, mean = heat_map(left, right)
            entry["mean_abs_difference"] = round(mean, 3)
            if with_heat:
                cells[(row, 2)] = _thumb(heat, CELL)
            pairs.append(entry)
    folder.sync(AB_DIR)
    columns = [f"A: {a.label}", f"B: {b.label}"] + (["|A-B|"] if with_heat else [])
    sheet = grid_sheet(f"{grid.name}: A/B", rows, columns, cells)
    folder.write(AB_SHEET, png_bytes(sheet))
    result.manifest.sheets.update(ab=pairs, ab_sheet=AB_SHEET)
    folder.write_manifest(result.manifest)
    folder.sync()
    return result


def _thumb(image, side: int):
    small = image.copy()
    small.thumbnail((side, side))
    return small
