"""`mergekit-sd search civitai|hf` and `mergekit-sd pull`: Civitai and Hugging Face from the
command line.

Part of the composition root with cli.py, which loads this module only when one of these
commands runs (or `plan`/`merge --pull` needs a download), so other commands never pay for
httpx or huggingface_hub.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from mergekit_sd.cli import AsJson  # loaded lazily by cli.py, already loaded
from mergekit_sd.errors import UserError, WorkFailed

# its help text is LAZY_GROUPS' in cli.py
search_app = typer.Typer(no_args_is_help=True, add_completion=False,
                         pretty_exceptions_enable=False, rich_markup_mode=None)

OFFLINE_HELP = "Never call out: refuse anything that needs the network."


def _print_json(doc) -> None:
    typer.echo(json.dumps(doc, indent=2, default=str))


def _console():
    from mergekit_sd.data_console import data_console

    # names and descriptions come from servers: printed as they are, never as markup; refs
    # whole when piped
    return data_console()


def _refuse_offline(offline: bool, what: str) -> None:
    if offline:
        raise UserError(f"{what} needs the network; run it without --offline")


@search_app.command("civitai")
def search_civitai(
    query: str = typer.Argument(None, help="Words in the model's name (optional with filters)."),
    types: list[str] = typer.Option([], "--type", help="Checkpoint, LORA, LoCon, VAE, "
                                    "TextualInversion ... (repeatable)."),
    bases: list[str] = typer.Option([], "--base", help="Base model: 'SDXL 1.0', Pony, "
                                    "Illustrious, 'Flux.1 D' ... (repeatable)."),
    sort: str = typer.Option(None, help="'Highest Rated', 'Most Downloaded' or 'Newest'."),
    period: str = typer.Option(None, help="AllTime, Year, Month, Week or Day."),
    nsfw: bool = typer.Option(None, "--nsfw/--sfw", help="Include or exclude NSFW models "
                              "(default: Civitai's)."),
    limit: int = typer.Option(20, help="Models per page (at most 100)."),
    cursor: str = typer.Option(None, help="The next page, as the previous page said."),
    as_json: bool = typer.Option(False, "--json", help="Print Civitai's JSON items."),
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
) -> None:
    """Search Civitai's models; each result names the ref to pull its newest version."""
    from catalog.civitai import CivitaiClient
    from catalog.config import load_settings

    _refuse_offline(offline, "searching Civitai")
    with CivitaiClient.from_settings(load_settings()) as client:
        page = client.search_models(query, types, bases, sort, period, nsfw,
                                    max(1, min(limit, 100)), cursor)
    if as_json:
        _print_json({"items": page.items, "next_cursor": page.next_cursor})
        return
    _show_civitai_models(page.items)
    if page.next_cursor:
        typer.echo(f"more: --cursor {page.next_cursor}")


def _show_civitai_models(items: list[dict]) -> None:
    from rich.table import Table

    if not items:
        typer.echo("no models match")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("model", "name", "type", "base", "newest version", "downloads"):
        table.add_column(column, overflow="fold")
    table.add_column("pull", no_wrap=True)  # a ref whole: other columns give way first
    for model in items:
        listed = model.get("modelVersions")
        versions = [v for v in listed if isinstance(v, dict)] if isinstance(listed, list) else []
        newest = versions[0] if versions else {}
        stats = model.get("stats")
        downloads = stats.get("downloadCount") if isinstance(stats, dict) else None
        table.add_row(str(model.get("id")), str(model.get("name")), str(model.get("type")),
                      str(newest.get("baseModel") or "-"), str(newest.get("name") or "-"),
                      f"{downloads:,}" if isinstance(downloads, int) else "-",
                      f"civitai://{newest['id']}" if newest.get("id") else "-")
    _console().print(table)


@search_app.command("hf")
def search_hf(
    query: str = typer.Argument(..., help="Words to search for, or ORG/REPO with --files."),
    files: bool = typer.Option(False, "--files", help="List the files of the repository QUERY "
                               "with sizes and SHA256s."),
    revision: str = typer.Option(None, help="Branch, tag or commit (with --files)."),
    limit: int = typer.Option(20, help="Models to show."),
    as_json: AsJson = False,
    offline: bool = typer.Option(False, "--offline", help=OFFLINE_HELP),
) -> None:
    """Search Hugging Face models, or list one repository's files."""
    from dataclasses import asdict

    from catalog.hub import HubClient
    from catalog.remote_refs import check_repo_id

    _refuse_offline(offline, "searching Hugging Face")
    if files:
        check_repo_id(query, query, "ORG/REPO")
    hub = HubClient()
    if files:
        found = hub.files(query, revision)
        if as_json:
            _print_json([asdict(f) for f in found])
        else:
            _show_hub_files(query, revision, found)
        return
    models = hub.search(query, limit)
    if as_json:
        _print_json([asdict(m) for m in models])
        return
    if not models:
        typer.echo("no models match")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    table.add_column("repository", no_wrap=True)  # whole, for `search hf ORG/REPO --files`
    for column in ("downloads", "likes", "updated"):
        table.add_column(column)
    for model in models:
        table.add_row(model.id, f"{model.downloads:,}" if model.downloads is not None else "-",
                      str(model.likes if model.likes is not None else "-"),
                      (model.last_modified or "-")[:10])
    _console().print(table)
    typer.echo("files of one: mergekit-sd search hf ORG/REPO --files")


