"""Which folders of a root hold models, and what each holds by the convention of its app.

AUTOMATIC1111 / Forge keep `models/Stable-diffusion`, `models/Lora` ... under the web UI's
folder; ComfyUI keeps `models/checkpoints`, `models/loras` ... and may name more folders in
`extra_model_paths.yaml`. Any other folder is scanned whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from mergekit_sd.errors import UserError

A1111_FOLDERS = {
    "models/Stable-diffusion": "checkpoint", "models/Lora": "lora", "models/LyCORIS": "lora",
    "models/VAE": "vae", "embeddings": "embedding", "models/text_encoder": "text_encoder",
}
COMFYUI_FOLDERS = {
    "models/checkpoints": "checkpoint", "models/loras": "lora", "models/vae": "vae",
    "models/clip": "text_encoder", "models/text_encoders": "text_encoder",
    "models/unet": "diffusion_model", "models/diffusion_models": "diffusion_model",
    "models/embeddings": "embedding",
}
# extra_model_paths.yaml category -> what it holds; categories not listed hold no model we read
COMFYUI_CATEGORIES = {folder.split("/")[1]: kind for folder, kind in COMFYUI_FOLDERS.items()}
# a folder added on its own is recognised by its name
FOLDER_NAMES = {Path(folder).name.lower(): kind
                for folder, kind in {**A1111_FOLDERS, **COMFYUI_FOLDERS}.items()}


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    kind: str | None  # checkpoint, lora, vae ... or None for a plain folder


@dataclass(frozen=True)
class RootLayout:
    name: str  # a1111, comfyui, plain
    folders: tuple[ModelFolder, ...]


def detect_layout(root: Path, problems: list[str] | None = None) -> RootLayout:
    """The model folders under `root` (a web UI's folder, ComfyUI's folder, or any folder).
    With `problems`, an unreadable extra_model_paths.yaml is a sentence there and ComfyUI's own
    folders are the layout (a scan of all roots must not stop at one file's typo); without,
    it is a UserError (adding the root is when to fix it)."""
    if not root.is_dir():
        raise UserError(f"{root}: not a folder; give the folder that holds your models")
    if (root / "models" / "Stable-diffusion").is_dir() or (root / "models" / "Lora").is_dir():
        return RootLayout("a1111", _existing(root, A1111_FOLDERS))
    comfy = _existing(root, COMFYUI_FOLDERS)
    extra = root / "extra_model_paths.yaml"
    if comfy or extra.is_file():
        folders = comfy
        if extra.is_file():
            try:
                folders += read_extra_model_paths(extra)
            except UserError as exc:
                if problems is None:
                    raise
                problems.append(f"{exc}; scanned ComfyUI's own folders only")
        return RootLayout("comfyui", tuple(dict.fromkeys(folders)))
    return RootLayout("plain", (ModelFolder(root, FOLDER_NAMES.get(root.name.lower())),))


def _existing(root: Path, folders: dict[str, str]) -> tuple[ModelFolder, ...]:
    return tuple(ModelFolder(root / rel, kind) for rel, kind in folders.items()
                 if (root / rel).is_dir())


def read_extra_model_paths(path: Path) -> tuple[ModelFolder, ...]:
    """The model folders ComfyUI's extra_model_paths.yaml names. Each section has an optional
    `base_path` (relative to the file's folder) and categories whose value is one path per line,
    relative to the base path."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read it as YAML ({exc.__class__.__name__}); fix the "
                        "file or add the model folders as roots one by one") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected sections of base_path and folders, found "
                        f"{type(doc).__name__}")
    folders = []
    for section in doc.values():
        if not isinstance(section, dict):
            continue
        base = Path(os.path.expandvars(str(section.get("base_path", "")))).expanduser()
        base = base if base.is_absolute() else path.parent / base
        for category, value in section.items():
            kind = COMFYUI_CATEGORIES.get(category)
            if kind is None or not isinstance(value, str):
                continue
            for line in value.splitlines():
                if line.strip():
                    folder = Path(os.path.normpath(base / os.path.expanduser(line.strip())))
                    if folder.is_dir():
                        folders.append(ModelFolder(folder, kind))
    return tuple(folders)
