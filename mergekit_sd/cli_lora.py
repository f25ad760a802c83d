"""`mergekit-sd bake` and the `lora` group (merge, extract): LoRA work from the command line.

Built only when invoked (see LAZY_GROUPS in cli.py). Model arguments are paths or catalog
references (`catalog:NAME`, `sha256:HEX`, `#ID`), resolved through the catalog only when one is
used.
"""

from __future__ import annotations

from pathlib import Path

import typer

from mergekit_sd.cli import CatalogOption, _CatalogOnDemand
from mergekit_sd.errors import UserError, WorkFailed

bake_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                       rich_markup_mode=None)
lora_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                       rich_markup_mode=None, no_args_is_help=True)

_SHOW_UNMATCHED = 8  # module names listed per LoRA when some land nowhere
_SCHEMES = ("sha256", "autov3", "catalog")  # catalog references: SCHEME:VALUE
# the usage lines name the syntax (typer 0.19 under click 8.5 prints no arguments' help), and
# both commands call the per-LoRA number its strength, as recipes' bake_lora steps do
_BAKE_LORAS = "LORA[:STRENGTH[:TE_STRENGTH]]..."
_MERGE_LORAS = "LORA[:STRENGTH]..."


def _resolve(ref: str, resolver: _CatalogOnDemand) -> tuple[Path, str | None]:
    """(path, SHA256 when the catalog knows it): an existing file as is, a path-looking
    reference that does not exist is an error, anything else is asked of the catalog."""
    from mergekit_sd.recipe.refs import is_path_ref

    path = Path(ref).expanduser()
    if path.is_file():  # an existing file wins, even one named like a reference (#1.safetensors)
        return path, None
    folder = UserError(f"{ref}: is a folder (a diffusers model?); give a single .safetensors "
                       "file") if path.is_dir() else None
    if is_path_ref(ref) and ("/" in ref or path.suffix in (".safetensors", ".ckpt", ".pt")):
        raise folder or UserError(f"{ref}: does not exist; give an existing path or a catalog "
                                  "reference (catalog:NAME, #ID, sha256:HEX, autov3:HEX)")
    try:
        found = resolver(ref)
    except LookupError as exc:
        raise folder or UserError(str(exc)) from None  # a folder is meant if no entry is
    except UserError:  # no catalog to ask
        if folder:
            raise folder from None
        raise
    return found.path, found.sha256


def _split_strengths(arg: str, most: int) -> tuple[str, list[float]]:
    """LORA[:NUMBER...] -> (ref, up to `most` trailing numbers); a ref may hold colons.
    Numbers are finite and written plainly: nan, inf and 1_0 are no strengths."""
    from mergekit_sd.arch.block_lists import plain_number

    parts = arg.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < most:
        if len(parts) == 2 and parts[0].lower() in _SCHEMES:  # sha256:7996564991 is a hash
            break
        number = plain_number(parts[-1])
        if number is None:
            break
        numbers.insert(0, number)
        parts.pop()
    return ":".join(parts), numbers


def _unplain_number(text: str) -> bool:
    """Whether one of the colon-separated parts is a number to Python but no strength to us
    (nan, inf, 1_0)."""
    from mergekit_sd.arch.block_lists import plain_number

    for part in text.split(":"):
        try:
            float(part)
        except ValueError:
            continue
        if plain_number(part) is None:
            return True
    return False


def _names_a_model(ref: str, resolver: _CatalogOnDemand) -> bool:
    """Whether the catalog knows `ref` (the part of an argument before a colon)."""
    if ref.lower() in _SCHEMES:
        return False
    try:
        _resolve(ref, resolver)
    except UserError:
        return False
    return True


