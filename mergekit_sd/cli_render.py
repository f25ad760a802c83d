"""`mergekit-sd render` and `mergekit-sd compare`: few-step renders of candidates on a fixed prompt
grid, and A/B sheets. Registered lazily by cli.py (torch and diffusers load only here)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from mergekit_sd.cli import AsJson, CatalogOption, _CatalogOnDemand
from mergekit_sd.errors import UserError

render_app = typer.Typer(add_completion=False, rich_markup_mode=None)
compare_app = typer.Typer(add_completion=False, rich_markup_mode=None)

GRID_HELP = "Prompt grid YAML, or a shipped one by name (default, tiny)."
PRESET_HELP = ("standard, lcm, lightning-2/4/8, turbo, hyper-1/2/4/8 or schnell "
               "(see README: Renders and A/B grids).")
LORA_HELP = ("The preset's LoRA: a path, catalog name or hf://org/repo/file; `none` for "
             "candidates that have it merged in (default: the preset's official one).")
CONFIG_DIR_HELP = "A local diffusers-format model folder to take tokenizers from."
TEXT_ENCODER_HELP = ("A CLIP-L, CLIP-G or T5-XXL file (e.g. ComfyUI's clip_l.safetensors) for "
                     "candidates without that text encoder (SD3.5, FLUX.1 releases); "
                     "repeatable.")
VAE_HELP = "A VAE file (e.g. FLUX.1's ae.safetensors) for candidates without a VAE."

# The options render and compare share, declared once.
Grid = Annotated[str | None, typer.Option("--grid", help=GRID_HELP)]
Preset = Annotated[str, typer.Option("--preset", help=PRESET_HELP)]
Steps = Annotated[int | None, typer.Option("--steps", help="Override the preset's or grid's "
                                                           "steps.")]
Guidance = Annotated[float | None, typer.Option("--guidance", help="Override the guidance "
                                                                   "(CFG).")]
Scheduler = Annotated[str | None, typer.Option("--scheduler", help="euler, euler_a, dpmpp_2m, "
                                                                   "ddim, lcm, unipc, flow_euler "
                                                                   "...")]
Lora = Annotated[str | None, typer.Option("--lora", help=LORA_HELP)]
LoraScale = Annotated[float | None, typer.Option("--lora-scale", help="Weight of the fused "
                                                                      "LoRA.")]
Size = Annotated[str | None, typer.Option("--size", help="WIDTHxHEIGHT in multiples of 64 up "
                                                         "to 4096, e.g. 512x768 (default: the "
                                                         "grid's).")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto, fp32, fp16 or bf16 (also float32, "
                                                   "float16, bfloat16).")]
Batch = Annotated[int | None, typer.Option("--batch", help="Images per batch (default: fill "
                                                           "the device).")]
ConfigDir = Annotated[Path | None, typer.Option("--config-dir", help=CONFIG_DIR_HELP)]
TextEncoders = Annotated[list[str], typer.Option("--text-encoder", help=TEXT_ENCODER_HELP)]
VaeFile = Annotated[str | None, typer.Option("--vae", help=VAE_HELP)]
Assignments = Annotated[list[str], typer.Option("--set", help="STEP.PARAM=VALUE for recipes.")]
Html = Annotated[bool, typer.Option("--html", help="Also write index.html.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Render into an --out that is not "
                                                             "empty: a previous render's files "
                                                             "(those its manifest lists) are "
                                                             "replaced, nothing else.")]
Pull = Annotated[bool, typer.Option("--pull", help="Download hf:// references the catalog does "
                                                   "not have yet.")]
Offline = Annotated[bool, typer.Option("--offline", help="Never call out: a tokenizer missing "
                                                         "from the Hugging Face cache is an "
                                                         "error, not a download "
                                                         "(HF_HUB_OFFLINE=1 for this run).")]


def _network(pull: bool, offline: bool) -> None:
    """--offline before anything imports huggingface_hub's settings; --pull contradicts it."""
    if pull and offline:
        raise UserError("--pull downloads and --offline forbids it; choose one")
    if offline:
        from mergekit_sd.render.assets import forbid_downloads

        forbid_downloads()


