"""The CLIP tokenizer, offline, with each family's conventions.

Stable Diffusion 1.x (CLIP ViT-L/14), 2.x (OpenCLIP ViT-H) and SDXL share one byte-level BPE
vocabulary of 49,408 tokens: 256 byte symbols, the same with the end-of-word mark ``</w>``, 48,894
merges, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407). Sequences are 77 tokens:
start, text, end, then padding - with ``<|endoftext|>`` for SD1.x, and with ``!`` (id 0) for the
OpenCLIP encoders of SD2.x and SDXL's second encoder.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources

from transformers import CLIPTokenizer

from ..families.sd.configs import Family

__all__ = ["MAX_LENGTH", "clip_tokenizer"]

MAX_LENGTH = 77
_NUM_MERGES = 49408 - 2 * 256 - 2  # vocabulary size minus byte symbols and the two specials


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map of byte-level BPE, in vocabulary order:
    printable Latin-1 bytes first (mapped to themselves), then the other bytes, in byte order,
    mapped to code points from 256 upwards."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    rest = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(rest)}


@functools.cache
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    raw = resources.files("controlnet").joinpath("assets/clip_bpe_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]  # line 0: a version header
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def clip_tokenizer(family: Family = Family.SD1, *, second: bool = False) -> CLIPTokenizer:
    """The tokenizer of ``family``'s text encoder (``second``: SDXL's OpenCLIP encoder)."""
    vocab, merges = _vocab_and_merges()
    openclip = family is Family.SD2 or (family is Family.SDXL and second)
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        pad_token="!" if openclip else "<|endoftext|>",
        model_max_length=MAX_LENGTH,
    )
