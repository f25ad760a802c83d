"""mergekit-sd: the engine (file formats, architectures, merges, rendering) and its CLI."""

__version__ = "0.1.0"
