"""Prompt syntax: emphasis weights and prompts longer than the text encoder's window.

CLIP reads 77 tokens: a start token, 75 of text, an end token. The released ControlNet apps and
diffusers cut a longer prompt there. The syntax people write for the A1111 web UI (the home of the
most used ControlNet extension) does two more things, and ``weighted`` prompts here read it the
same way:

- Emphasis: ``(words)`` multiplies the words' attention weight by 1.1, ``[words]`` divides it by
  1.1, ``(words:1.5)`` multiplies it by 1.5; brackets nest (their factors multiply), ``\\(`` and
  ``\\[`` are literal brackets, and a bracket left open applies to the rest of the prompt. The
  encoder's output vectors are scaled by their tokens' weights, then the whole is rescaled to the
  mean it had before, so that emphasis moves attention between words instead of changing the
  context's overall size (a context whose mean is zero, or changes sign, has no size to restore:
  it is left scaled, never divided by zero).
- Long prompts: the tokens are cut into chunks of 75 (a chunk that fills up inside the last 20
  tokens after a comma ends at that comma, so phrases stay whole; the word ``BREAK`` ends a chunk
  where it stands), each chunk is encoded as its own 77-token sequence, and the UNet attends to
  all of them side by side (a context of 77 x chunks). The prompt and the negative prompt are
  brought to the same number of chunks with chunks of the empty prompt. SDXL's pooled prompt
  vector comes from the first chunk.

A prompt with no brackets, no ``BREAK`` and at most 75 tokens is encoded exactly as ``plain``
encodes it. ``plain`` reads the text as it is and cuts it after 75 tokens, with a warning naming
what was cut.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..choices import PromptSyntax
from ..families.protocol import BaseModel, PromptEmbeddings
from ..families.sd.configs import Family
from .tokenizer import MAX_LENGTH, clip_tokenizer

__all__ = [
    "CHUNK_TOKENS",
    "EMPHASIS",
    "TokenChunk",
    "encode_guided",
    "encode_prompts",
    "long_prompts",
    "parse_emphasis",
    "prompt_chunks",
    "token_count",
]

#: the factor of one pair of round brackets (square brackets divide by it)
EMPHASIS = 1.1
#: text tokens per chunk: the window minus the start and end tokens
CHUNK_TOKENS = MAX_LENGTH - 2
#: a full chunk ends at a comma at most this many tokens back
COMMA_BACKTRACK = 20


_TOKENS = re.compile(
    r"""
    \\[\\()\[\]]                                   # an escaped bracket or backslash
    | \(                                           # open round
    | \[                                           # open square
    | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)  # ":1.5)": close round with an explicit weight
    | \)                                           # close round
    | \]                                           # close square
    | \bBREAK\b                                    # a chunk break
    | [^\\()\[\]:B]+                               # plain text up to anything special
    | .                                            # any other single character (":", "B", "\\")
    """,
    re.VERBOSE | re.DOTALL,
)


def parse_emphasis(text: str) -> list[tuple[str, float | None]]:
    """``text`` -> [(piece, weight)] in order, neighbours of equal weight merged; a chunk break
    is the piece ``("BREAK", None)``. A closing bracket with no open one of its kind is text."""
    pieces: list[list] = []  # [text, weight]
    round_open: list[int] = []  # index into pieces where each open bracket's range starts
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not None:
                piece[1] *= factor

    for m in _TOKENS.finditer(text):
        tok = m.group(0)
        if tok.startswith("\\") and len(tok) == 2:
            pieces.append([tok[1], 1.0])
        elif tok == "(":
            round_open.append(len(pieces))
        elif tok == "[":
            square_open.append(len(pieces))
        elif m.group("weight") is not None and round_open:
            scale(round_open.pop(), float(m.group("weight")))
        elif tok == ")" and round_open:
            scale(round_open.pop(), EMPHASIS)
        elif tok == "]" and square_open:
            scale(square_open.pop(), 1 / EMPHASIS)
        elif tok == "BREAK":
            pieces.append(["BREAK", None])
        else:
            pieces.append([tok, 1.0])
    for start in round_open:  # left open: to the end of the prompt
        scale(start, EMPHASIS)
    for start in square_open:
        scale(start, 1 / EMPHASIS)

    merged: list[tuple[str, float | None]] = []
    for piece_text, weight in pieces:
        if merged and weight is not None and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
    return merged or [("", 1.0)]


@dataclass
class TokenChunk:
    """Up to ``CHUNK_TOKENS`` text tokens and their weights (no start, end or padding)."""

    ids: list[int]
    weights: list[float]


def prompt_chunks(tokenizer, text: str) -> list[TokenChunk]:
    """The weighted prompt ``text`` as chunks of text tokens (at least one, maybe empty)."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks: list[TokenChunk] = []
    chunk = TokenChunk([], [])
    last_comma = -1

    def close() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = TokenChunk([], []), -1

    for piece, weight in parse_emphasis(text):
        if weight is None:  # BREAK
            close()
            continue
        for token in _token_ids(tokenizer, piece):
            if len(chunk.ids) == CHUNK_TOKENS:
                if last_comma >= 0 and len(chunk.ids) - last_comma <= COMMA_BACKTRACK:
                    cut = last_comma + 1  # keep the comma, move the phrase after it on
                    rest = TokenChunk(chunk.ids[cut:], chunk.weights[cut:])
                    chunk.ids, chunk.weights = chunk.ids[:cut], chunk.weights[:cut]
                    close()
                    chunk = rest
                else:
                    close()
            if token == comma:
                last_comma = len(chunk.ids)
            chunk.ids.append(token)
            chunk.weights.append(weight)
    if chunk.ids or not chunks:
        close()
    return chunks


