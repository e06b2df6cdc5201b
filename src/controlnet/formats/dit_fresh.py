"""A transformer-family base model (Flux.1, SD3) of any size with freshly initialised weights: the
start of training a small one from scratch with our own commands, as the bundled UNet model was.

An architecture preset (``assets/architectures/*.json``) names the family and gives each part's
configuration: ``transformer`` (diffusers' class keywords), ``vae`` (``AutoencoderKL``), the CLIP
encoders (``text_encoder``, SD3's ``text_encoder_2``; a transformers config with
``architectures``) and the T5 encoder (a ``T5Config``), and ``max_sequence_length``. A model this
small has no use for T5's 32,000-piece vocabulary: its T5 reads characters
(:func:`character_tokenizer`: lower-case letters, digits, space and punctuation), and the
tokenizer travels in the saved file's metadata like any T5 tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .dit_base import SPECS, TOKENIZER_SPECIALS, build_part

__all__ = ["CHARACTERS", "character_tokenizer", "fresh_dit_base"]

#: what the character tokenizer reads, after lower-casing; anything else is <unk>
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789,.-'()"


def character_tokenizer() -> PreTrainedTokenizerFast:
    """A T5-shaped tokenizer over single characters: pad 0, end 1, unk 2, a word start ("▁") 3,
    then :data:`CHARACTERS`; an end token is appended. The same vocabulary on every machine."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    vocab += [(c, -1.0) for c in CHARACTERS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **TOKENIZER_SPECIALS)


def fresh_dit_base(arch: Mapping[str, Any], seed: int = 0) -> Any:
    """A base model of the architecture ``arch`` (an architecture preset's ``base``) with fresh
    weights drawn from ``seed``; ValueError naming what the architecture lacks."""
    family = arch.get("family")
    spec = SPECS.get(str(family))
    if spec is None:
        raise ValueError(f"architecture: family {family!r} is not a transformer family ({', '.join(SPECS)})")
    torch.manual_seed(seed)
    parts: dict[str, torch.nn.Module] = {}
    for part in spec.parts:
        config = arch.get(part)
        if config is None:
            if part in spec.optional:
                continue
            raise ValueError(f"architecture: a {spec.label} base needs a {part!r} configuration")
        parts[part] = build_part(spec, part, dict(config), f"architecture's {part}", device="cpu")
    tokenizer = character_tokenizer() if spec.t5 in parts else None
    if tokenizer is not None and parts[spec.t5].config.vocab_size < len(tokenizer):
        raise ValueError(
            f"architecture: {spec.t5} vocab_size {parts[spec.t5].config.vocab_size} is smaller than the "
            f"character tokenizer's {len(tokenizer)} entries"
        )
    schedule = {**spec.schedule, **dict(arch.get("schedule") or {})}
    length = int(arch.get("max_sequence_length", spec.max_sequence_length))
    return spec.make(parts, tokenizer, length, schedule)
