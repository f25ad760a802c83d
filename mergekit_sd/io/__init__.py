"""Model file I/O: validated safetensors headers, lazy tensor reads, a streaming atomic writer."""

from mergekit_sd.io.header import SafetensorsHeader, TensorInfo, read_header
from mergekit_sd.io.reader import SafetensorsReader
from mergekit_sd.io.writer import StreamingWriter, TensorSpec

__all__ = [
    "SafetensorsHeader",
    "SafetensorsReader",
    "StreamingWriter",
    "TensorInfo",
    "TensorSpec",
    "read_header",
]
