"""The demo workspace: an AUTOMATIC1111-style models folder of tiny synthetic files.

`make demo` and `make tui` run on it, so a fresh machine with no models and no network has
something real to scan, merge, bake and render. Safe to re-run: files already there with the
expected tensors are left alone (same bytes, same mtime, so catalog hash caches stay valid).
A folder holding anything else is refused unless `overwrite`: the demo's random-weight models
must never land among a user's own (a web UI folder), nor replace a file of the same name.
"""

from __future__ import annotations

import os
from pathlib import Path

from mergekit_sd.errors import BadModelFile, UserError
from mergekit_sd.io.header import read_header
from mergekit_sd.testing.checkpoints import checkpoint_specs, write_checkpoint
from mergekit_sd.testing.loras import lora_specs, write_lora

# (folder under models/, file name, kind, variant or LoRA format, seed, title)
_DEMO_FILES = (
    ("Stable-diffusion", "demo-sd15-base", "checkpoint", "sd1", 1, "Demo SD1.5 base"),
    ("Stable-diffusion", "demo-sd15-anime", "checkpoint", "sd1", 2, "Demo SD1.5 anime"),
    ("Stable-diffusion", "demo-sd15-photo", "checkpoint", "sd1", 3, "Demo SD1.5 photo"),
    ("Stable-diffusion", "demo-sdxl-base", "checkpoint", "sdxl", 4, "Demo SDXL base"),
    ("Lora", "demo-lora-mychar", "lora", "kohya-sd1", 5, "Demo character LoRA"),
    ("Lora", "demo-loha-style", "lora", "loha-sd1", 6, "Demo style LoHa"),
    ("VAE", "demo-vae-sd", "checkpoint", "vae-sd", 7, "Demo SD VAE"),
)
_ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base",
                  "vae-sd": "stable-diffusion-v1/vae"}


def _complete(path: Path, names: set[str]) -> bool:
    """Whether `path` is a valid file holding exactly the tensors a fresh one would."""
    try:
        return set(read_header(path).tensors) == names
    except BadModelFile:
        return False


# says a folder is a demo workspace, so that it is refreshed whatever else `make demo` and the
# user wrote into it since (merges, renders, a catalog)
MARKER = ".mergekit-sd-demo"
_MARKER_TEXT = b"Made by `mergekit-sd demo-workspace`: its models have random weights.\n"


def _expected_names(kind: str, name: str) -> set[str]:
    specs = checkpoint_specs(name) if kind == "checkpoint" else lora_specs(name)
    return {s.name for s in specs}


def foreign_file(root: Path) -> Path | None:
    """A file under `root` that is none of the demo's, or None when the demo may be written
    there: `root` is new or holds no file, is marked a demo workspace, or (one made before
    the marker) its models/ holds nothing but demo models. Stops at the first file found."""
    if not root.is_dir() or (root / MARKER).is_file():
        return None
    demo = {root / "models" / folder / f"{stem}.safetensors": (kind, name)
            for folder, stem, kind, name, _seed, _title in _DEMO_FILES}
    models_found = False
    for folder, _dirs, files in os.walk(root / "models"):
        for file in files:
            path = Path(folder) / file
            if path not in demo or not _complete(path, _expected_names(*demo[path])):
                return path  # a model folder of the user's, or a file in a demo model's place
            models_found = True
    if models_found:
        return None
    for folder, _dirs, files in os.walk(root):
        if files:
            return Path(folder) / files[0]
    return None


def make_demo_workspace(root: str | Path, overwrite: bool = False) -> list[Path]:
    """Create (or complete) ROOT/models/{Stable-diffusion,Lora,VAE} and return the files.
    Refuses (UserError) a folder holding files that are not the demo's unless `overwrite`."""
    root = Path(root)
    other = None if overwrite else foreign_file(root)
    if other is not None:
        raise UserError(f"{root}: holds files that are not the demo's ({other}); give a new or "
                        "empty folder, or pass --overwrite to put the demo models beside them "
                        "(replacing any of the same names)")
    # first, so that a run stopped part way leaves a folder the next run refreshes; its
    # presence is what counts, not its bytes (an OSError is the CLI's one sentence)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_bytes(_MARKER_TEXT)
    models = root / "models"
    paths = []
    for folder, stem, kind, name, seed, title in _DEMO_FILES:
        path = models / folder / f"{stem}.safetensors"
        paths.append(path)
        if kind == "checkpoint":
            if not _complete(path, {s.name for s in checkpoint_specs(name)}):
                metadata = {"modelspec.sai_model_spec": "1.0.0",
                            "modelspec.architecture": _ARCHITECTURES[name],
                            "modelspec.title": title,
                            "modelspec.description": "Synthetic demo model (random weights)"}
                write_checkpoint(path, name, seed=seed, metadata=metadata)
        elif not _complete(path, {s.name for s in lora_specs(name)}):
            write_lora(path, name, seed=seed)
    return paths
