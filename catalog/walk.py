"""Find the model files under a root's folders: stat only, nothing read.

Symbolic links are followed (people link model folders between UIs), each real folder is
walked once (a link loop is reported, not followed forever), broken links and unreadable
folders are reported and skipped, and so are files that are not regular (a FIFO would block the
first read forever); half-downloaded files and hidden files are skipped. A name that is not
valid UTF-8 (copied from a Windows disk or a zip made with another encoding) is reported and
skipped: the catalog, and the JSON and recipes that name paths, hold text.
"""

from __future__ import annotations

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
    stack = [folder.path]
    while stack:
        directory = stack.pop()
        try:
            st = directory.stat()
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
        result.folders.append(directory)
        try:
            with os.scandir(directory) as listing:
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
                    result.problems.append(f"{shown(entry.path)}: its name is not valid UTF-8; "
                                           "skipped (rename it to scan it)")
                continue
            lower = entry.name.lower()
            if _is_dir(entry):
                subfolders.append(Path(entry.path))
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
                what = "a broken link" if entry.is_symlink() else f"unreadable ({exc.strerror})"
                result.problems.append(f"{entry.path}: {what}; skipped")
                continue
            if not stat.S_ISREG(info.st_mode):  # reading a FIFO would wait for a writer forever
                result.problems.append(f"{entry.path}: not a regular file (a pipe, socket or "
                                       "device); skipped")
                continue
            path = Path(entry.path)
            result.files.append(FoundFile(path, folder.kind, info.st_dev, info.st_ino,
                                          info.st_size, info.st_mtime_ns,
                                          sidecar_paths(path, names)))
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


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False
