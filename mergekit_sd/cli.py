"""The `mergekit-sd` command line: the composition root that wires engine, catalog and TUI.

Heavy libraries (torch, diffusers, transformers) and the upper layers are imported inside the
commands that need them, so `--help` and `inspect` start fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
import typer.core
from typer.core import TyperGroup

from mergekit_sd.cli_interrupt import (
    NOTHING_HALF_WRITTEN,
    interrupt_note,
    on_interrupt,
)
from mergekit_sd.errors import UserError, WorkFailed

# Every command prints plain click help (rich_markup_mode=None), but typer before 0.20 (pinned:
# see pyproject.toml) escapes the "[required]" and "[default: ...]" of that help for rich
# whenever rich is installed, so users saw "\[required]". That flag decides nothing else once
# rich markup is off everywhere (pretty tracebacks read typer.main's own copy of it).
typer.core.HAS_RICH = False

CATALOG_HELP = "Catalog database (default: $MERGEKIT_SD_CATALOG or the user data folder)."
# the options most commands share, for their signatures
CatalogOption = Annotated[Path | None, typer.Option("--catalog", help=CATALOG_HELP)]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
NsfwPreviews = Annotated[bool | None, typer.Option(
    "--nsfw-previews/--sfw-previews",
    help="Save previews rated above PG-13 (default: the config's civitai.nsfw_previews).")]
# Command groups built only when invoked or listed: building the catalog's eleven commands
# costs every other command a few ms of start-up (measured), and `inspect` must start fast.
LAZY_GROUPS = {
    "catalog": ("mergekit_sd.cli_catalog", "catalog_app",
                "The model library: roots, scans, hashes, tags, duplicates, lineage."),
    "search": ("mergekit_sd.cli_remote", "search_app",
               "Search Civitai and Hugging Face for models to pull."),
    "bake": ("mergekit_sd.cli_lora", "bake_app",
             "Bake LoRAs into a checkpoint in one streaming pass."),
    "lora": ("mergekit_sd.cli_lora", "lora_app",
             "LoRA tools: merge several LoRAs into one, extract a LoRA from two checkpoints."),
    "render": ("mergekit_sd.cli_render", "render_app",
               "Render candidates on a prompt grid with few-step presets; contact sheet."),
    "compare": ("mergekit_sd.cli_render", "compare_app",
                "Render two candidates on the same grid and noise; A/B sheets, heat maps."),
}


class _LazyGroups(TyperGroup):
    """The top-level group: its own commands, plus LAZY_GROUPS imported on first use."""

    def list_commands(self, ctx):
        return [*super().list_commands(ctx), *LAZY_GROUPS]

    def get_command(self, ctx, name):
        if name not in LAZY_GROUPS:
            return super().get_command(ctx, name)
        import importlib

        import typer.main

        module, attr, help_text = LAZY_GROUPS[name]
        group = typer.main.get_command(getattr(importlib.import_module(module), attr))
        group.name, group.help, group.short_help = name, help_text, help_text
        return group


app = typer.Typer(
    cls=_LazyGroups,
    name="mergekit-sd",
    help="A workbench for Stable Diffusion checkpoints: inspect, convert, merge, judge.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    # -h as well as --help, here and (click hands it down to child contexts) on every command
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        from mergekit_sd import __version__

        typer.echo(f"mergekit-sd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                 help="Print the version and exit."),
) -> None:
    """A workbench for Stable Diffusion checkpoints: inspect, convert, merge, judge."""


@app.command()
def inspect(
    files: list[Path] = typer.Argument(..., help="Model files (.safetensors) to identify."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts instead of tables."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show all evidence and metadata."),
) -> None:
    """Identify model files from their headers alone.

    Shows architecture, kind, key layout, dtypes, parameters per component, LoRA format, rank
    and alpha, metadata (modelspec, kohya, merge recipes) and whether the file is complete.
    """
    from mergekit_sd.inspect_report import inspect_files

    raise typer.Exit(inspect_files(files, as_json=as_json, verbose=verbose))


@app.command()
def convert(
    source: Path = typer.Argument(..., help="A .ckpt/.pt/.pth/.bin pickle or a .safetensors file."),
    target: Path = typer.Argument(..., help="The .safetensors file to write."),
    dtype: str = typer.Option("keep", help="keep, fp32, fp16, bf16, fp8_e4m3fn or fp8_e5m2 "
                              "(also float32, float16, bfloat16, as a recipe's output.dtype)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace TARGET if it exists."),
) -> None:
    """Convert a .ckpt/.pt/.bin to safetensors, or change dtype.

    Pickles are loaded with torch.load(weights_only=True): one that needs code is refused.
    """
    from mergekit_sd.cli_startup import import_torch
    from mergekit_sd.convert import convert_to_safetensors
    from mergekit_sd.io.nonfinite import NonFinite
    from mergekit_sd.io.saturate import Clamped

    import_torch()  # Ctrl-C held while it loads (cli_startup)
    clamped, nonfinite = Clamped(), NonFinite()
    written = convert_to_safetensors(source, target, dtype=dtype, overwrite=overwrite,
                                     clamped=clamped, nonfinite=nonfinite)
    typer.echo(f"wrote {written}")
    _say_clamped(clamped, nonfinite)


def _say_clamped(clamped, nonfinite) -> None:
    for note in [*nonfinite.notes(), *clamped.notes()]:  # on stderr: --json output stays
        typer.echo(f"note: {note}", err=True)            # one JSON document


recipe_app = typer.Typer(help="Recipe tools.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(recipe_app, name="recipe", help="Recipe tools: extract a merged file's recipe.")


class _CatalogOnDemand:
    """Resolves catalog references through the catalog, opened only when a recipe has one
    (a recipe of plain paths never creates a catalog database). With `pull`, a download
    reference the catalog lacks is pulled first; with `offline`, the answer for one says what
    works offline (--pull does not)."""

    def __init__(self, path: Path | None, pull: bool = False, offline: bool = False):
        self.path = path
        self.pull = pull
        self.offline = offline
        self.store = None
        self.resolver = None

    def __call__(self, ref: str):
        if self.resolver is None:
            from catalog.remote_refs import is_remote_ref
            from catalog.resolver import CatalogResolver, no_copy_yet
            from catalog.store import Store, missing_catalog

            # resolving only reads a catalog (none is made to find nothing in); a pull may
            # register its download in a new one
            if not self.pull and (missing := missing_catalog(self.path)) is not None:
                # without a catalog, a download reference just has no copy yet
                raise no_copy_yet(ref, self.offline) if is_remote_ref(ref) else missing
            self.store = Store.open(self.path, create=self.pull)
            fetch = None
            if self.pull:
                from mergekit_sd.cli_remote import recipe_fetcher

                fetch = recipe_fetcher(self.store)
            self.resolver = CatalogResolver(self.store, fetch, self.offline)
        with self.store.damage_said():
            return self.resolver(ref)


SET_HELP = ("STEP.PARAM=VALUE override: a value or [sweep] replaces only the parameter's "
            "default (its blocks, components and keys stay); a {mapping} replaces all of it.")
PULL_HELP = "Download hf:// and civitai:// inputs the catalog does not have yet."
OFFLINE_HELP = "Never call out: download references must already be in the catalog."
OUT_HELP = ("{verb} instead of the recipe's output.path: relative to the current folder "
            "(output.path: to the recipe's); missing folders are created; a recipe without "
            "output: takes it from here.")


def _load_plan(recipe: Path, assignments: list[str], out: Path | None, catalog: Path | None,
               pull: bool = False, offline: bool = False, existing: str = "note"):
    from mergekit_sd.cli_startup import import_torch
    from mergekit_sd.merge.plan import apply_overrides, build_plan
    from mergekit_sd.recipe.loader import load_recipe

    if pull and offline:
        raise UserError("--pull downloads and --offline forbids it; choose one")
    loaded = load_recipe(recipe, out)
    apply_overrides(loaded, assignments)
    import_torch()  # for the merge methods, with Ctrl-C held while it loads (cli_startup)
    return build_plan(loaded, resolver=_CatalogOnDemand(catalog, pull, offline), out=out,
                      existing=existing)


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="The YAML recipe."),
    assignments: list[str] = typer.Option([], "--set", help=SET_HELP),
    out: Path = typer.Option(None, "-o", "--out", help=OUT_HELP.format(verb="Show where merge "
                                                                       "would write with this "
                                                                       "file")),
    as_json: AsJson = False,
    catalog: CatalogOption = None,
    pull: bool = typer.Option(False, "--pull", help=PULL_HELP),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
) -> None:
    """Show what a recipe will do, reading only headers."""
    from mergekit_sd.merge.report import plan_as_dict, show_plan

    merge_plan = _load_plan(recipe, assignments, out, catalog, pull, offline)
    if as_json:
        import json

        typer.echo(json.dumps(plan_as_dict(merge_plan), indent=2))
    else:
        show_plan(merge_plan)


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="The YAML recipe."),
    assignments: list[str] = typer.Option([], "--set", help=SET_HELP),
    out: Path = typer.Option(None, "-o", "--out", help=OUT_HELP.format(verb="Write this file")),
    device: str = typer.Option("cpu", help="cpu or cuda: where the arithmetic runs."),
    as_json: AsJson = False,
    catalog: CatalogOption = None,
    pull: bool = typer.Option(False, "--pull", help=PULL_HELP),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace output files that exist (never an input)."),
) -> None:
    """Run a recipe: stream every key through its steps into the output file(s)."""
    from mergekit_sd.cli_progress import rich_progress
    from mergekit_sd.io.nonfinite import NonFinite
    from mergekit_sd.io.saturate import Clamped
    from mergekit_sd.merge.executor import run_merge
    from mergekit_sd.merge.report import note_lines

    merge_plan = _load_plan(recipe, assignments, out, catalog, pull, offline,
                            existing="replace" if overwrite else "refuse")
    # what `plan` notes (inputs that disagree, keys only some have, shape clashes ...), on
    # stderr and before the work, where a long merge cannot bury it and Ctrl-C still helps
    for line in note_lines(merge_plan):
        typer.echo(line, err=True)
    clamped, nonfinite = Clamped(), NonFinite()
    if as_json:
        written = run_merge(merge_plan, device=device, clamped=clamped, nonfinite=nonfinite)
        import json

        typer.echo(json.dumps({"written": {name: str(path) for name, path in written.items()},
                               "notes": [*merge_plan.notes, *nonfinite.notes(),
                                         *clamped.notes()]}))
        _say_clamped(clamped, nonfinite)
        return
    with rich_progress() as progress:
        written = run_merge(merge_plan, device=device, progress=progress, clamped=clamped,
                            nonfinite=nonfinite)
    for name, path in written.items():
        typer.echo(f"wrote {name} -> {path}")
    _say_clamped(clamped, nonfinite)


@app.command()
def pull(
    refs: list[str] = typer.Argument(..., help="civitai://VERSION_ID, civitai://model/MODEL_ID, "
                                     "hf://ORG/REPO[@REV]/PATH (globs allowed) or an http(s) URL."),
    to: Path = typer.Option(None, "--to", help="Folder (or web UI root) to download into "
                            "(default: downloads.root in the config, else a catalog root)."),
    file_type: str = typer.Option(None, "--type", help="Civitai file type: Model, 'Pruned "
                                  "Model', VAE, Config ... (default: the primary file)."),
    file_format: str = typer.Option(None, "--format", help="Civitai format: SafeTensor, "
                                    "PickleTensor, GGUF ..."),
    size: str = typer.Option(None, "--size", help="Civitai size: full or pruned."),
    fp: str = typer.Option(None, "--fp", help="Civitai precision: fp16, fp32, bf16 ..."),
    sha256: str = typer.Option(None, "--sha256", help="For a plain URL: verify against this."),
    parallel: int = typer.Option(None, "--parallel", "-j", help="Files downloaded at once."),
    nsfw_previews: NsfwPreviews = None,
    offline: bool = typer.Option(False, "--offline", help="Never call out: only what the "
                                 "catalog (or the Hugging Face cache) already has."),
    as_json: AsJson = False,
    catalog: CatalogOption = None,
) -> None:
    """Download models from Civitai, Hugging Face or a URL into the catalog.

    Resumes interrupted downloads, verifies each file's SHA256, skips files the catalog
    already has, and writes .civitai.info and preview sidecars. CIVITAI_API_TOKEN and
    HF_TOKEN are sent only to their own hosts.
    """
    from mergekit_sd.cli_remote import run_pull

    # a download stopped part way keeps its bytes (catalog/download.py, huggingface_hub)
    on_interrupt("what was downloaded so far is kept (as FILE.partial beside the file, or in "
                 "the Hugging Face cache); run the same pull again to resume")
    run_pull(refs, to, file_type, file_format, size, fp, sha256, parallel, nsfw_previews,
             offline, as_json, catalog)


@recipe_app.command("extract")
def recipe_extract(
    merged: Path = typer.Argument(..., help="A file written by mergekit-sd merge."),
    out: Path = typer.Option(None, "-o", "--out",
                                 help="Recipe file to write (default: stdout)."),
    output_path: Path = typer.Option(None, "--output-path",
                                     help="output.path in the recipe (default: MERGED's name)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Write the recipe stored in a merged file back out as YAML."""
    from mergekit_sd.io.writer import check_output_path, same_file, write_bytes_atomic
    from mergekit_sd.recipe.extract import extract_recipe

    if out is not None:
        if same_file(merged, out):  # --overwrite or not: the model would be lost
            raise UserError(f"-o {out} is the merged file being read; give the recipe its own "
                            "name, e.g. -o recipe.yaml")
        check_output_path(out, overwrite)
    # relative paths in it are written for the folder the recipe lands in
    extracted = extract_recipe(merged, output_path, out.parent if out is not None else None)
    if out is None:
        typer.echo(extracted.text, nl=False)
    else:
        write_bytes_atomic(out, extracted.text.encode())  # its folder is made; never half
        typer.echo(f"wrote {out}")
    for note in extracted.notes:  # on stderr: stdout may be the recipe itself
        typer.echo(f"note: {note}", err=True)


