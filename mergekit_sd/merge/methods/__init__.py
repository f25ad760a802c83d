"""Built-in merge methods, one module per family; importing this package registers them all."""

from mergekit_sd.merge.methods import basic, geometric, lora_bake, supermerger, ties

__all__ = ["basic", "geometric", "lora_bake", "supermerger", "ties"]