def _show_hub_files(repo: str, revision: str | None, found) -> None:
    from rich.table import Table

    from mergekit_sd.inspect_view import human_size

    table = Table(box=None, pad_edge=False)
    for column in ("file", "size", "sha256"):
        table.add_column(column, overflow="fold")
    table.add_column("pull", no_wrap=True)  # a ref whole: other columns give way first
    at = f"@{revision}" if revision else ""
    for file in found:
        table.add_row(file.path, human_size(file.size),
                      file.sha256[:12] if file.sha256 else "(not LFS)",
                      f"hf://{repo}{at}/{file.path}")
    _console().print(table)


def run_pull(refs: list[str], to: Path | None, file_type: str | None, file_format: str | None,
             size: str | None, fp: str | None, sha256: str | None, parallel: int | None,
             nsfw_previews: bool | None, offline: bool, as_json: bool,
             catalog: Path | None) -> None:
    """The `pull` command (declared in cli.py)."""
    from catalog.civitai import FileChoice
    from catalog.config import load_settings
    from catalog.pull import Failed, PullOptions
    from catalog.safe_names import printable_ref
    from catalog.store import Store
    from mergekit_sd.cli_progress import rich_progress
    from mergekit_sd.progress import no_progress

    options = PullOptions(to, FileChoice(file_type, file_format, size, fp), sha256, offline,
                          nsfw_previews, parallel)
    outcomes = None
    try:
        with Store.open(catalog) as store:
            if as_json:
                outcomes = _pull(store, load_settings(), refs, options, no_progress)
            else:
                with rich_progress() as progress:
                    outcomes = _pull(store, load_settings(), refs, options, progress)
    except (UserError, WorkFailed) as exc:
        if not as_json or outcomes is not None:
            raise
        # refused before any reference was tried (--sha256, the config, the catalog): a script
        # reading stdout still gets its one document, every reference failed with the reason
        sys.stderr.write(f"{_failure_word(exc)}: {exc}\n")
        _print_json([_failed_json(Failed(printable_ref(ref), exc)) for ref in refs])
        raise typer.Exit(exc.exit_code) from None
    failures = [o for o in outcomes if isinstance(o, Failed)]
    for outcome in outcomes:
        if isinstance(outcome, Failed):  # on stderr with --json too, as `inspect --json` does
            sys.stderr.write(f"{_failure_word(outcome.error)}: {outcome.error}\n")
        elif not as_json:
            typer.echo(describe_pulled(outcome))
    if as_json:
        _print_json([_failed_json(o) if isinstance(o, Failed) else o.to_dict()
                     for o in outcomes])
    if failures:
        raise typer.Exit(2 if any(isinstance(f.error, UserError) for f in failures) else 1)


def _failure_word(error: Exception) -> str:
    """What the line on stderr starts with, as for every command (cli.main)."""
    return "error" if isinstance(error, UserError) else "failed"


def _failed_json(failed) -> dict:
    """A reference that was not pulled: "refused" is bad input to fix (exit code 2), "failed"
    the service, the network or the disk (exit code 1)."""
    return {"ref": failed.ref, "error": str(failed.error),
            "kind": "refused" if isinstance(failed.error, UserError) else "failed"}


def _pull(store, settings, refs, options, progress):
    from catalog.pull import Puller

    puller = Puller(store, settings, progress)
    try:
        return puller.pull(refs, options)
    finally:
        puller.close()


def describe_pulled(pulled) -> str:
    from mergekit_sd.inspect_view import human_size

    if pulled.status == "already owned":
        line = f"already have {pulled.ref}: #{pulled.entry_id} {pulled.path}"
    else:
        facts = [f"#{pulled.entry_id}" if pulled.entry_id else "not catalogued",
                 human_size(pulled.size)]
        if pulled.status == "resumed":
            facts.append(f"resumed, fetched {human_size(pulled.fetched)}")
        elif pulled.status == "restarted":
            facts.append("the file had changed on the server: downloaded again")
        elif pulled.status == "already there":
            facts.append("the file was already there")
        elif pulled.status == "from cache":
            facts.append("taken from the Hugging Face cache, nothing downloaded")
        if pulled.verified:
            facts.append(f"{pulled.verified_by} verified")  # a git blob id is no SHA256
        line = f"pulled {pulled.ref} -> {pulled.path} ({', '.join(facts)})"
    return "\n".join([line, *(f"  note: {note}" for note in pulled.notes)])


def recipe_fetcher(store):
    """What `plan`/`merge --pull` call for a download reference the catalog lacks."""
    from catalog.config import load_settings
    from catalog.pull import Failed, PullOptions
    from mergekit_sd.cli_progress import rich_progress

    def fetch(ref: str) -> None:
        # stdout carries the plan (JSON with --json): the pull's lines go to stderr, as the
        # bars do (cli_progress)
        with rich_progress() as progress:
            outcomes = _pull(store, load_settings(), [ref], PullOptions(), progress)
        for outcome in outcomes:
            if isinstance(outcome, Failed):
                raise outcome.error
            sys.stderr.write(describe_pulled(outcome) + "\n")

    return fetch

