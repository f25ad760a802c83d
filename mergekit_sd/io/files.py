"""Opening model files: the operating system's refusals as one sentence each."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from mergekit_sd.errors import BadModelFile


@contextlib.contextmanager
def os_errors_as_sentences(path) -> Iterator[None]:
    """Turn a missing file, a directory or a permission problem into BadModelFile."""
    try:
        yield
    except IsADirectoryError:
        raise BadModelFile(path, "is a directory, not a model file; name the file inside it"
                           ) from None
    except FileNotFoundError:
        raise BadModelFile(path, "does not exist") from None
    except PermissionError:
        raise BadModelFile(path, "cannot be read (permission denied)") from None