def _lora_arg(arg: str, resolver: _CatalogOnDemand, form: str, most: int
              ) -> tuple[str, Path, str | None, list[float]]:
    """(ref, path, known SHA256, numbers) of a LORA[:NUMBER...] argument. When no file has the
    whole name but one has the part before a colon, the rest is what went wrong: say so."""
    ref, numbers = _split_strengths(arg, most)
    try:
        path, sha = _resolve(ref, resolver)
    except UserError:
        parts = arg.split(":")
        for cut in range(len(parts) - 1, 0, -1):
            head = ":".join(parts[:cut])
            if Path(head).expanduser().is_file() or _names_a_model(head, resolver):
                rest = ":".join(parts[cut:])
                numbers_wanted = "one number" if most == 1 else "one or two numbers"
                if _unplain_number(rest):
                    numbers_wanted = numbers_wanted.replace("number", "finite number")
                raise UserError(f"{arg}: '{rest}' after the file name is not {form}; give "
                                f"{numbers_wanted} after it, e.g. {head}:0.8") from None
        raise
    return ref, path, sha, numbers


def _check_output(output: Path, overwrite: bool, inputs: list[Path]) -> None:
    """-o names a .safetensors file that can be written, and none of the `inputs` (which it
    would replace): checked before any work (a directory would otherwise fail at the rename,
    after the whole bake)."""
    from mergekit_sd.io.writer import check_folder_writable, refuse_replacing_inputs

    if output.suffix.lower() != ".safetensors":
        raise UserError(f"-o {output} must end in .safetensors (the file is written in that "
                        "format)")
    if output.is_dir():
        raise UserError(f"-o {output} is a directory; give a file name")
    refuse_replacing_inputs(output, inputs)
    if output.exists() and not overwrite:
        raise UserError(f"{output} exists; pass --overwrite to replace it or choose another -o")
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"-o {output}: {parent} is a file, not a folder; choose another -o")
    check_folder_writable(output, parent)


def show_unmatched(unmatched, echo=typer.echo) -> None:
    """Per LoRA: the modules that name no weight of the base, then those that are malformed or
    unusable there, each with its reason (the first few of each, and how many more)."""
    from mergekit_sd.lora.targets import plural

    for miss in unmatched:
        for entries, says in (
                (miss.modules, "{} no weight of the base:"),
                (miss.malformed, "{} malformed or unusable (why in brackets):")):
            if not entries:
                continue
            one = len(entries) == 1
            verb = (("names" if one else "name") if entries is miss.modules
                    else ("is" if one else "are"))
            echo(f"{miss.lora}: {plural(len(entries), 'module')} {says.format(verb)}", err=True)
            for name in entries[:_SHOW_UNMATCHED]:
                echo(f"  {name[:200]}", err=True)
            if len(entries) > _SHOW_UNMATCHED:
                echo(f"  … and {len(entries) - _SHOW_UNMATCHED} more", err=True)


def _say_clamped(clamped) -> None:
    for note in clamped.notes():  # on stderr, as merge and convert say them
        typer.echo(f"note: {note}", err=True)


