"""Civitai's facts beside a model file: `X.civitai.info` (the version JSON, as Civitai Helper
saves it) and `X.preview.png`, the first preview image allowed.

Previews rated above PG-13 are saved only when the user allows it (`civitai.nsfw_previews`, or
`--nsfw-previews`); a version whose images are all rated higher gets no preview. Videos are not
previews. A preview that cannot be fetched is a note in the report, never a failed download. A
model that already has a preview (a user's own, `X.preview.png`, `X.png` ...) keeps it: no image
is fetched, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx

from catalog.remote_http import GuardedClient
from catalog.safe_names import bare_url
from catalog.sidecars import existing_preview, write_civitai_info, write_preview
from mergekit_sd.errors import WorkFailed

SAFE_NSFW_LEVELS = (1, 2)  # Civitai's browsing levels PG and PG-13 (bit flags: 4 R, 8 X ...)
MAX_PREVIEW_BYTES = 32 * 1024 * 1024
_VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".gif")


@dataclass
class SidecarsWritten:
    info: Path | None = None
    preview: Path | None = None
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


def write_version_sidecars(model: Path, version: dict, http: GuardedClient,
                           allow_nsfw: bool) -> SidecarsWritten:
    """Write `.civitai.info` and, when an allowed image exists, `.preview.png` beside
    `model`."""
    written = SidecarsWritten(info=write_civitai_info(model, version))
    if (own := existing_preview(model)) is not None:
        written.problems.append(f"{model.name}: kept its preview {own.name}")
        return written
    url = preview_url(version, allow_nsfw)
    if url is None:
        return written
    try:
        image = _fetch_image(http, url)
    except WorkFailed as exc:
        written.problems.append(f"{model.name}: no preview ({exc})")
        return written
    if image is None:
        written.problems.append(f"{model.name}: no preview ({bare_url(url)} is not an image)")
        return written
    written.preview = write_preview(model, image)  # None: one appeared meanwhile, and stays
    if written.preview is None:
        written.problems.append(f"{model.name}: kept the preview that appeared beside it")
    return written


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
