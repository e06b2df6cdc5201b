"""Prompt syntax: emphasis, BREAK, chunks of 75 tokens, and the context they give the UNet
(in a generation: tests/test_generate.py)."""

import pytest
import torch

from controlnet import Family
from controlnet.text.prompts import (
    CHUNK_TOKENS,
    EMPHASIS,
    encode_guided,
    encode_prompts,
    parse_emphasis,
    prompt_chunks,
    token_count,
)
from controlnet.text.tokenizer import clip_tokenizer
from tiny import make_base


def weights(text):
    return [(t, w if w is None else round(w, 6)) for t, w in parse_emphasis(text)]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a red cat", [("a red cat", 1.0)]),
        ("a (red) cat", [("a ", 1.0), ("red", 1.1), (" cat", 1.0)]),
        ("((red)) [cat]", [("red", 1.21), (" ", 1.0), ("cat", round(1 / 1.1, 6))]),
        ("(red:1.5) cat", [("red", 1.5), (" cat", 1.0)]),
        ("((red:2) dog:0.5)", [("red", 1.0), (" dog", 0.5)]),  # nested factors multiply
        ("(big [red]) dog", [("big ", 1.1), ("red dog", 1.0)]),  # the factors cancel
        (r"a \(red\) \[cat\]", [("a (red) [cat]", 1.0)]),  # escaped brackets are text
        ("x) y] z", [("x) y] z", 1.0)]),  # a closer with nothing open is text
        ("a (open end", [("a ", 1.0), ("open end", 1.1)]),  # left open: to the end
        ("one BREAK two", [("one ", 1.0), ("BREAK", None), (" two", 1.0)]),
        ("(no:-1) BREAK", [("no", -1.0), (" ", 1.0), ("BREAK", None)]),  # a weight, then a break
        ("Big BREAKfast at 12:30", [("Big BREAKfast at 12:30", 1.0)]),
        ("(ratio :1.25 ) x", [("ratio ", 1.25), (" x", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_emphasis_syntax(text, expected):
    assert weights(text) == expected


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer(Family.SD1)


def ids(tok, text):
    return tok(text).input_ids[1:-1]


def test_long_prompts_split_into_chunks_of_75_tokens_at_a_comma(tok):
    text = ", ".join(f"a photo number {i}" for i in range(30))  # 5 tokens a phrase with its comma
    chunks = prompt_chunks(tok, text)
    assert [t for c in chunks for t in c.ids] == ids(tok, text)  # nothing lost, order kept
    assert all(len(c.ids) <= CHUNK_TOKENS for c in chunks) and len(chunks) == 3
    comma = tok.convert_tokens_to_ids(",</w>")
    for c in chunks[:-1]:  # a full chunk gives its unfinished phrase to the next one
        assert c.ids[-1] == comma and len(c.ids) > CHUNK_TOKENS - 20
    for c in chunks[1:]:
        assert tok.decode(c.ids[:3]) == "a photo number"

    no_commas = " ".join(["cat"] * 160)
    assert [len(c.ids) for c in prompt_chunks(tok, no_commas)] == [75, 75, 10]  # hard cuts


def test_break_ends_a_chunk_and_weights_follow_their_tokens(tok):
    chunks = prompt_chunks(tok, "a (red:1.5) cat BREAK [blue] sky")
    assert [tok.decode(c.ids) for c in chunks] == ["a red cat", "blue sky"]
    assert chunks[0].weights == [1.0, 1.5, 1.0]
    assert chunks[1].weights == pytest.approx([1 / EMPHASIS, 1.0])
    assert [c.ids for c in prompt_chunks(tok, "")] == [[]]


def test_token_count_is_what_the_encoder_reads(tok):
    long = ", ".join(f"a photo number {i}" for i in range(30))
    assert token_count(long) == (len(ids(tok, long)), 3)
    assert token_count("a (red:1.5) cat BREAK sky") == (4, 2)  # brackets are syntax, not tokens
    assert token_count("a (red:1.5) cat", "plain") == (len(ids(tok, "a (red:1.5) cat")), 1)
    assert token_count("") == (0, 1)


@pytest.fixture(scope="module", params=[Family.SD1, Family.SDXL], ids=lambda f: f.value)
def base(request):
    return make_base(request.param)


def test_prompts_without_syntax_encode_exactly_as_plain(base):
    for text in ["a red circle, best quality", ""]:
        weighted = encode_prompts(base, [text])
        plain = base.encode_prompt([text])
        assert torch.equal(weighted.context, plain.context)
        if base.family is Family.SDXL:
            assert all(torch.equal(weighted.added[k], plain.added[k]) for k in plain.added)


def test_long_prompts_are_encoded_chunk_by_chunk(base):
    phrases = [f"a photo number {i}" for i in range(30)]
    text = ", ".join(phrases)
    with pytest.warns(UserWarning, match=r"is cut off"):  # plain: one window, and it says so
        plain = encode_prompts(base, [text], syntax="plain")
    assert plain.context.shape[1] == 77
    emb = encode_prompts(base, [text])
    chunks = prompt_chunks(base.tokenizer, text)
    assert emb.context.shape[1] == 77 * len(chunks) == 77 * 3
    # each 77-token block is that chunk's text encoded on its own
    for i, c in enumerate(chunks):
        alone = base.encode_prompt([base.tokenizer.decode(c.ids)])
        assert torch.allclose(emb.context[:, 77 * i : 77 * (i + 1)], alone.context, atol=1e-6)
    if base.family is Family.SDXL:  # the pooled vector is the first chunk's
        first = base.encode_prompt([base.tokenizer.decode(chunks[0].ids)])
        assert torch.allclose(emb.added["text_embeds"], first.added["text_embeds"], atol=1e-6)


def test_emphasis_scales_token_vectors_and_keeps_the_mean(base):
    # the tiny encoder's final layer norm starts with a zero bias, so its outputs average to
    # about 0 (a mean with no size to keep); released CLIP's bias is not zero: give it one
    norms = final_norms(base)
    saved = [n.bias.detach().clone() for n in norms]
    with torch.no_grad():
        for n in norms:
            n.bias.fill_(0.25)
    try:
        check_emphasis_keeps_the_mean(base)
    finally:
        with torch.no_grad():
            for n, b in zip(norms, saved, strict=True):
                n.bias.copy_(b)


def final_norms(base) -> list:
    """Each text encoder's final layer norm (transformers 5 flattened ``text_model`` away)."""
    encoders = [e for e in (base.text_encoder, base.text_encoder_2) if e is not None]
    return [getattr(e, "text_model", e).final_layer_norm for e in encoders]


def check_emphasis_keeps_the_mean(base):
    plain = encode_prompts(base, ["a red cat"]).context[0].double()
    emph = encode_prompts(base, ["a (red:1.5) cat"]).context[0].double()
    assert torch.allclose(emph.mean(), plain.mean(), rtol=1e-4)
    ratio = emph / plain  # one factor for every vector, 1.5 times that for "red" (token 2)
    k = ratio[1].mean()
    assert torch.allclose(ratio[[0, 1, 3, 4, 40]], k.expand(5, ratio.shape[1]), rtol=1e-4)
    assert torch.allclose(ratio[2], (1.5 * k).expand(ratio.shape[1]), rtol=1e-4)
    assert not torch.allclose(emph, plain)


def test_emphasis_on_a_context_whose_mean_is_zero_stays_finite(base):
    """Outputs of a zero-bias final layer norm average to ~0: restoring that mean would divide by
    about zero (inf, NaN images); the scaled context is kept as it is."""
    assert not any(n.bias.any() for n in final_norms(base))
    plain = encode_prompts(base, ["a red cat"]).context[0]
    emph = encode_prompts(base, ["a (red:1.5) cat"]).context[0]
    assert torch.isfinite(emph).all() and not torch.equal(emph, plain)


def test_prompt_and_negative_get_the_same_length(base):
    long = " ".join(["cat"] * 100)
    cond, uncond = encode_guided(base, long, "blurry")
    assert cond.context.shape == uncond.context.shape and cond.context.shape[1] == 154
    empty = base.encode_prompt([""]).context
    assert torch.allclose(uncond.context[:, 77:], empty, atol=1e-6)  # padded with the empty prompt
    assert torch.allclose(uncond.context[:, :77], base.encode_prompt(["blurry"]).context, atol=1e-6)
    cond, uncond = encode_guided(base, "blurry", long)  # the other way round
    assert cond.context.shape[1] == uncond.context.shape[1] == 154
    assert encode_guided(base, long, None)[1] is None  # no guidance: no negative