@bake_app.command("bake")
def bake(
    base: str = typer.Argument(..., help="Checkpoint to bake into (path or catalog ref)."),
    loras: list[str] = typer.Argument(
        ..., metavar=_BAKE_LORAS,
        help="LoRAs as LORA[:STRENGTH[:TE_STRENGTH]], e.g. style.safetensors:0.8"),
    output: Path = typer.Option(..., "-o", "--out", "--output",
                                help="The baked checkpoint to write."),
    te_strength: float | None = typer.Option(
        None, "--te-strength", help="Text-encoder strength for every LoRA without its own "
        "(default: each LoRA's strength)."),
    blocks: list[str] = typer.Option(
        [], "--blocks", help="Per-block strengths: a preset (all, none, in, mid, out, in-mid, "
        "mid-out, double, single) or comma-separated numbers; once for all LoRAs or once per "
        "LoRA."),
    dtype: str = typer.Option("keep", "--dtype", help="Output dtype: keep, fp32, fp16, bf16, "
                              "fp8_e4m3fn or fp8_e5m2 (also float32, float16, bfloat16)."),
    allow_unmatched: bool = typer.Option(
        False, "--allow-unmatched", help="Bake even when some LoRA modules name no weight of the "
        "base (they are listed either way)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    catalog: CatalogOption = None,
) -> None:
    """Bake LoRAs into a checkpoint in one streaming pass; every module lands or is listed."""
    from mergekit_sd.cli_progress import rich_progress
    from mergekit_sd.cli_startup import import_torch
    from mergekit_sd.lora.bake import LoraUse, load_loras, prepare_bake
    from mergekit_sd.lora.bake_run import BakeStream
    from mergekit_sd.lora.strengths import strength_problem
    from mergekit_sd.lora.targets import plural, unmatched_summary

    problem = None if te_strength is None else strength_problem(te_strength)
    if problem:
        raise UserError(f"--te-strength {problem}; give a number such as 0.5")
    if len(blocks) > 1 and len(blocks) != len(loras):
        raise UserError(f"--blocks given {len(blocks)} times for {len(loras)} LoRAs; give it "
                        "once (for all) or once per LoRA")
    resolver = _CatalogOnDemand(catalog)
    base_path, base_sha = _resolve(base, resolver)
    uses = []
    for i, arg in enumerate(loras):
        ref, path, sha, numbers = _lora_arg(arg, resolver, "STRENGTH[:TE_STRENGTH]", most=2)
        strength = numbers[0] if numbers else 1.0
        te = numbers[1] if len(numbers) > 1 else te_strength
        spec = blocks[i] if len(blocks) > 1 else (blocks[0] if blocks else None)
        uses.append(LoraUse(ref, path, strength, te, spec, sha))
    _check_output(output, overwrite, [base_path, *(use.path for use in uses)])
    plan = prepare_bake(base_path, uses, output, dtype, known_sha256=base_sha, base_ref=base,
                        allow_unmatched=allow_unmatched)
    # the output begins (tensors no LoRA names) while the LoRAs load and torch is imported
    with BakeStream(plan) as stream:
        import_torch()
        load_loras(plan)
        if plan.unmatched:
            show_unmatched(plan.unmatched)
            if not allow_unmatched:
                count, what = unmatched_summary(plan.unmatched, base_path.name)
                raise WorkFailed(f"{plural(count, 'LoRA module')} cannot be baked ({what}); "
                                 "nothing written (pass --allow-unmatched to bake the rest)")
        with rich_progress() as progress:
            written = stream.finish(progress)
    typer.echo(f"baked {len(uses)} LoRA{'s' if len(uses) != 1 else ''} into {base_path.name}: "
               f"{plan.changed_keys()} tensors a LoRA touches → {written}")
    _say_clamped(plan.clamped)


@lora_app.command("merge")
def lora_merge(
    loras: list[str] = typer.Argument(
        ..., metavar=_MERGE_LORAS,
        help="LoRAs as LORA[:STRENGTH]: at least two, or one with --rank to resize it."),
    output: Path = typer.Option(..., "-o", "--out", "--output",
                                help="The merged LoRA to write."),
    rank: int | None = typer.Option(
        None, "--rank", help="Factor each weight's summed delta to this rank by SVD (default: "
        "concatenate the ranks, which is exact)."),
    base: str | None = typer.Option(
        None, "--base", help="A checkpoint of the LoRAs' architecture, for its weights' shapes "
        "(default: the architecture's real layout)."),
    dtype: str = typer.Option("fp16", "--dtype", help="fp16, bf16 or fp32 (also float16, "
                              "bfloat16, float32)."),
    clamp_quantile: float | None = typer.Option(
        None, "--clamp-quantile", help="With --rank only (refused without it): clamp the "
        "factors at this quantile of their magnitudes (default 1: no clamp)."),
    allow_unmatched: bool = typer.Option(False, "--allow-unmatched",
                                         help="Merge even when some modules match no weight."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    catalog: CatalogOption = None,
) -> None:
    """Merge LoRAs into one kohya-format LoRA (matched by the weight each module changes)."""
    from mergekit_sd.cli_startup import import_torch
    from mergekit_sd.lora.combine import merge_loras
    from mergekit_sd.lora.targets import plural, unmatched_summary

    if clamp_quantile is not None and rank is None:  # concatenation has no factors to clamp
        raise UserError(f"--clamp-quantile {clamp_quantile:g} applies only to merges by SVD; "
                        "add --rank R, or leave it out to concatenate the ranks exactly")
    resolver = _CatalogOnDemand(catalog)
    pairs = []
    for arg in loras:
        _ref, path, _sha, numbers = _lora_arg(arg, resolver, "STRENGTH", most=1)
        pairs.append((path, numbers[0] if numbers else 1.0))
    base_path = _resolve(base, resolver)[0] if base else None
    _check_output(output, overwrite, [p for p, _ in pairs] + ([base_path] if base_path else []))
    import_torch()  # Ctrl-C held while it loads (cli_startup)
    report = merge_loras(pairs, output, rank, base_path, dtype,
                         1.0 if clamp_quantile is None else clamp_quantile, allow_unmatched)
    if report.unmatched:
        show_unmatched(report.unmatched)
        if not allow_unmatched:
            count, what = unmatched_summary(report.unmatched, "the base")
            raise WorkFailed(f"{plural(count, 'LoRA module')} cannot go into the merged LoRA "
                             f"({what}); nothing written (pass --allow-unmatched to merge the "
                             "rest)")
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"merged {len(pairs)} LoRA{'s' if len(pairs) != 1 else ''}: {report.modules} "
               f"modules, rank up to {report.rank} → {output}")
    _say_clamped(report.clamped)


@lora_app.command("extract")
def lora_extract(
    tuned: str = typer.Argument(..., help="The fine-tuned checkpoint."),
    base: str = typer.Argument(..., help="The checkpoint it was tuned from."),
    rank: int = typer.Option(..., "--rank", help="Rank of linear and 1x1 conv modules."),
    output: Path = typer.Option(..., "-o", "--out", "--output",
                                help="The LoRA to write."),
    conv_rank: int | None = typer.Option(
        None, "--conv-rank", help="Rank of 3x3 conv modules (LoCon); default: none extracted."),
    clamp_quantile: float = typer.Option(
        0.99, "--clamp-quantile", help="Clamp factor values at this quantile of their "
        "magnitudes (kohya's script clamps at that of the signed values); 1 keeps them exact."),
    text_encoders: bool = typer.Option(True, "--text-encoders/--no-text-encoders",
                                       help="Extract text-encoder differences too."),
    dtype: str = typer.Option("fp16", "--dtype", help="fp16, bf16 or fp32 (also float16, "
                              "bfloat16, float32)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    catalog: CatalogOption = None,
) -> None:
    """Extract a kohya-format LoRA of the difference TUNED − BASE by truncated SVD."""
    from mergekit_sd.cli_progress import rich_progress
    from mergekit_sd.cli_startup import import_torch
    from mergekit_sd.lora.extract import extract_lora

    resolver = _CatalogOnDemand(catalog)
    tuned_path, base_path = _resolve(tuned, resolver)[0], _resolve(base, resolver)[0]
    _check_output(output, overwrite, [tuned_path, base_path])
    import_torch()  # Ctrl-C held while it loads (cli_startup)
    with rich_progress() as progress:
        report = extract_lora(tuned_path, base_path, output, rank, conv_rank, clamp_quantile,
                              text_encoders, dtype, progress)
    typer.echo(f"extracted {report.modules} modules ({report.unchanged} weights unchanged) "
               f"→ {output}")
    if report.parts_left_out:
        typer.echo(report.parts_left_out)
    _say_clamped(report.clamped)
    if report.skipped_convs:
        typer.echo(f"{report.skipped_convs} 3x3 convs differ but were left out: pass "
                   "--conv-rank to extract them")
    if report.text_encoders_left_out:
        n = report.text_encoders_left_out
        typer.echo(f"{n} text-encoder weight{'s differ' if n != 1 else ' differs'} and "
                   f"{'were' if n != 1 else 'was'} left out (--no-text-encoders)")
    if report.unlike:
        typer.echo(f"{len(report.unlike)} tensors are in one model only or differ in shape, "
                   f"which a LoRA cannot carry, e.g. {'; '.join(report.unlike[:3])}")
    if report.other_differences:
        some = ", ".join(report.other_differences[:3])
        typer.echo(f"{len(report.other_differences)} other tensors differ that a LoRA cannot "
                   f"carry (biases, norms, embeddings), e.g. {some}")
