"""Synthetic model files in real layouts for tests, benchmarks and the demo (no real weights)."""

from mergekit_sd.testing.checkpoints import (
    CHECKPOINT_VARIANTS,
    checkpoint_specs,
    tiny_dim,
    write_checkpoint,
)
from mergekit_sd.testing.embeddings import EMBEDDING_BASES, write_embedding
from mergekit_sd.testing.loras import (
    LORA_BASES,
    LORA_FORMATS,
    LoraTarget,
    lora_specs,
    lora_targets,
    write_lora,
)
from mergekit_sd.testing.workspace import make_demo_workspace

__all__ = [
    "CHECKPOINT_VARIANTS",
    "EMBEDDING_BASES",
    "LORA_BASES",
    "LORA_FORMATS",
    "LoraTarget",
    "checkpoint_specs",
    "lora_specs",
    "lora_targets",
    "make_demo_workspace",
    "tiny_dim",
    "write_checkpoint",
    "write_embedding",
    "write_lora",
]
