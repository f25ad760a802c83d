"""`mergekit-sd catalog ...`: the model library from the command line.

Part of the composition root with cli.py: the catalog package is imported inside the commands,
so `mergekit-sd --help` does not pay for it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from mergekit_sd.cli import (  # loaded lazily by cli.py, already loaded
    AsJson,
    CatalogOption,
    NsfwPreviews,
)
from mergekit_sd.cli_interrupt import on_interrupt
from mergekit_sd.errors import UserError

# its help text is LAZY_GROUPS' in cli.py
catalog_app = typer.Typer(no_args_is_help=True, add_completion=False,
                          pretty_exceptions_enable=False, rich_markup_mode=None)


def open_store(path: Path | None, create: bool = False):
    """The catalog; one named by --catalog or $MERGEKIT_SD_CATALOG must exist unless `create`
    (only add-root makes one there: a typo must not give an empty library)."""
    from catalog.store import Store

    return Store.open(path, create=create)


def _print_json(doc) -> None:
    typer.echo(json.dumps(doc, indent=2, default=str))


@catalog_app.command("add-root")
def add_root(
    path: Path = typer.Argument(..., help="A web UI folder, ComfyUI folder or any model folder."),
    scan_now: bool = typer.Option(False, "--scan", help="Scan it right away."),
    catalog: CatalogOption = None,
) -> None:
    """Register a folder whose models the catalog keeps track of (files stay where they are)."""
    from catalog.edits import add_root as register
    from catalog.edits import enclosing_root

    with open_store(catalog, create=True) as store:
        before = {row[0] for row in store.db.execute("SELECT id FROM roots")}
        root_id, layout = register(store, path)
        real = store.db.execute("SELECT path FROM roots WHERE id = ?", (root_id,)).fetchone()[0]
        shown = f"{path}" + ("" if os.path.abspath(path.expanduser()) == real else f" -> {real}")
        typer.echo(f"root #{root_id}: {shown} ({layout.name} layout)"
                   + (", already a root" if root_id in before else ""))
        for folder in layout.folders:
            typer.echo(f"  {folder.kind or 'any models':>15}  {folder.path}")
        if (outer := enclosing_root(store, root_id)) is not None:
            outer_id, outer_path, shared = outer
            typer.echo(f"note: inside root #{outer_id} {outer_path}; the files under "
                       f"{', '.join(shared)} are found by scans of either root and catalogued "
                       "once")
        if scan_now:
            _run_scan(store, [root_id], hash_files=False, jobs=None, sequential=False,
                      as_json=False)


@catalog_app.command("remove-root")
def remove_root_command(
    path: Path = typer.Argument(..., help="A registered root (as `roots` lists it)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before forgetting entries "
                             "with tags, notes or ratings."),
    catalog: CatalogOption = None,
) -> None:
    """Stop keeping track of a root: its entries are forgotten, except those another root
    holds too; no file is touched."""
    from catalog.edits import ROOTS_LISTS_THEM, remove_root, root_ids_for

    with open_store(catalog) as store:
        root_id = root_ids_for(store, [path], ROOTS_LISTS_THEM)[0]
        plan = remove_root(store, root_id, dry_run=True)
        if plan.annotated and not yes:
            question = (f"{plan.annotated} of its {plan.forgotten} entries have tags, notes or "
                        "ratings; forget them?")
            if not sys.stdin.isatty():
                raise UserError(f"{plan.path}: {question[:-1]} (pass --yes: there is no "
                                "terminal to ask on)")
            if not typer.confirm(question, default=False):
                typer.echo("kept the root and its entries")
                raise typer.Exit(1)
        done = remove_root(store, root_id)
    typer.echo(f"removed root #{root_id} {done.path}: forgot {done.forgotten} entries"
               + (f", {done.kept} kept (another root holds them)" if done.kept else "")
               + "; no file was touched")


@catalog_app.command("roots")
def roots(catalog: CatalogOption = None) -> None:
    """List the registered roots, each with the files it holds (a root inside another root
    holds some of its files too)."""
    from catalog.present import no_roots
    from catalog.root_folders import file_counts

    with open_store(catalog) as store:
        counts = file_counts(store)
        rows = store.db.execute("SELECT id, path, layout FROM roots ORDER BY id").fetchall()
        for row in rows:
            typer.echo(f"#{row['id']} {row['path']} ({row['layout']}, {counts[row['id']]} files)")
        if not rows:  # silence would not tell an empty catalog from a wrong one
            typer.echo(no_roots(store.path, _catalog_flag(catalog)))


def _catalog_flag(catalog: Path | None) -> str:
    """The `--catalog PATH` to repeat in a suggested command (none for the default catalog,
    or one $MERGEKIT_SD_CATALOG names: the next command reads it too)."""
    import shlex

    return f" --catalog {shlex.quote(str(catalog))}" if catalog is not None else ""


def _run_scan(store, root_ids, hash_files: bool, jobs: int | None, sequential: bool,
              as_json: bool) -> None:
    from catalog.hash_cache import hash_pending
    from catalog.present import show_scan
    from catalog.scan import scan
    from mergekit_sd.cli_progress import rich_progress

    # each batch of entries (and each hash) is written in a transaction of its own
    on_interrupt("the catalog keeps what the scan recorded so far; run the scan again to "
                 "finish")
    if as_json:
        report = scan(store, root_ids, jobs=jobs)
        hashed = hash_pending(store, root_ids, jobs=1 if sequential else 2) if hash_files else None
        _print_json({"scan": report.to_dict(), "hash": vars(hashed) if hashed else None})
        return
    with rich_progress() as progress:
        report = scan(store, root_ids, jobs=jobs, progress=progress)
        hashed = (hash_pending(store, root_ids, jobs=1 if sequential else 2, progress=progress)
                  if hash_files else None)
    show_scan(report, hashed)


@catalog_app.command("scan")
def scan_roots(
    paths: list[Path] = typer.Argument(None, help="Roots to scan (default: all)."),
    hash_files: bool = typer.Option(False, "--hash", help="Also hash new and changed files."),
    jobs: int = typer.Option(None, "--jobs", "-j", help="Worker processes for identification "
                             "(1 or more; at most one per usable core; default: one per core, "
                             "up to 8)."),
    sequential: bool = typer.Option(False, "--sequential",
                                    help="Hash one file at a time (spinning disks)."),
    as_json: AsJson = False,
    catalog: CatalogOption = None,
) -> None:
    """Bring the catalog up to date: unchanged files are not read, new ones identified."""
    from catalog.edits import root_ids_for

    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs {jobs}: give 1 or more (leave it out for one per core, up to 8)")

    with open_store(catalog) as store:
        root_ids = root_ids_for(store, paths) if paths else None
        if not store.db.execute("SELECT 1 FROM roots").fetchone():
            if as_json:  # a script parsing the answer gets a document, also of nothing done
                from catalog.scan import ScanReport

                _print_json({"scan": ScanReport().to_dict(), "hash": None})
            else:
                from catalog.present import no_roots

                typer.echo(no_roots(store.path, _catalog_flag(catalog)))
            return
        _run_scan(store, root_ids, hash_files, jobs, sequential, as_json)


@catalog_app.command("list")
def list_command(
    kind: str = typer.Option(None, help="checkpoint, diffusion_model, lora, vae, text_encoder, "
                             "embedding or unknown."),
    arch: str = typer.Option(None, help="Architecture id or alias (sd1, sdxl, flux-dev ...)."),
    base: str = typer.Option(None, help="Base model label (SDXL 1.0, Pony, Illustrious ...)."),
    tag: list[str] = typer.Option([], help="Only entries with this tag (repeatable)."),
    search: str = typer.Option(None, help="Text in the name, path, trigger words, notes (yours "
                               "or the web UI's) or Civitai model and version name."),
    status: str = typer.Option(None, help="ok, missing, truncated, invalid, unreadable or "
                               "unchecked (a legacy pickle a scan does not load)."),
    favourites: bool = typer.Option(False, "--favourites", help="Only favourites."),
    sort: str = typer.Option("name", help="name, size, date, rating, kind, arch or path."),
    limit: int = typer.Option(None, help="At most this many entries (1 or more)."),
    as_json: AsJson = False,
    catalog: CatalogOption = None,
) -> None:
    """List catalog entries, filtered and sorted."""
    from catalog.entries import Filters, list_entries
    from catalog.present import no_entries, show_list

    architecture = _architecture_id(arch) if arch else None
    with open_store(catalog) as store:
        filters = Filters(kind, architecture, base, tag, search, status, favourites, sort, limit)
        entries = list_entries(store, filters)
        roots = 0 if entries else store.db.execute("SELECT count(*) FROM roots").fetchone()[0]
        empty = no_entries(store.path, roots, _catalog_flag(catalog))
    if as_json:
        _print_json([e.to_dict() for e in entries])
    else:
        show_list(entries, filtered=filters.narrowing(), empty=empty)


def _architecture_id(name: str) -> str:
    from mergekit_sd.arch.architectures import get_architecture

    try:
        return get_architecture(name).id
    except LookupError as exc:  # KeyError too: str() of one would quote the sentence
        raise UserError(f"--arch {name!r}: {exc.args[0]}") from None
    except ValueError as exc:
        raise UserError(f"--arch {name!r}: {exc}") from None


@catalog_app.command("show")
def show(
    ref: str = typer.Argument(..., help="#id, name, catalog:NAME, sha256:HEX or a path."),
    as_json: AsJson = False,
    catalog: CatalogOption = None,
) -> None:
    """Everything the catalog knows about one entry."""
    from catalog.entries import find_entry
    from catalog.present import show_entry

    with open_store(catalog) as store:
        entry = find_entry(store, ref)
    if as_json:
        _print_json(entry.to_dict())
    else:
        show_entry(entry)


@catalog_app.command("tag")
def tag(
    ref: str = typer.Argument(..., help="The entry."),
    tags: list[str] = typer.Argument(None, help="Tags to add."),
    remove: list[str] = typer.Option([], "--remove", "-r", help="Tag to remove (repeatable)."),
    catalog: CatalogOption = None,
) -> None:
    """Add or remove tags."""
    from catalog.edits import set_tags
    from catalog.entries import find_entry

    with open_store(catalog) as store:
        entry = find_entry(store, ref)
        now = set_tags(store, entry, tags or [], remove)
    typer.echo(f"#{entry.id} {entry.name}: {', '.join(now) or 'no tags'}")


@catalog_app.command("note")
def note(
    ref: str = typer.Argument(..., help="The entry."),
    text: str = typer.Argument(..., help="The note ('' clears it)."),
    catalog: CatalogOption = None,
) -> None:
    """Set an entry's note."""
    from catalog.edits import set_note
    from catalog.entries import find_entry

    with open_store(catalog) as store:
        entry = find_entry(store, ref)
        set_note(store, entry, text)
    typer.echo(f"#{entry.id} {entry.name}: note {'set' if text.strip() else 'cleared'}")


