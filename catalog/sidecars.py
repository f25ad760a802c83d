"""Files other tools keep beside a model, read and written so every tool sees the same facts.

- `X.civitai.info`: the Civitai API's model-version JSON (Civitai Helper and friends).
- `X.json`: AUTOMATIC1111's user metadata (activation text, preferred weight, notes, sd version).
- `X.cm-info.json`: Stability Matrix's connected-model info (PascalCase keys).
- `X.preview.png` (or .jpg/.jpeg/.webp, or plain `X.png`): the preview image.
A sidecar that cannot be read is reported and otherwise ignored; it never stops a scan. So is a
`.civitai.info` that lists its files' SHA256 without the model file's, or a `.cm-info.json` whose
SHA256 is another (once the model is hashed): it was left by another file under the same name
(`rm --delete-file` and web UIs leave sidecars), and its ids and base model are that file's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mergekit_sd.io.writer import write_bytes_atomic

CIVITAI_INFO = ".civitai.info"
A1111_JSON = ".json"
STABILITY_MATRIX = ".cm-info.json"
PREVIEWS = (".preview.png", ".preview.jpg", ".preview.jpeg", ".preview.webp",
            ".png", ".jpg", ".jpeg", ".webp")
SIDECAR_SUFFIXES = (CIVITAI_INFO, STABILITY_MATRIX, A1111_JSON) + PREVIEWS
# where an entry's details keep the record of the preview this tool saved beside its file
# (catalog/civitai_sidecars.py): it stays with the entry while the file is the same (rescanned,
# moved, renamed), so that `identify --refresh` still knows that preview for its own
PREVIEW_RECORD = "$.civitai_preview"
# AUTOMATIC1111's "sd version" choices -> our architecture ids
_SURROGATES = re.compile("[\ud800-\udfff]")
A1111_SD_VERSIONS = {"SD1": "sd1", "SD2": "sd2", "SDXL": "sdxl", "SD3": "sd3-medium"}


@dataclass
class SidecarFacts:
    model_name: str | None = None  # the Civitai model's name
    version_name: str | None = None
    model_id: int | None = None
    version_id: int | None = None
    base_model: str | None = None  # Civitai's label: "SDXL 1.0", "Pony", "Flux.1 D" ...
    architecture: str | None = None  # from AUTOMATIC1111's "sd version"
    trained_words: list[str] = field(default_factory=list)
    preferred_weight: float | None = None
    notes: str = ""
    description: str = ""
    nsfw: bool | None = None
    preview: str | None = None
    # the SHA256s the sidecar that gave the Civitai ids lists (`.civitai.info`: its version's
    # files; else `.cm-info.json`: its one file): the model must be one of them
    file_sha256s: list[str] = field(default_factory=list)
    matrix_sha256: str | None = None  # the one a `.cm-info.json` taken names
    # the versions that sidecars of another file name (their ids are not this file's)
    stale_version_ids: list[int] = field(default_factory=list)
    read: list[str] = field(default_factory=list)  # the sidecar files that were read
    problems: list[str] = field(default_factory=list)


def sidecar_paths(model: Path, names_in_folder: set[str] | None = None) -> dict[str, Path]:
    """suffix -> path of each sidecar of `model` that exists. `names_in_folder` (a listing the
    caller already has) saves a stat per candidate."""
    stem = model.name[: -len(model.suffix)] if model.suffix else model.name
    found = {}
    for suffix in SIDECAR_SUFFIXES:
        name = stem + suffix
        if name == model.name:
            continue
        exists = name in names_in_folder if names_in_folder is not None else \
            (model.parent / name).is_file()
        if exists:
            found[suffix] = model.parent / name
    return found


# changed when the catalog records more of the sidecars (2: the file hashes `.civitai.info`
# lists; 3: the one `.cm-info.json` names), so that the next scan reads every file's sidecars
# again, once
SIGNATURE_VERSION = "3"


def signature(paths: dict[str, Path]) -> str:
    """Changes when any sidecar appears, disappears or is rewritten: a rescan re-reads them."""
    parts = []
    for suffix, path in sorted(paths.items()):
        try:
            st = path.stat()
        except OSError:
            continue
        parts.append(f"{suffix}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join([SIGNATURE_VERSION, *parts]) if parts else ""


def _load_json(path: Path, facts: SidecarFacts) -> dict | None:
    if not path.is_file():  # a FIFO named like a sidecar would block the read forever
        facts.problems.append(f"{path}: not a regular file; ignored")
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    # RecursionError: nested deeper than the parser goes, unreadable like any bad JSON
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        facts.problems.append(f"{path}: not readable as JSON ({exc.__class__.__name__}); "
                              "ignored")
        return None
    if not isinstance(doc, dict):
        facts.problems.append(f"{path}: expected a JSON object; ignored")
        return None
    facts.read.append(path.name)
    return doc


def _clean(text: str) -> str:
    """JSON may escape half a surrogate pair (`"\\udcff"`): no text SQLite can store, so it
    becomes U+FFFD, the rest of the sidecar and the file's row unharmed."""
    return _SURROGATES.sub("\ufffd", text)


