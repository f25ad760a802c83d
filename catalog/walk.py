"""Find the model files under a root's folders: stat only, nothing read.

Symbolic links are followed (people link model folders between UIs) and files are recorded
under their real path, so a file reached through a link and directly is one file; each real
folder is walked once (a link loop is reported, not followed forever), broken links and unreadable
folders are reported and skipped, and so are files that are not regular (a FIFO would block the
first read forever); half-downloaded files and hidden files are skipped. A name that is not
valid UTF-8 (copied from a Windows disk or a zip made with another encoding) is reported and
skipped: the catalog, and the JSON and recipes that name paths, hold text.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from catalog.layouts import ModelFolder
from catalog.sidecars import sidecar_paths

MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
# in-progress downloads of browsers, download managers, huggingface_hub and ourselves
PARTIAL_SUFFIXES = (".partial", ".part", ".downloading", ".crdownload", ".incomplete", ".tmp")


@dataclass(frozen=True)
class FoundFile:
    path: Path
    folder_kind: str | None
    device: int
    inode: int
    size: int
    mtime_ns: int
    sidecars: dict[str, Path]


@dataclass
class WalkResult:
    files: list[FoundFile] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one sentence each, none fatal
    partial: int = 0  # half-downloaded files skipped
    folders: list[Path] = field(default_factory=list)  # every folder walked


def walk(folders: tuple[ModelFolder, ...] | list[ModelFolder]) -> WalkResult:
    result = WalkResult()
    visited: set[tuple[int, int]] = set()
    for folder in folders:
        _walk_folder(folder, result, visited)
    return result


def _walk_folder(folder: ModelFolder, result: WalkResult, visited: set[tuple[int, int]]) -> None:
    # (the folder as reached, for messages; its real path, for listing and the files' paths):
    # one realpath for the top folder and one per link met, not one per file
    stack = [(folder.path, Path(os.path.realpath(folder.path)))]
    if not is_utf8(str(stack[0][1])):
        result.problems.append(f"{folder.path}: leads to {shown(stack[0][1])}, a name that is "
                               "not valid UTF-8; skipped")
        return
    while stack:
        directory, real = stack.pop()
        try:
            st = real.stat()
        except OSError as exc:
            result.problems.append(f"{directory}: cannot open the folder ({exc.strerror}); "
                                   "skipped")
            continue
        if (st.st_dev, st.st_ino) in visited:
            if directory != folder.path:
                result.problems.append(f"{directory}: links back to a folder already scanned "
                                       "(a link loop or a second link); walked once")
            continue
        visited.add((st.st_dev, st.st_ino))
        result.folders.append(real)
        try:
            with os.scandir(real) as listing:
                entries = [e for e in listing if not e.name.startswith(".")]
        except OSError as exc:
            result.problems.append(f"{directory}: cannot list the folder ({exc.strerror}); "
                                   "skipped")
            continue
        names = {e.name for e in entries}
        subfolders = []
        for entry in entries:
            if not is_utf8(entry.name):
                if entry.name.lower().endswith(MODEL_SUFFIXES) or _is_dir(entry):
                    result.problems.append(f"{shown(directory / entry.name)}: its name is not "
                                           "valid UTF-8; skipped (rename it to scan it)")
                continue
            lower = entry.name.lower()
            if _is_dir(entry):
                if (real_folder := _real(entry, directory, result)) is not None:
                    subfolders.append((directory / entry.name, real_folder))
                continue
            if lower.endswith(PARTIAL_SUFFIXES):
                if ".safetensors" in lower or lower.endswith(MODEL_SUFFIXES, 0, lower.rfind(".")):
                    result.partial += 1
                continue
            if not lower.endswith(MODEL_SUFFIXES):
                continue
            try:
                info = entry.stat()  # follows links
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # links that lead to each other, never to a file
                    what = "a link loop"
                elif entry.is_symlink():
                    what = "a broken link"
                else:
                    what = f"unreadable ({exc.strerror})"
                result.problems.append(f"{directory / entry.name}: {what}; skipped")
                continue
            if not stat.S_ISREG(info.st_mode):  # reading a FIFO would wait for a writer forever
                result.problems.append(f"{directory / entry.name}: not a regular file (a pipe, "
                                       "socket or device); skipped")
                continue
            path = _real(entry, directory, result)
            if path is None:
                continue
            # a linked file's sidecars are the real file's, whichever link found it
            sidecars = sidecar_paths(path) if entry.is_symlink() else sidecar_paths(path, names)
            result.files.append(FoundFile(path, folder.kind, info.st_dev, info.st_ino,
                                          info.st_size, info.st_mtime_ns, sidecars))
        stack.extend(sorted(subfolders, reverse=True))


def is_utf8(name: str) -> bool:
    """Whether a name from the OS is valid UTF-8 (Python keeps the other bytes as lone
    surrogates, which SQLite and JSON encoders refuse)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(path: str | os.PathLike) -> str:
    """A path for a message: bytes that are not UTF-8 written as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _real(entry: os.DirEntry, directory: Path, result: WalkResult) -> Path | None:
    """The entry's real path (its folder is real already, so only a link needs resolving);
    None, noted, where a link leads to a name that is not UTF-8."""
    if not entry.is_symlink():
        return Path(entry.path)
    real = os.path.realpath(entry.path)
    if not is_utf8(real):
        result.problems.append(f"{directory / entry.name}: links to {shown(real)}, a name that is "
                               "not valid UTF-8; skipped")
        return None
    return Path(real)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False