@app.command()
def blocks(
    target: str = typer.Argument(..., help="An architecture (sd1, sdxl, flux-dev ...) or a file."),
) -> None:
    """Print the block map (BASE, IN00 ..., D00 ...) with key counts."""
    from mergekit_sd.block_report import show_block_map

    show_block_map(target)


@app.command("demo-workspace")
def demo_workspace(
    root: Path = typer.Argument(Path("demo-workspace"), help="Folder to create or refresh."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a folder that holds "
                                   "other files too, replacing any of the demo's names."),
) -> None:
    """Create a workspace of tiny demo models (make demo).

    The models are generated with the real key layouts and random values. ROOT must be new,
    empty or a demo workspace already (it is then refreshed), unless --overwrite.
    """
    from mergekit_sd.cli_startup import import_torch
    from mergekit_sd.testing.workspace import make_demo_workspace

    import_torch()  # the models are made with it; Ctrl-C held while it loads (cli_startup)
    try:
        made = make_demo_workspace(root, overwrite)
    except OSError as exc:  # a file where a folder goes, no permission, a full disk
        raise UserError(f"{exc.filename or root}: the demo workspace cannot be written there "
                        f"({exc.strerror or exc}); give another folder") from None
    typer.echo(f"demo workspace ready at {root} ({len(made)} model files)")


