"""The base-model bundle: prompt encoding per family, latents, locking."""

import pytest
import torch

from controlnet import Family
from tiny import make_base


def test_base_is_locked_and_encodes_prompts(family):
    base = make_base(family)
    assert all(not p.requires_grad for m in base.modules().values() for p in m.parameters())
    emb = base.encode_prompt(["a red circle", ""])
    assert emb.context.shape[:2] == (2, 77)
    assert emb.context.shape[2] == base.unet.config.cross_attention_dim
    if family is Family.SDXL:
        assert emb.added["text_embeds"].shape[0] == 2 and emb.added["time_ids"].shape == (2, 6)
    else:
        assert emb.added is None
    # the UNet accepts what encode_prompt gives
    lat = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert base.unet(lat, 10, emb.context, added_cond_kwargs=emb.added).sample.shape == lat.shape


def test_clip_skip_reads_an_earlier_layer_through_the_final_norm():
    base = make_base()
    ids = base.tokenize(["a red circle", "a blue square"])
    enc = base.text_encoder
    out = enc(ids, output_hidden_states=True)
    assert torch.equal(base.encode_tokens(ids).context, out.last_hidden_state)  # 1: the last layer
    norm = getattr(enc, "text_model", enc).final_layer_norm
    skipped = base.with_clip_skip(2).encode_tokens(ids).context
    torch.testing.assert_close(skipped, norm(out.hidden_states[-2]), rtol=0, atol=0)
    assert not torch.allclose(skipped, out.last_hidden_state, atol=1e-2)
    assert base.with_clip_skip(2).unet is base.unet and base.clip_skip == 1  # a view, not a copy
    with pytest.raises(
        ValueError, match="clip_skip must be between 1 and the text encoder's 2 layers, got 3"
    ):
        base.with_clip_skip(3)


@pytest.mark.parametrize("family", [Family.SD2, Family.SDXL], ids=lambda f: f.value)
def test_clip_skip_is_refused_where_the_layer_is_fixed(family):
    with pytest.raises(ValueError, match=f"clip_skip applies to SD1.x text encoders; this {family.value}"):
        make_base(family).with_clip_skip(2)
    assert make_base(family).with_clip_skip(1).clip_skip == 1


def test_same_prompt_same_embedding_and_repeat_order():
    base = make_base()
    a = base.encode_prompt(["x", "y"])
    assert torch.equal(a.context, base.encode_prompt(["x", "y"]).context)
    r = a.repeat(3)
    assert torch.equal(r.context[2], a.context[0]) and torch.equal(r.context[3], a.context[1])


def test_latents_round_trip_shapes():
    base = make_base()
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    lat = base.encode_images(img, torch.Generator().manual_seed(0))
    assert lat.shape == (2, 4, 8, 8) and base.vae_scale_factor == 8
    assert torch.equal(lat, base.encode_images(img, torch.Generator().manual_seed(0)))
    out = base.decode_latents(lat)
    assert out.shape == img.shape and out.min() >= -1 and out.max() <= 1


def test_a_generator_per_sample_draws_each_as_alone_and_encodes_a_shared_image_once():
    base = make_base(Family.SD1)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    calls = []
    handle = base.vae.encoder.register_forward_hook(lambda *a: calls.append(1))
    both = base.encode_images(image, [torch.Generator().manual_seed(s) for s in (5, 6)])
    handle.remove()
    alone = [base.encode_images(image, torch.Generator().manual_seed(s)) for s in (5, 6)]
    assert calls == [1] and torch.equal(both, torch.cat(alone))
    with pytest.raises(ValueError, match="3 generators for 2 images"):
        base.encode_images(image.repeat(2, 1, 1, 1), [torch.Generator()] * 3)
