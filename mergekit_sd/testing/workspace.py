"""The demo workspace: an AUTOMATIC1111-style models folder of tiny synthetic files.

`make demo` and `make tui` run on it, so a fresh machine with no models and no network has
something real to scan, merge, bake and render. Safe to re-run: files already there with the
expected tensors are left alone (same bytes, same mtime, so catalog hash caches stay valid).
"""

from __future__ import annotations

from pathlib import Path

from mergekit_sd.errors import BadModelFile
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


def make_demo_workspace(root: str | Path) -> list[Path]:
    """Create (or complete) ROOT/models/{Stable-diffusion,Lora,VAE} and return the files."""
    models = Path(root) / "models"
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