def main() -> None:
    """Console entry point: user errors become one sentence and exit code 2, never a traceback."""
    import click

    from mergekit_sd.io.interrupts import stop_signals_raise

    on_interrupt(NOTHING_HALF_WRITTEN)  # each command starts from it (tests run several)
    try:
        # standalone_mode=False lets our handlers see errors before click does.
        with stop_signals_raise():  # a closed terminal or `kill` cleans up as Ctrl-C does
            code = app(standalone_mode=False, prog_name="mergekit-sd")
    except click.exceptions.Abort:
        _interrupted()
    except click.ClickException as exc:  # usage errors: click's own message and exit code 2
        exc.show()
        sys.exit(exc.exit_code)
    except UserError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)
    except WorkFailed as exc:
        sys.stderr.write(f"failed: {exc}\n")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    if code == INTERRUPTED_CODE:
        # typer turns Ctrl-C into click's Exit(130), which standalone_mode=False hands back as
        # this return value: the KeyboardInterrupt never reaches the handler above
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)


INTERRUPTED_CODE = 130  # 128 + SIGINT, as shells report a Ctrl-C


def _interrupted() -> NoReturn:
    import contextlib
    import signal

    from mergekit_sd.io.interrupts import stopped_by

    signum = stopped_by()
    by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
        sys.stderr.write(f"interrupted{by}: {interrupt_note()}\n")
    sys.exit(128 + signum)  # as shells report a process a signal ended


def run() -> None:
    """The installed `mergekit-sd` command: `main`, then out of the process without the slow
    teardown torch brings (`cli_exit`). `main` itself only raises SystemExit, so that it can
    be called in a process that goes on (the tests)."""
    from mergekit_sd.cli_exit import exit_process

    try:
        main()
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    if code is not None and not isinstance(code, int):  # sys.exit("message") prints it
        sys.stderr.write(f"{code}\n")
        code = 1
    exit_process(code or 0)


if __name__ == "__main__":
    run()
