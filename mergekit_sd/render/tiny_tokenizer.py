"""The tiny CLIP tokenizer shipped for test and demo models (mergekit_sd/render/tiny/clip/).

Tiny checkpoints keep 772 of CLIP's 49408 token embeddings, so they need a vocabulary of at
most that many tokens in CLIP's format: the 256 byte symbols, the same with the end-of-word
mark `</w>`, byte-pair merges learned here from a small corpus of prompt words, and the two
special tokens last, as in CLIP's own vocab.json. `build_clip_tokenizer` wrote the shipped files;
a test checks that it still writes the same bytes.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import cache
from pathlib import Path

TINY_DIR = Path(__file__).resolve().parent / "tiny"
TINY_CLIP = TINY_DIR / "clip"
VOCAB_SIZE = 772  # CLIP's 49408 under the tiny shrink rule (d // 64)
SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_END = "</w>"
_WORD = re.compile(r"[a-z]+")


@cache
def byte_symbols() -> tuple[str, ...]:
    """GPT-2 / CLIP's printable stand-in for each byte value, in CLIP's vocabulary order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in printable) + tuple(
        chars[b] for b in range(256) if b not in printable)


def learn_merges(text: str, count: int) -> list[tuple[str, str]]:
    """Byte-pair merges in order, most frequent pair first (ties: alphabetical)."""
    words = Counter(_WORD.findall(text.lower()))
    spelled = {w: [*w[:-1], w[-1] + _END] for w in words}
    merges = []
    while len(merges) < count:
        pairs: Counter = Counter()
        for word, symbols in spelled.items():
            for a, b in zip(symbols, symbols[1:], strict=False):
                pairs[(a, b)] += words[word]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, symbols in spelled.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            spelled[word] = merged
    return merges


def build_clip_tokenizer(corpus: str, folder: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json for a CLIPTokenizer."""
    symbols = byte_symbols()
    vocab = [*symbols, *(s + _END for s in symbols)]
    merges = learn_merges(corpus, vocab_size - len(vocab) - len(SPECIALS))
    vocab += [a + b for a, b in merges]
    vocab += SPECIALS
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False) + "\n",
        encoding="utf-8")
    lines = ["#version: 0.2 - tiny CLIP tokenizer for mergekit-sd test models"]
    lines += [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 16,
              "bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "pad_token": SPECIALS[1],
              "unk_token": SPECIALS[1]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":  # python -m mergekit_sd.render.tiny_tokenizer: rewrite the files
    build_clip_tokenizer((TINY_DIR / "corpus.txt").read_text(encoding="utf-8"), TINY_CLIP)
