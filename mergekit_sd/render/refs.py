"""Model references on the render command line: paths, `hf://org/repo/file` already in the
Hugging Face cache, and everything else (`catalog:` names, `#12`, `sha256:`, downloads) through
the resolver the caller injects (DESIGN.md decision 7)."""

from __future__ import annotations

from pathlib import Path

from mergekit_sd.errors import UserError
from mergekit_sd.recipe.refs import SCHEMES, NoResolver, ResolvedModel, Resolver

HF_SCHEME = "hf://"


def looks_like_path(ref: str) -> bool:
    """Whether a reference that names no existing file was meant as a path (a typo) rather
    than as a catalog name."""
    if ref.startswith(SCHEMES):
        return False
    return "/" in ref or ref.endswith((".safetensors", ".yaml", ".yml", ".ckpt", ".pt"))


def hf_cached(ref: str) -> Path | None:
    """The cached file of `hf://org/repo/path/in/repo`, or None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    parts = ref.removeprefix(HF_SCHEME).split("/")
    if len(parts) < 3:
        raise UserError(f"{ref!r}: write Hugging Face files as hf://org/repo/file")
    found = try_to_load_from_cache("/".join(parts[:2]), "/".join(parts[2:]))
    return Path(found) if isinstance(found, str) else None


def path_exists(path: Path, what: str, ref: str) -> bool:
    """`path.exists()`, with a path the system cannot even look up (a name too long, a
    symlink loop) as one sentence rather than an OSError."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise UserError(f"{what} {ref}: cannot be opened ({exc.strerror or exc})") from None
    return True


def resolve_file(ref: str, resolver: Resolver | None, what: str, advice: str = ""
                 ) -> ResolvedModel:
    """A file for `ref`, or one sentence saying why there is none. `what` names its role
    ("candidate", "--lora") and `advice` is appended when nothing is found."""
    path = Path(ref).expanduser()
    if path_exists(path, what, ref):
        if not path.is_file():
            raise UserError(f"{what} {ref}: is a folder, not a model file")
        return ResolvedModel(path)
    if ref.startswith(HF_SCHEME):
        cached = hf_cached(ref)
        if cached is not None:
            return ResolvedModel(cached)
    elif looks_like_path(ref):
        raise UserError(f"{what} {ref}: does not exist")
    try:
        return (resolver or NoResolver())(ref)
    except LookupError as exc:
        sentence = str(exc.args[0]) if exc.args else f"{ref!r} was not found"
        raise UserError(f"{what} {ref}: {sentence}{advice}") from None
