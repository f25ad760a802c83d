"""The output folder (`--out`) of a render: which files a run writes, which it may remove, and
when the folder is created.

A run only ever replaces or removes files a mergekit-sd render wrote: those the folder's
manifest.json lists, when that manifest is ours (`"tool": "mergekit-sd …"`, command render or
compare). Every other file stays as it is; one that lies where the run would write refuses the
run before anything is touched. A folder holding anything refuses the run unless `--overwrite`.

manifest.json is written before the first image, listing every file the run will write
(`outputs`, `"complete": false`), so that a run stopped half-way still tells the next one which
files are its own; the last write of the run marks it complete.

Nothing is created or removed until every input is checked, every architecture's pipeline
prepared (tokenizers found, configs derived: runner.py) and the first one built: a refused run
leaves no folder behind, and a previous render whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path, PurePosixPath

from mergekit_sd.errors import UserError
from mergekit_sd.render.manifest import MANIFEST_NAME, Manifest
from mergekit_sd.render.outputs import OUT_ADVICE, output_error, sync_folder, write_output

IMAGES_DIR = "images"
AB_DIR = "ab"
CONTACT_SHEET = "contact-sheet.png"
AB_SHEET = "ab-sheet.png"
PAGE_NAME = "index.html"
OUR_COMMANDS = ("render", "compare")


def image_file(folder: str, prompt: str, seed: int) -> str:
    """An image's file; `folder` is its candidate's (`RenderCandidate.folder`)."""
    return f"{IMAGES_DIR}/{folder}/{prompt}-{seed}.png"


def ab_file(prompt: str, seed: int) -> str:
    return f"{AB_DIR}/{prompt}-{seed}.png"


def check_usable(out: Path) -> None:
    """One sentence now, before anything is built, when `out` cannot be a folder we write
    into. Creates nothing that stays: where `out` does not exist yet, a folder is made and
    removed again in its nearest existing parent."""
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out}: is a file; give a folder for the images and sheets")
        if out.is_symlink() and not out.exists():
            raise UserError(f"--out {out}: is a link to nothing; {OUT_ADVICE}")
        there = out
        while not there.exists() and there != there.parent:
            there = there.parent
        if not there.is_dir():
            raise UserError(f"--out {out}: {there} is a file, not a folder; {OUT_ADVICE}")
        if there == out:
            with tempfile.TemporaryFile(dir=out, prefix=".mergekit-sd-probe-"):
                pass
        else:
            os.rmdir(tempfile.mkdtemp(dir=there, prefix=".mergekit-sd-probe-"))
    except OSError as exc:
        raise UserError(f"--out {out}: {exc.strerror or exc}; {OUT_ADVICE}") from None


def _our_manifest(out: Path) -> dict | None:
    """The folder's manifest when a mergekit-sd render wrote it; None when there is none or
    it is someone else's (then it is never replaced: see `OutputFolder.check`)."""
    try:
        data = json.loads((out / MANIFEST_NAME).read_bytes())
    except (OSError, ValueError):
        return None
    if (isinstance(data, dict) and str(data.get("tool", "")).startswith("mergekit-sd ")
            and data.get("command") in OUR_COMMANDS):
        return data
    return None


def _listed(manifest: dict) -> set[str]:
    """Every file a manifest of ours names: `outputs`, and for manifests written before it
    existed, the images and sheets."""
    def items(value) -> list:  # a manifest edited by hand may hold anything anywhere
        return value if isinstance(value, list) else []

    sheets = manifest.get("sheets") if isinstance(manifest.get("sheets"), dict) else {}
    names = [MANIFEST_NAME, *items(manifest.get("outputs")),
             *(sheets.get(k) for k in ("contact", "ab_sheet", "html")),
             *(i.get("file") for i in items(manifest.get("images")) if isinstance(i, dict)),
             *(p.get("file") for p in items(sheets.get("ab")) if isinstance(p, dict))]
    return {n for n in names if isinstance(n, str)}


def _inside(out: Path, name: str) -> bool:
    """Whether `name` is a file path inside `out` (a manifest is a file anyone can edit: a
    `../` or a link out of the folder must never make us remove a file elsewhere)."""
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
        return False
    path = out.joinpath(*parts)
    try:
        return path.resolve().is_relative_to(out.resolve()) and not path.is_dir()
    except (OSError, RuntimeError):
        return False


class OutputFolder:
    """`--out` for one run: checked first (`check`), created when the run is about to write
    (`open`), and written through (`write`, `write_manifest`), which keeps count of what this
    run wrote."""

    def __init__(self, out: Path, planned: list[str], previous: set[str]):
        self.out = out
        self.planned = planned  # every file this run writes, relative, manifest.json too
        self.previous = previous  # the previous run's files, removed by `open`
        self.written: set[str] = set()
        self.opened = False

    @classmethod
    def check(cls, out: Path, planned: list[str], overwrite: bool) -> OutputFolder:
        """Refuse now, touching nothing, when the run would replace a file mergekit-sd did
        not write, or when the folder holds anything and `overwrite` is false."""
        try:
            entries = sorted(out.iterdir()) if out.is_dir() else []
        except OSError as exc:
            raise UserError(f"--out {out}: {exc.strerror or exc}; {OUT_ADVICE}") from None
        if not entries:
            return cls(out, planned, set())
        manifest = _our_manifest(out)
        previous = {n for n in _listed(manifest) if _inside(out, n)} if manifest else set()
        for name in sorted(planned, key=lambda n: n != MANIFEST_NAME):  # the telling one first
            for folder in PurePosixPath(name).parents[:-1]:
                if (out / folder).exists() and not (out / folder).is_dir():
                    raise UserError(f"--out {out}: {folder} is a file where this run writes a "
                                    "folder; move it away or give another --out")
            path = out / name
            if (path.exists() or path.is_symlink()) and name not in previous:
                raise UserError(f"--out {out}: {name} was not written by mergekit-sd, and this "
                                "run would replace it; move it away or give another --out")
        if not overwrite:
            if manifest:
                raise UserError(f"--out {out}: holds a previous render; pass --overwrite to "
                                "replace it (only the files its manifest.json lists), or give "
                                "another --out")
            raise UserError(f"--out {out}: is not empty; give a new or empty folder, or pass "
                            "--overwrite to render into it (files mergekit-sd did not write "
                            "are left alone)")
        return cls(out, planned, previous)

    def open(self, manifest: Manifest) -> None:
        """Create the folder, remove the previous run's files, and write the manifest that
        claims this run's (once; later calls do nothing)."""
        if self.opened:
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--out {self.out}: {exc.strerror or exc}; {OUT_ADVICE}") from None
        # the previous manifest goes last (replaced by ours): stopped half-way, it still
        # lists whatever of its files is left
        for name in sorted(self.previous - {MANIFEST_NAME}):
            path = self.out / name
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise output_error(path, exc) from None
            for folder in path.relative_to(self.out).parents[:-1]:
                try:
                    (self.out / folder).rmdir()  # only when emptied: a user's file stays
                except OSError:
                    break
        manifest.outputs = list(self.planned)
        self.opened = True
        self.write_manifest(manifest)

    def write(self, name: str, data: bytes) -> Path:
        path = write_output(self.out / name, data)
        self.written.add(name)
        return path

    def write_manifest(self, manifest: Manifest) -> Path:
        manifest.complete = all(n in self.written for n in self.planned if n != MANIFEST_NAME)
        return self.write(MANIFEST_NAME, manifest.to_bytes())

    def sync(self, name: str = ".") -> None:
        sync_folder(self.out / name)