def _words(value) -> list[str]:
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list):
        return []
    return [_clean(w.strip()) for w in value if isinstance(w, str) and w.strip()]


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value) -> str | None:
    return _clean(value.strip()) or None if isinstance(value, str) else None


def _sha256_in(hashes) -> str | None:
    """The SHA256 (lower case) of a Civitai `hashes` object (`{"SHA256": ..., "CRC32": ...}`)."""
    sha = hashes.get("SHA256") if isinstance(hashes, dict) else None
    return sha.lower() if isinstance(sha, str) and len(sha) == 64 else None


def _listed_sha256s(doc: dict) -> list[str]:
    """The SHA256s (lower case) a Civitai model-version JSON lists for its files."""
    files = doc.get("files") if isinstance(doc.get("files"), list) else []
    return [sha for file in files
            if isinstance(file, dict) and (sha := _sha256_in(file.get("hashes")))]


def _of_another_file(path: Path, theirs: str, sha256: str, facts: SidecarFacts,
                     version_id: int | None) -> None:
    """`path` describes the file that had this name before: not read, and said so."""
    facts.read.remove(path.name)
    if version_id is not None:
        facts.stale_version_ids.append(version_id)
    facts.problems.append(f"{path}: describes another file (SHA256 {theirs[:12]}..., not "
                          f"this file's {sha256[:12]}...); ignored: delete it, or look the "
                          "file up with `mergekit-sd catalog identify`")


def read_sidecars(paths: dict[str, Path], sha256: str | None = None) -> SidecarFacts:
    """What the sidecars say; Civitai's file wins over Stability Matrix's, which wins over
    AUTOMATIC1111's for the facts they share. `sha256`: the model file's, where it is known (a
    `.civitai.info` is trusted until the file is hashed)."""
    facts = SidecarFacts()
    if (path := paths.get(A1111_JSON)) and (doc := _load_json(path, facts)):
        facts.trained_words = _words(doc.get("activation text"))
        weight = doc.get("preferred weight")
        if isinstance(weight, int | float) and not isinstance(weight, bool) and weight:
            facts.preferred_weight = float(weight)  # 0 means "not set" in AUTOMATIC1111
        facts.notes = _text(doc.get("notes")) or ""
        facts.description = _text(doc.get("description")) or ""
        facts.architecture = A1111_SD_VERSIONS.get(str(doc.get("sd version")))
    if (path := paths.get(STABILITY_MATRIX)) and (doc := _load_json(path, facts)):
        _read_stability_matrix(path, doc, sha256, facts)
    if (path := paths.get(CIVITAI_INFO)) and (doc := _load_json(path, facts)) and doc:
        _read_civitai_info(path, doc, sha256, facts)
    for suffix in PREVIEWS:
        if suffix in paths:
            facts.preview = str(paths[suffix])
            break
    return facts