def _size(text: str | None) -> tuple[int, int] | None:
    """WIDTHxHEIGHT (`x` or `X`) within a grid file's own limits (checked before anything is
    built: a huge size would only fail allocating the first batch). One number is refused:
    the help says WIDTHxHEIGHT, and `--size 512` could mean a square or a width."""
    from mergekit_sd.render.grids import MAX_SIDE, SIZE_STEP

    if text is None:
        return None
    width, sep, height = text.lower().partition("x")
    try:
        size = (int(width), int(height)) if sep else None
    except ValueError:
        size = None
    if size is None or min(size) <= 0 or max(size) > MAX_SIDE \
            or any(side % SIZE_STEP for side in size):
        raise UserError(f"--size {text!r}: write WIDTHxHEIGHT in multiples of {SIZE_STEP} up "
                        f"to {MAX_SIDE}, e.g. 512x768")
    return size


def _check_numbers(guidance: float | None, lora_scale: float | None) -> None:
    """NaN and infinity would render (and make manifest.json invalid JSON); a grid file's
    guidance has the same 0 to 30 range."""
    from mergekit_sd.render.grids import MAX_GUIDANCE

    if guidance is not None and not (math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise UserError(f"--guidance {guidance:g}: give a number from 0 to {MAX_GUIDANCE:g}")
    if lora_scale is not None and not math.isfinite(lora_scale):
        raise UserError(f"--lora-scale {lora_scale:g}: give a finite number, e.g. 1 or 0.8")


def _options(grid, preset, out, device, dtype, steps, guidance, scheduler, lora, lora_scale,
             size, batch, config_dir, html, overwrite, text_encoders=(), vae=None):
    from mergekit_sd.io.dtypes import RENDER_DTYPES, parse_dtype
    from mergekit_sd.render.folder import check_usable
    from mergekit_sd.render.grids import load_grid
    from mergekit_sd.render.presets import get_preset
    from mergekit_sd.render.runner import RenderOptions

    if steps is not None and steps < 1:
        raise UserError(f"--steps {steps}: give at least 1")
    if batch is not None and batch < 1:
        raise UserError(f"--batch {batch}: give at least 1")
    _check_numbers(guidance, lora_scale)
    dtype = parse_dtype(dtype, RENDER_DTYPES, "render")  # before anything is loaded
    options = RenderOptions(load_grid(grid), get_preset(preset), out, device, dtype, steps,
                            guidance, scheduler, lora, lora_scale, _size(size), batch,
                            config_dir, html=html, overwrite=overwrite,
                            text_encoders=list(text_encoders), vae=vae)
    # said before candidates are read or anything built; creates nothing (the run creates
    # --out once every input is checked, render/folder.py)
    check_usable(out)
    return options


def _report(result, as_json: bool) -> None:
    manifest = result.manifest
    if as_json:
        import json

        typer.echo(json.dumps({"out": str(result.out), "manifest": str(result.out /
                                                                       "manifest.json"),
                               "sheets": manifest.sheets,
                               "images": len(manifest.images)}))
        return
    for pipeline in manifest.pipelines:
        _echo(f"{pipeline.family}: pipeline built from {pipeline.built_from} in "
              f"{pipeline.build_s:.2f} s ({pipeline.preset}, {pipeline.scheduler}, "
              f"{_count(pipeline.steps, 'step')}, guidance {pipeline.guidance:g}, "
              f"{pipeline.dtype}, batch {pipeline.batch_size})")
    for cand in manifest.candidates:
        how = "pipeline built" if any(p.built_from == cand.label for p in manifest.pipelines) \
            else "weights swapped in"
        _echo(f"  {cand.label}: {how} {cand.load_s:.2f} s, {_count(cand.images, 'image')} "
              f"{cand.render_s:.2f} s")
    for note in manifest.notes:
        _echo(f"note: {note}")
    _echo(f"wrote {_count(len(manifest.images), 'image')}, {manifest.sheets['contact']}"
          + "".join(f", {manifest.sheets[k]}" for k in ("ab_sheet", "html")
                    if k in manifest.sheets)
          + f" and manifest.json to {result.out}")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _echo(line: str) -> None:
    """A summary line wrapped at the terminal's width (80 columns must stay readable), its
    continuation lines indented under it; words (paths, labels) are never broken."""
    import shutil
    import textwrap

    width = shutil.get_terminal_size().columns
    indent = " " * (len(line) - len(line.lstrip()) + 4)
    typer.echo(textwrap.fill(line, width=max(width, 40), subsequent_indent=indent,
                             break_long_words=False, break_on_hyphens=False))


def _run(work, html: bool, as_json: bool):
    from mergekit_sd.cli_progress import rich_progress
    from mergekit_sd.render.html import write_html

    if as_json:
        result = work(None)
    else:
        with rich_progress() as progress:
            result = work(progress)
    if html:
        write_html(result)
    _report(result, as_json)


@render_app.command("render")
def render(
    candidates: list[str] = typer.Argument(..., help="Checkpoint files, catalog names, or "
                                                     "recipes (a sweep: every candidate, "
                                                     "merged in memory)."),
    out: Path = typer.Option(..., "-o", "--out",
                                  help="Folder for images, sheets and manifest."),
    grid: Grid = None,
    preset: Preset = "standard",
    steps: Steps = None,
    guidance: Guidance = None,
    scheduler: Scheduler = None,
    lora: Lora = None,
    lora_scale: LoraScale = None,
    size: Size = None,
    device: Device = "cpu",
    dtype: Dtype = "auto",
    batch: Batch = None,
    config_dir: ConfigDir = None,
    text_encoders: TextEncoders = [],  # noqa: B006 (only read)
    vae: VaeFile = None,
    assignments: Assignments = [],  # noqa: B006 (only read)
    html: Html = False,
    overwrite: Overwrite = False,
    as_json: AsJson = False,
    catalog: CatalogOption = None,
    pull: Pull = False,
    offline: Offline = False,
) -> None:
    """Render every candidate on a prompt grid with one pipeline per architecture.

    Writes images/CANDIDATE/PROMPT-SEED.png (with AUTOMATIC1111 parameters), contact-sheet.png
    (rows: prompt and seed; columns: candidates) and manifest.json into --out, which must be
    new or empty unless --overwrite (that replaces only a previous render's files).
    """
    from mergekit_sd.cli_startup import import_torch
    from mergekit_sd.render.candidates import collect_candidates
    from mergekit_sd.render.runner import render_candidates

    _network(pull, offline)
    options = _options(grid, preset, out, device, dtype, steps, guidance, scheduler, lora,
                       lora_scale, size, batch, config_dir, html, overwrite, text_encoders,
                       vae)
    import_torch()  # Ctrl-C held while it loads (cli_startup)
    resolver = _CatalogOnDemand(catalog, pull, offline)
    found = collect_candidates(candidates, resolver, assignments)
    say = _estimate(resolver, pull, offline)
    _run(lambda progress: render_candidates(found, options, resolver, progress or _quiet,
                                            on_first_batch=say), html, as_json)


@compare_app.command("compare")
def compare(
    a: str = typer.Argument(..., help="Candidate A: a file, catalog name or single-output "
                                      "recipe."),
    b: str = typer.Argument(..., help="Candidate B."),
    out: Path = typer.Option(..., "-o", "--out",
                                  help="Folder for images, A/B sheets and manifest."),
    grid: Grid = None,
    preset: Preset = "standard",
    steps: Steps = None,
    guidance: Guidance = None,
    scheduler: Scheduler = None,
    lora: Lora = None,
    lora_scale: LoraScale = None,
    size: Size = None,
    device: Device = "cpu",
    dtype: Dtype = "auto",
    batch: Batch = None,
    config_dir: ConfigDir = None,
    text_encoders: TextEncoders = [],  # noqa: B006 (only read)
    vae: VaeFile = None,
    assignments: Assignments = [],  # noqa: B006 (only read)
    no_heat: bool = typer.Option(False, "--no-heat", help="Leave out the difference heat "
                                                          "map (the manifest keeps each "
                                                          "pair's mean difference)."),
    html: Html = False,
    overwrite: Overwrite = False,
    as_json: AsJson = False,
    catalog: CatalogOption = None,
    pull: Pull = False,
    offline: Offline = False,
) -> None:
    """Render two candidates on the same grid and noise, and lay them out side by side.

    Writes ab/PROMPT-SEED.png (A, B and their difference heat map), ab-sheet.png, the images,
    contact-sheet.png and manifest.json (with the mean difference of every pair) into --out,
    which must be new or empty unless --overwrite (that replaces only a previous render's files).
    """
    from mergekit_sd.cli_startup import import_torch
    from mergekit_sd.render.candidates import collect_candidates
    from mergekit_sd.render.compare import compare_candidates

    _network(pull, offline)
    options = _options(grid, preset, out, device, dtype, steps, guidance, scheduler, lora,
                       lora_scale, size, batch, config_dir, html, overwrite, text_encoders,
                       vae)
    import_torch()  # Ctrl-C held while it loads (cli_startup)
    resolver = _CatalogOnDemand(catalog, pull, offline)
    found = collect_candidates([a, b], resolver, assignments)
    if len(found) != 2:
        raise UserError(f"compare takes two candidates; {a} and {b} give {len(found)} "
                        "(a sweep recipe gives one per value: use --set to pick one, or "
                        "render)")
    say = _estimate(resolver, pull, offline)
    _run(lambda progress: compare_candidates(found[0], found[1], options, not no_heat,
                                             resolver, progress or _quiet,
                                             on_first_batch=say), html, as_json)


def _estimate(resolver, pull: bool, offline: bool):
    """How long the rest takes, measured on the first batch (render/estimate.py), when it is
    long enough to matter: on stderr, with or without --json, since stdout carries the
    summary or the JSON document; above the progress bar while one is drawn (rich shows
    what is written to stderr there)."""
    from mergekit_sd.render.estimate import estimate_line

    def say(first) -> None:
        line = estimate_line(first, few_step=lambda preset, family: few_step_option(
            preset, family, resolver, pull, offline))
        if line is not None:
            # sys.stderr as it is now: while a bar is drawn, rich's stand-in for it prints the
            # line above the bar (typer.echo reaches the terminal's own buffer behind the
            # stand-in and would write into the bar's line)
            print(line, file=sys.stderr, flush=True)

    return say


def few_step_option(preset: str, family: str, resolver, pull: bool, offline: bool
                    ) -> str | None:
    """How the estimate may suggest `preset` (its LoRA is the family's default one):
    plainly where the LoRA is at hand (the Hugging Face cache or the catalog) or this run
    pulls; with `--pull` where it can be downloaded; not at all offline (--offline, or
    HF_HUB_OFFLINE), where following the advice would only end in an error."""
    from huggingface_hub import constants

    from mergekit_sd.render.presets import PRESETS
    from mergekit_sd.render.refs import hf_cached

    option = f"--preset {preset}"
    ref = PRESETS[preset].loras.get(family)
    if ref is None or pull or hf_cached(ref) is not None:
        return option
    try:
        resolver(ref)  # the catalog's copy; without --pull nothing is downloaded
        return option
    except (LookupError, UserError):
        pass
    return None if offline or constants.HF_HUB_OFFLINE else f"{option} --pull"


def _quiet(stage: str, done: int, total: int) -> None:
    """No progress output (--json)."""
