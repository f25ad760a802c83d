"""Writing render outputs: atomic files, PNGs with AUTOMATIC1111's `parameters` text chunk.

Every file is written as NAME.partial, fsynced and renamed, so an interrupted run never leaves
a half image or manifest under the final name. PNG bytes depend only on the pixels and the
parameters text (no timestamps), so the same render gives the same file.
"""

from __future__ import annotations

import errno
import io
from pathlib import Path

from mergekit_sd.errors import UserError, WorkFailed
from mergekit_sd.io.writer import fsync_directory, write_bytes_atomic

# A path the user can fix (exit code 2); other write errors, a full disk above all, are the
# work failing (exit code 1).
_BAD_PATH = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ENAMETOOLONG,
             errno.EEXIST, errno.ELOOP, errno.EISDIR}
OUT_ADVICE = "give --out a folder that can be created and written"


def output_error(path: Path, exc: OSError) -> Exception:
    """One sentence for an OSError met writing `path`."""
    reason = exc.strerror or str(exc)
    if exc.errno in _BAD_PATH:
        return UserError(f"{path}: cannot be written ({reason}); {OUT_ADVICE}")
    return WorkFailed(f"{path}: could not be written ({reason})")


def write_output(path: Path, data: bytes) -> Path:
    """`write_bytes_atomic`, with write errors as one sentence instead of a traceback."""
    try:
        return write_bytes_atomic(path, data)
    except OSError as exc:
        raise output_error(path, exc) from None


def sync_folder(folder: Path) -> None:
    """Make the renames of a run durable (once per folder, not per file)."""
    try:
        fsync_directory(folder)
    except OSError as exc:
        raise output_error(folder, exc) from None


def png_bytes(image, parameters: str | None = None) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = None
    if parameters is not None:
        info = PngInfo()
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def a1111_parameters(prompt: str, negative: str | None, fields: dict[str, object]) -> str:
    """AUTOMATIC1111's infotext: the prompt, `Negative prompt: ...`, then `Key: value, ...`
    (values with commas or colons quoted, as the web UI writes them)."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        text = str(value)
        if any(c in text for c in ",:\n\""):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}: {text}")
    lines.append(", ".join(parts))
    return "\n".join(lines)
