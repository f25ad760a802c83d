"""Merging: the method registry, the built-in methods, planning and the streaming executor."""
