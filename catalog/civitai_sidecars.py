"""Civitai's facts beside a model file: `X.civitai.info` (the version JSON, as Civitai Helper
saves it) and `X.preview.png`, the first preview image allowed.

Previews rated above PG-13 are saved only when the user allows it (`civitai.nsfw_previews`, or
`--nsfw-previews`); a version whose images are all rated higher gets no preview. Videos are not
previews. A preview that cannot be fetched is a note in the report, never a failed download. A
model that already has a preview (a user's own, `X.preview.png`, `X.png` ...) keeps it: no image
is fetched, and the report says so.

One exception, for `catalog identify --refresh` (`replace`): a preview this tool saved itself
goes with the information it came with. What was saved is remembered (`PreviewRecord`, kept in
the catalog by the caller, with the model's entry, which follows the file when a scan sees it
renamed or moved): the image's address and the SHA256 of its bytes. A `X.preview.png`
whose bytes are still those is ours; when the refreshed version's preview is another image, it
is replaced (temporary name, then rename), and removed where the version has no image allowed
any more. Anything else (another name, bytes edited or put there by hand, a preview saved
before records were kept) is the user's and stays.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from catalog.remote_http import GuardedClient
from catalog.safe_names import bare_url
from catalog.sidecars import (
    existing_preview,
    our_preview_name,
    replace_preview,
    write_civitai_info,
    write_preview,
)
from mergekit_sd.errors import WorkFailed

SAFE_NSFW_LEVELS = (1, 2)  # Civitai's browsing levels PG and PG-13 (bit flags: 4 R, 8 X ...)
MAX_PREVIEW_BYTES = 32 * 1024 * 1024
_VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".gif")


# what is remembered of a preview saved: {"url": its address without query, "sha256": of its bytes}
PreviewRecord = dict


@dataclass
class SidecarsWritten:
    info: Path | None = None
    preview: Path | None = None  # the preview saved (new or replacing ours) by this call
    record: PreviewRecord | None = None  # ours beside the model now; None: none of ours is there
    problems: list[str] = field(default_factory=list)


def is_safe_image(image: dict) -> bool:
    """Rated PG or PG-13; an unrated image is not assumed safe."""
    level = image.get("nsfwLevel")
    if isinstance(level, int) and not isinstance(level, bool) and level > 0:
        return level in SAFE_NSFW_LEVELS
    # older answers rate with `nsfw`: false or "None" is safe; "Soft", "Mature", "X" are not
    nsfw = image.get("nsfw")
    return nsfw is False or nsfw == "None"


def preview_url(version: dict, allow_nsfw: bool) -> str | None:
    """The first image of the version that may be the preview."""
    for image in version.get("images") or []:
        if not isinstance(image, dict) or not isinstance(image.get("url"), str):
            continue
        url = image["url"]
        if image.get("type", "image") != "image" or bare_url(url).lower().endswith(
                _VIDEO_SUFFIXES):
            continue
        if allow_nsfw or is_safe_image(image):
            return url
    return None


def write_version_sidecars(model: Path, version: dict, http: GuardedClient, allow_nsfw: bool,
                           earlier: PreviewRecord | None = None,
                           replace: bool = False) -> SidecarsWritten:
    """Write `.civitai.info` and, when an allowed image exists, `.preview.png` beside
    `model`. `earlier`: the record of the preview a previous call saved; with `replace`, that
    preview, still as saved, follows `version` (see the module's docstring)."""
    written = SidecarsWritten(info=write_civitai_info(model, version))
    url = preview_url(version, allow_nsfw)
    if (own := existing_preview(model)) is not None:
        if not _is_ours(model, own, earlier):
            written.problems.append(f"{model.name}: kept its preview {own.name}")
            return written
        written.record = earlier
        if not replace:
            written.problems.append(f"{model.name}: kept its preview {own.name}")
        elif url is None:
            _remove(model, own, written)
        elif bare_url(url) != earlier.get("url"):
            _save(model, url, http, written, own)
        return written
    if url is not None:
        _save(model, url, http, written, None)
    return written


def _remove(model: Path, ours: Path, written: SidecarsWritten) -> None:
    """The version has no image allowed now (none at all, or none rated low enough)."""
    try:
        ours.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        written.problems.append(f"{model.name}: cannot remove the preview saved with its "
                                f"earlier information ({exc.strerror})")
        return
    written.record = None
    written.problems.append(f"{model.name}: removed the preview saved with its earlier "
                            "information (the version has no preview allowed now)")


def _is_ours(model: Path, preview: Path, record: PreviewRecord | None) -> bool:
    """`preview` is the one a previous call saved (see the module's docstring)."""
    if record is None or preview.name != our_preview_name(model):
        return False
    try:
        with preview.open("rb") as f:
            data = f.read(MAX_PREVIEW_BYTES + 1)
    except OSError:
        return False
    return hashlib.sha256(data).hexdigest() == record.get("sha256")


def _save(model: Path, url: str, http: GuardedClient, written: SidecarsWritten,
          ours: Path | None) -> None:
    """Fetch the image at `url` as the preview; `ours`: the preview of ours it replaces (kept
    where the new one cannot be had)."""
    kept = "; kept the one saved with its earlier information" if ours else ""
    try:
        image = _fetch_image(http, url)
    except WorkFailed as exc:
        written.problems.append(f"{model.name}: no preview ({exc}){kept}")
        return
    if image is None:
        written.problems.append(f"{model.name}: no preview ({bare_url(url)} is not an image)"
                                f"{kept}")
        return
    if ours is None:
        written.preview = write_preview(model, image)  # None: one appeared meanwhile, and stays
        if written.preview is None:
            written.problems.append(f"{model.name}: kept the preview that appeared beside it")
            return
    elif hashlib.sha256(image).hexdigest() == written.record["sha256"]:
        pass  # the same picture at another address: nothing to replace
    else:
        # checked again: the fetch took a while, and the user may have put theirs there
        if not _is_ours(model, ours, written.record):
            written.problems.append(f"{model.name}: kept its preview {ours.name}")
            written.record = None
            return
        written.preview = replace_preview(model, image)
        written.problems.append(f"{model.name}: replaced its preview {ours.name} (Civitai "
                                "shows another image for it now)")
    written.record = {"url": bare_url(url), "sha256": hashlib.sha256(image).hexdigest()}


def _fetch_image(http: GuardedClient, url: str) -> bytes | None:
    response = http.request("GET", url, what=f"the preview {bare_url(url)}", stream=True)
    try:
        kind = response.headers.get("Content-Type", "")
        if response.status_code != 200 or not kind.startswith("image/"):
            return None
        data = bytearray()
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) > MAX_PREVIEW_BYTES:
                return None
        return bytes(data)
    except httpx.HTTPError:
        return None
    finally:
        response.close()
