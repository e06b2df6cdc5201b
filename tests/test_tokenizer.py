"""The offline CLIP tokenizer gives the reference token ids of each family."""

from controlnet import Family
from controlnet.text.tokenizer import MAX_LENGTH, clip_tokenizer

# Reference ids of OpenAI's CLIP tokenizer for "a photo of a cat".
CAT = [49406, 320, 1125, 539, 320, 2368, 49407]


def ids(family: Family, text: str, second: bool = False) -> list[int]:
    tok = clip_tokenizer(family, second=second)
    return tok(text, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids


def test_vocabulary_size_and_specials():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>", "!", "a</w>"]) == [
        49406,
        49407,
        0,
        320,
    ]


def test_sd1_pads_with_end_token():
    out = ids(Family.SD1, "a photo of a cat")
    assert len(out) == 77 and out[:7] == CAT and set(out[7:]) == {49407}


def test_openclip_encoders_pad_with_zero():
    for out in (ids(Family.SD2, "a photo of a cat"), ids(Family.SDXL, "a photo of a cat", second=True)):
        assert out[:7] == CAT and set(out[7:]) == {0}
    assert set(ids(Family.SDXL, "a photo of a cat")[7:]) == {49407}  # SDXL's first encoder is CLIP's


def test_long_prompts_truncate_to_77_with_end_token():
    out = ids(Family.SD1, "cat " * 200)
    assert len(out) == 77 and out[0] == 49406 and out[-1] == 49407


def test_case_and_whitespace_are_normalised():
    assert ids(Family.SD1, "A  Photo\nof a CAT") == ids(Family.SD1, "a photo of a cat")
