"""Model file I/O: validated safetensors headers (header), lazy tensor reads (reader), a streaming
atomic writer (writer), safe pickle loading (pickled) and file hashes (hashing).

Import from the submodules: this package imports nothing itself, so `inspect` pays only for the
header reader it uses.
"""