def _token_ids(tokenizer, text):
    """Text tokens of ``text`` (a string, or a list: a list each), however many (not verbose: it
    would warn past 77)."""
    return tokenizer(text, add_special_tokens=False, verbose=False).input_ids


@functools.cache
def _counting_tokenizer():
    return clip_tokenizer(Family.SD1)  # every family's tokenizers share one vocabulary


def token_count(text: str, syntax: PromptSyntax | str = PromptSyntax.WEIGHTED) -> tuple[int, int]:
    """(text tokens, chunks) of ``text`` as ``syntax`` reads it, for any family: what a prompt box
    shows while one types. ``plain`` counts the text as it is, in one window (chunks: 1)."""
    tokenizer = _counting_tokenizer()
    if PromptSyntax(syntax) is PromptSyntax.PLAIN:
        return len(_token_ids(tokenizer, text)), 1
    chunks = prompt_chunks(tokenizer, text)
    return sum(len(c.ids) for c in chunks), len(chunks)


def long_prompts(texts: Iterable[str], tokenizer=None, window: int = CHUNK_TOKENS) -> dict[str, int]:
    """The distinct texts of ``texts`` longer than a text encoder's ``window`` (CLIP's 75 tokens
    unless told), with their token counts: what a plain reading (training, evaluation) cuts."""
    distinct = list(dict.fromkeys(texts))
    if not distinct:
        return {}
    ids = _token_ids(tokenizer or _counting_tokenizer(), distinct)
    return {t: len(i) for t, i in zip(distinct, ids) if len(i) > window}


