"""What a pipeline needs besides the checkpoint's weights: tokenizers and scheduler settings.

Tokenizers come, in this order, from a local diffusers-format folder (`--config-dir`), the
tiny CLIP tokenizer shipped for test models (a text encoder with the tiny vocabulary), the
Hugging Face cache of the family's reference release, or, when online, a download of just the
tokenizer files into that cache. Offline, a missing tokenizer is one sentence saying which and
how to get it. Scheduler settings are the reference releases' own, shipped in schedulers.json.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

from mergekit_sd.errors import UserError
from mergekit_sd.render.layout import FAMILY_LABELS
from mergekit_sd.render.tiny_tokenizer import TINY_CLIP, VOCAB_SIZE

REFERENCE_REPOS = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "flux": "black-forest-labs/FLUX.1-schnell",
}
TOKENIZER_FOLDERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2",
                     "text_encoder_3": "tokenizer_3"}
_SCHEDULERS = Path(__file__).resolve().parent / "schedulers.json"


class MissingAsset(UserError):
    """A tokenizer or config that is not on this machine; the sentence says how to get it."""


def scheduler_config(family: str, variant: str | None = None) -> dict:
    """The reference release's scheduler_config.json (FLUX: dev's or schnell's)."""
    configs = json.loads(_SCHEDULERS.read_text())
    key = f"flux-{'schnell' if variant == 'flux-schnell' else 'dev'}" if family == "flux" \
        else family
    return dict(configs[key])


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def forbid_downloads() -> None:
    """`render/compare --offline`: huggingface_hub's offline mode for this run, so a tokenizer
    missing from the cache is one sentence, never a download. The library reads
    HF_HUB_OFFLINE once, when it is imported: the variable is set for the libraries not
    loaded yet (diffusers, transformers), its constant for a huggingface_hub already loaded."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True


# The files each tokenizer is read from (T5 from tokenizer.json: sentencepiece is not needed).
_TOKENIZER_FILES = {"clip": ("vocab.json", "merges.txt"), "t5": ("tokenizer.json",)}
_PROBE = "a photo of a cat"  # what a tokenizer must encode to be used (`_prove`)


def _cached_folder(family: str, folder: str) -> Path:
    """The reference release's tokenizer folder from the Hugging Face cache, downloading just
    that folder when it is missing and the machine is online."""
    from huggingface_hub import snapshot_download

    repo = REFERENCE_REPOS[family]
    how = (f"download it once with `hf download {repo} --include '{folder}/*'` (online), or "
           f"pass --config-dir with a diffusers-format folder that has {folder}/")
    try:
        return Path(snapshot_download(repo, allow_patterns=[f"{folder}/*"],
                                      local_files_only=True)) / folder
    except Exception:  # not cached: LocalEntryNotFoundError and relatives
        if _offline():
            raise MissingAsset(f"{FAMILY_LABELS[family]} rendering needs the {folder} of "
                               f"{repo}, which is not in the Hugging Face cache; {how}"
                               ) from None
    try:
        return Path(snapshot_download(repo, allow_patterns=[f"{folder}/*"])) / folder
    except Exception as exc:  # network errors, gated repositories: all end in one advice
        raise MissingAsset(f"{FAMILY_LABELS[family]} rendering needs the {folder} of {repo} "
                           f"and downloading it failed ({type(exc).__name__}); {how}") from None


def load_tokenizer(family: str, component: str, kind: str, vocab_size: int,
                   config_dir: Path | None = None):
    """The tokenizer of `component` ("clip" or "t5" `kind`) for a text encoder of
    `vocab_size` tokens."""
    folder = TOKENIZER_FOLDERS[component]
    if config_dir is not None:
        if not Path(config_dir).is_dir():
            what = "is not a folder" if Path(config_dir).exists() else "does not exist"
            raise UserError(f"--config-dir {config_dir} {what}; give a diffusers-format "
                            f"folder that has {folder}/, or leave --config-dir out")
        path = Path(config_dir) / folder
    elif kind == "clip" and vocab_size <= VOCAB_SIZE:
        path = TINY_CLIP
    else:
        path = _cached_folder(family, folder)
    missing = [name for name in _TOKENIZER_FILES[kind] if not (path / name).is_file()]
    if missing:
        raise MissingAsset(f"{path} has no {missing[0]}; {FAMILY_LABELS[family]} rendering "
                           f"needs a {kind.upper()} tokenizer there (the {folder}/ folder of a "
                           "diffusers-format model)")
    advice = f"give the {folder}/ folder of a diffusers-format model"
    try:
        tokenizer = _tokenizer_class(kind).from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # the tokenizers library raises bare Exceptions for bad files
        raise UserError(f"{path}: could not be read as a {kind.upper()} tokenizer "
                        f"({_first_line(exc)}); {advice}") from None
    _prove(tokenizer, kind, vocab_size, f"{path}: ", advice)
    return tokenizer


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]


def _prove(tokenizer, kind: str, vocab_size: int, where: str, advice: str) -> None:
    """Encode a short text as the render will: a tokenizer can load yet lack its special
    tokens (a vocab.json without <|endoftext|>) or give ids the text encoder has no embedding
    for, and would otherwise fail only when the first prompt is encoded, after the output
    folder was made."""
    try:
        ids = list(tokenizer(_PROBE).input_ids)
    except Exception as exc:  # the tokenizers library raises bare Exceptions
        raise UserError(f"{where}loads but cannot encode text as a {kind.upper()} tokenizer "
                        f"({_first_line(exc)}); {advice}") from None
    # CLIP's text encoder pools at the end token, T5 ends every text with it
    first = [tokenizer.bos_token_id] if kind == "clip" else []
    if None in (*first, tokenizer.eos_token_id) or ids[:len(first)] != first \
            or ids[-1:] != [tokenizer.eos_token_id]:
        raise UserError(f"{where}does not mark the start and end of a text with its special "
                        f"tokens as a {kind.upper()} tokenizer does; {advice}")
    if max(ids) >= vocab_size:
        raise UserError(f"{where}gives token id {max(ids)} but the text encoder has "
                        f"{vocab_size} tokens, so it is not this checkpoint's tokenizer; "
                        f"{advice}")


@cache
def _tokenizer_class(kind: str):
    if kind == "clip":
        from transformers import CLIPTokenizer

        return CLIPTokenizer
    from transformers import T5TokenizerFast

    return T5TokenizerFast