@catalog_app.command("rate")
def rate(
    ref: str = typer.Argument(..., help="The entry."),
    stars: int = typer.Argument(None, help="0 (none) to 5."),
    favourite: bool = typer.Option(None, "--favourite/--no-favourite", help="Mark or unmark."),
    catalog: CatalogOption = None,
) -> None:
    """Rate an entry (0-5 stars) and mark favourites."""
    from catalog.edits import set_rating
    from catalog.entries import find_entry, get_entry

    with open_store(catalog) as store:
        entry = find_entry(store, ref)
        set_rating(store, entry, stars, favourite)
        entry = get_entry(store, entry.id)
    typer.echo(f"#{entry.id} {entry.name}: {entry.rating} star(s)"
               + (", favourite" if entry.favourite else ""))


@catalog_app.command("dupes")
def dupes(
    as_json: AsJson = False,
    catalog: CatalogOption = None,
) -> None:
    """Identical files and same-weights copies, with the space they take twice."""
    from dataclasses import asdict

    from catalog.dupes import find_duplicates
    from catalog.present import show_dupes

    with open_store(catalog) as store:
        groups = find_duplicates(store)
    if as_json:
        _print_json([asdict(g) for g in groups])
    else:
        show_dupes(groups)


@catalog_app.command("lineage")
def lineage_command(
    ref: str = typer.Argument(..., help="The entry."),
    as_json: AsJson = False,
    catalog: CatalogOption = None,
) -> None:
    """Parents (merge inputs, training base) and children of an entry."""
    from catalog.entries import find_entry
    from catalog.lineage import lineage
    from catalog.present import show_lineage

    with open_store(catalog) as store:
        found = lineage(store, find_entry(store, ref))
    if as_json:
        _print_json(found.to_dict())
    else:
        show_lineage(found)