def _framed(tokenizer, chunk: TokenChunk) -> tuple[list[int], list[float]]:
    """A chunk as the encoder's 77 ids (start, text, end, padding) and their weights."""
    pad = MAX_LENGTH - 2 - len(chunk.ids)
    ids = [tokenizer.bos_token_id, *chunk.ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad
    return ids, [1.0, *chunk.weights, 1.0] + [1.0] * pad


def _plain_with_warning(
    base: BaseModel, prompts: Sequence[str], size: tuple[int, int] | None
) -> PromptEmbeddings:
    for text, n in long_prompts(prompts, base.tokenizer).items():
        cut = base.tokenizer.decode(_token_ids(base.tokenizer, text)[CHUNK_TOKENS:])
        warnings.warn(
            f"the prompt is {n} tokens and the text encoder reads {CHUNK_TOKENS}: "
            f"{cut!r} is cut off (prompt syntax 'weighted' encodes long prompts whole)",
            stacklevel=3,
        )
    return base.encode_prompt(prompts, size=size)


def encode_prompts(
    base: BaseModel,
    prompts: Sequence[str],
    *,
    size: tuple[int, int] | None = None,
    syntax: PromptSyntax | str = PromptSyntax.WEIGHTED,
) -> PromptEmbeddings:
    """Prompts -> UNet context under ``syntax``; weighted prompts give (B, 77 x chunks, D), every
    prompt padded with empty chunks to the longest one's count."""
    if PromptSyntax(syntax) is PromptSyntax.PLAIN:
        return _plain_with_warning(base, prompts, size)
    return _encode_chunks(base, [prompt_chunks(base.tokenizer, p) for p in prompts], size)


def _encode_chunks(
    base: BaseModel, per_prompt: list[list[TokenChunk]], size: tuple[int, int] | None, n: int = 1
) -> PromptEmbeddings:
    """Each prompt's chunks (padded with empty ones to the longest count, at least ``n``) encoded
    side by side, their emphasis applied."""
    n = max([n, *(len(c) for c in per_prompt)])
    chunks = [c for cs in per_prompt for c in cs + [TokenChunk([], [])] * (n - len(cs))]
    framed = [_framed(base.tokenizer, c) for c in chunks]
    ids = torch.tensor([f[0] for f in framed])
    ids_2 = None
    if base.tokenizer_2 is not None:  # the same vocabulary, its own padding token
        ids_2 = torch.tensor([_framed(base.tokenizer_2, c)[0] for c in chunks])
    emb = base.encode_tokens(ids, ids_2, size=size)
    context = emb.context
    weights = torch.tensor([f[1] for f in framed], dtype=torch.float32, device=context.device)
    rows = [r for r in range(len(framed)) if bool((weights[r] != 1.0).any())]
    if rows:  # emphasis: scale each token's vector, then restore the chunk's mean
        context = context.clone()
        for r in rows:
            z = context[r].float()
            mean = z.mean()
            z = z * weights[r, :, None]
            ratio = mean / z.mean()
            if not bool(torch.isfinite(ratio)) or ratio <= 0:  # a mean at or through zero: no scale
                ratio = torch.ones_like(ratio)
            context[r] = (z * ratio).to(context.dtype)
    context = context.reshape(len(per_prompt), n * MAX_LENGTH, context.shape[-1])
    added = None
    if emb.added is not None:  # pooled vector and time ids of each prompt's first chunk
        added = {k: v[::n] for k, v in emb.added.items()}
    return PromptEmbeddings(context, added)


def encode_guided(
    base: BaseModel,
    prompts: Sequence[str] | str,
    negatives: Sequence[str] | str | None,
    *,
    size: tuple[int, int] | None = None,
    syntax: PromptSyntax | str = PromptSyntax.WEIGHTED,
) -> tuple[PromptEmbeddings, PromptEmbeddings | None]:
    """The embeddings of each sample's prompt and (when guidance needs them: not None) its negative
    prompt, all of one length (a string: one sample). Each distinct text is encoded once: the
    distinct prompts in one batch, the distinct negative prompts in another; samples sharing a
    text share its rows."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    negatives = [negatives] if isinstance(negatives, str) else negatives
    texts = [list(dict.fromkeys(prompts)), list(dict.fromkeys(negatives)) if negatives is not None else []]
    if PromptSyntax(syntax) is PromptSyntax.PLAIN:
        encoded = [encode_prompts(base, t, size=size, syntax=syntax) if t else None for t in texts]
    else:
        chunks = [[prompt_chunks(base.tokenizer, t) for t in side] for side in texts]
        n = max(len(c) for side in chunks for c in side)
        encoded = [_encode_chunks(base, side, size, n) if side else None for side in chunks]

    def rows(emb: PromptEmbeddings | None, distinct: list[str], wanted: Sequence[str]) -> PromptEmbeddings:
        assert emb is not None
        index = [distinct.index(t) for t in wanted]
        return emb.select(index)

    cond = rows(encoded[0], texts[0], prompts)
    return cond, (rows(encoded[1], texts[1], negatives) if negatives is not None else None)