def _read_stability_matrix(path: Path, doc: dict, sha256: str | None,
                           facts: SidecarFacts) -> None:
    """Stability Matrix's ConnectedModelInfo: the Civitai model and version of its one file,
    whose hashes are in `Hashes` (`SHA256`, `CRC32`, `BLAKE3`, as Civitai gave them)."""
    theirs = _sha256_in(doc.get("Hashes"))
    if sha256 and theirs and sha256.lower() != theirs:
        _of_another_file(path, theirs, sha256, facts, _int(doc.get("VersionId")))
        return
    # a sidecar without a SHA256 (older Stability Matrix versions, a file imported with no
    # Civitai match, one written by hand) cannot be checked: it is trusted, as `.civitai.info`
    # is before the file is hashed; the CRC32 alone is too weak to refuse a sidecar on, and
    # the catalog computes no BLAKE3
    facts.matrix_sha256 = theirs
    facts.file_sha256s = [theirs] if theirs else []
    facts.model_name = _text(doc.get("ModelName"))
    facts.version_name = _text(doc.get("VersionName"))
    facts.model_id = _int(doc.get("ModelId"))
    facts.version_id = _int(doc.get("VersionId"))
    facts.base_model = _text(doc.get("BaseModel"))
    facts.trained_words = _words(doc.get("TrainedWords")) or facts.trained_words
    facts.nsfw = doc.get("Nsfw") if isinstance(doc.get("Nsfw"), bool) else None


def _read_civitai_info(path: Path, doc: dict, sha256: str | None, facts: SidecarFacts) -> None:
    listed = _listed_sha256s(doc)
    if sha256 and listed and sha256.lower() not in listed:
        _of_another_file(path, listed[0], sha256, facts, _int(doc.get("id")))
        return
    facts.file_sha256s = listed  # its ids win over Stability Matrix's
    model = doc.get("model") if isinstance(doc.get("model"), dict) else {}
    facts.model_name = _text(model.get("name")) or facts.model_name
    facts.version_name = _text(doc.get("name")) or facts.version_name
    facts.model_id = _int(doc.get("modelId")) or facts.model_id
    facts.version_id = _int(doc.get("id")) or facts.version_id
    facts.base_model = _text(doc.get("baseModel")) or facts.base_model
    facts.trained_words = _words(doc.get("trainedWords")) or facts.trained_words
    if isinstance(model.get("nsfw"), bool):
        facts.nsfw = model["nsfw"]


def write_civitai_info(model: Path, version: dict) -> Path:
    """Save Civitai's model-version JSON as `X.civitai.info`, as Civitai Helper does."""
    data = json.dumps(version, indent=4, ensure_ascii=False).encode("utf-8")
    return write_bytes_atomic(_beside(model, CIVITAI_INFO), data)


def existing_preview(model: Path) -> Path | None:
    """The preview image a web UI would show for `model` now (`X.preview.png`, `X.png` ...)."""
    for suffix in PREVIEWS:
        if (path := _beside(model, suffix)) != model and path.is_file():
            return path
    return None


def our_preview_name(model: Path) -> str:
    """The name previews are saved under: `X.preview.png`, the one every web UI looks for
    first."""
    return _beside(model, ".preview.png").name


def write_preview(model: Path, image: bytes) -> Path | None:
    """Save a preview image as `X.preview.png`; None, writing nothing, where `model` already has
    a preview: one a user chose is theirs to keep."""
    if existing_preview(model) is not None:
        return None
    return replace_preview(model, image)


def replace_preview(model: Path, image: bytes) -> Path:
    """Save a preview image as `X.preview.png` whatever is there (the caller knows it is not
    the user's): a temporary name, then a rename over it."""
    return write_bytes_atomic(_beside(model, ".preview.png"), image)


def _beside(model: Path, suffix: str) -> Path:
    """The sidecar name other tools use: the model's stem plus `suffix`."""
    return model.with_name(model.name[: -len(model.suffix)] + suffix)