@catalog_app.command("rm")
def rm(
    ref: str = typer.Argument(..., help="The entry."),
    delete_file: bool = typer.Option(False, "--delete-file", help="Also delete the model file."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before deleting the file."),
    catalog: CatalogOption = None,
) -> None:
    """Forget an entry; with --delete-file, delete its file too (asks first). A file left on
    disk under a root comes back as a new entry on the next scan."""
    from catalog.edits import remove
    from catalog.entries import find_entry

    with open_store(catalog) as store:
        entry = find_entry(store, ref)
        if delete_file and not yes and not sys.stdin.isatty():
            raise UserError(f"{entry.path}: pass --yes to delete it without a question "
                            "(there is no terminal to ask on)")
        if delete_file and not yes and not typer.confirm(
                f"delete {entry.path} from disk?", default=False):
            typer.echo("kept the file and the entry")
            raise typer.Exit(1)
        deleted = remove(store, entry, delete_file)
    typer.echo(f"removed #{entry.id} {entry.name}" + (" and deleted its file" if deleted else ""))
    if not deleted and os.path.exists(entry.path):
        typer.echo("note: its file is still there, so the next scan adds it again as a new entry "
                   "(with a new id); --delete-file deletes it, `catalog remove-root` stops "
                   "scanning its root")


@catalog_app.command("identify")
def identify_command(
    refresh: bool = typer.Option(False, "--refresh", help="Look up files identified before "
                                 "too, and replace the previews saved for them where Civitai "
                                 "now shows another image (never one of your own)."),
    nsfw_previews: NsfwPreviews = None,
    offline: bool = typer.Option(False, "--offline", help="Never call out (then there is "
                                 "nothing to do: identification asks Civitai)."),
    as_json: AsJson = False,
    catalog: CatalogOption = None,
) -> None:
    """Look every hashed file up on Civitai in bulk; fill in names, base models, trigger words
    and previews (.civitai.info and .preview.png beside each file found)."""
    from catalog.civitai import CivitaiClient
    from catalog.config import load_settings
    from catalog.remote_identify import identify
    from mergekit_sd.cli_progress import rich_progress

    if offline:
        raise UserError("identifying files asks Civitai; run it without --offline")
    # each file found gets its sidecars (each written whole), then its entry (a transaction);
    # a file whose entry does not record its .civitai.info yet is looked up again next time
    on_interrupt("the files identified so far keep their .civitai.info, preview and catalog "
                 "details; run the same identify again to "
                 + ("finish (--refresh looks up every file again)" if refresh
                    else "look up the rest"))
    settings = load_settings()
    allow = settings.nsfw_previews if nsfw_previews is None else nsfw_previews
    with open_store(catalog) as store, CivitaiClient.from_settings(settings) as client:
        if as_json:
            report = identify(store, client, refresh=refresh, nsfw_previews=allow)
        else:
            with rich_progress() as progress:
                report = identify(store, client, refresh=refresh, nsfw_previews=allow,
                                  progress=progress)
        requests = client.http.requests
    if as_json:
        _print_json({**report.to_dict(), "requests": requests})
        return
    typer.echo(f"looked up {report.looked_up} hash(es) in {requests} request(s): "
               f"{len(report.identified)} file(s) identified, {report.unknown} unknown to "
               f"Civitai, {report.skipped} identified before (--refresh looks again)")
    for found in report.identified:
        base = f" [{found.base_model}]" if found.base_model else ""
        preview = ", preview saved" if found.preview else ""
        typer.echo(f"  #{found.entry_id} {Path(found.path).name}: {found.model} / "
                   f"{found.version}{base}{preview}")
    if report.unhashed:
        typer.echo(f"{report.unhashed} file(s) have no hash yet; `mergekit-sd catalog scan "
                   "--hash` hashes them")
    for problem in report.problems:
        typer.echo(f"  note: {problem}")


@catalog_app.command("updates")
def updates_command(
    offline: bool = typer.Option(False, "--offline", help="Never call out (then there is "
                                 "nothing to do: the versions are Civitai's)."),
    as_json: AsJson = False,
    catalog: CatalogOption = None,
) -> None:
    """Newer versions on Civitai of the models the catalog holds."""
    from catalog.civitai import CivitaiClient
    from catalog.config import load_settings
    from catalog.remote_identify import find_updates

    if offline:
        raise UserError("checking for updates asks Civitai; run it without --offline")
    with open_store(catalog) as store, CivitaiClient.from_settings(load_settings()) as client:
        updates, checked = find_updates(store, client)
    if as_json:
        _print_json([u.to_dict() for u in updates])
        return
    if not checked:
        typer.echo("no catalog entry came from Civitai yet; `mergekit-sd catalog identify` "
                   "finds the ones that did")
        return
    typer.echo(f"checked {checked} model(s): {len(updates)} with a newer version")
    for update in updates:
        have = ", ".join(str(v["version"] or v["version_id"]) for v in update.owned)
        newest = update.newer[0]
        typer.echo(f"  {update.model} (model {update.model_id}): you have {have}; newer: "
                   + ", ".join(f"{v['version']} ({v['base_model']})" for v in update.newer)
                   + f"; pull civitai://{newest['version_id']}")
