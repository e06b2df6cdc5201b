"""SDXL Union ControlNets (families/sd/union.py): our model holds diffusers' ControlNetUnionModel
keys as they are and computes its residuals, one condition and several in one pass."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import ControlNetUnionModel

from controlnet import Family
from controlnet.families.sd.union import UnionConfig, UnionControlNet
from tiny import TINY_HINT, make_base

UNION = UnionConfig(
    num_control_type=4, num_trans_channel=8, num_trans_head=2, num_trans_layer=1, num_proj_channel=8
)


def union_pair(seed: int = 3):
    base = make_base(Family.SDXL)
    ours = UnionControlNet.from_unet(base.unet, TINY_HINT, UNION).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # trained-looking zero layers and task embeddings
        for name, p in ours.named_parameters():
            if p.abs().max() == 0 or name == "task_embedding":
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    accepted = inspect.signature(ControlNetUnionModel.__init__).parameters
    fields = {k: v for k, v in base.unet.config.items() if k in accepted}
    theirs = ControlNetUnionModel(
        **fields, conditioning_embedding_out_channels=TINY_HINT.hint_block_channels, **UNION.to_dict()
    ).eval()
    theirs.load_state_dict(ours.state_dict())  # strict: the published keys, as they are
    return base, ours, theirs


@pytest.mark.parametrize("types", [[2], [0, 3]], ids=["one", "two"])
def test_equals_diffusers_controlnet_union_model(types):
    base, ours, theirs = union_pair()
    g = torch.Generator().manual_seed(4)
    b, h = 2, base.latent_size((base.native_size,) * 2)
    sample = torch.randn(b, 4, *h, generator=g)
    context = torch.randn(b, 6, base.unet.config.cross_attention_dim, generator=g)
    added = {
        "text_embeds": torch.randn(b, _pooled_width(base), generator=g),
        "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * b),
    }
    images = [torch.rand(1, 3, base.native_size, base.native_size, generator=g) for _ in types]
    scales = [0.7, 1.2][: len(types)]
    kinds = torch.zeros(b, UNION.num_control_type)
    kinds[:, types] = 1
    with torch.no_grad():
        want_down, want_mid = theirs(
            sample,
            500,
            context,
            [i.expand(b, -1, -1, -1) for i in images],
            kinds,
            types,
            conditioning_scale=scales,
            added_cond_kwargs=added,
            return_dict=False,
        )
        got = ours.forward_union(
            sample, 500, context, [ours.encode_hint(i) for i in images], types, scales, added
        )
    assert len(got) == len(want_down) + 1
    for a, w in zip(got, [*want_down, want_mid], strict=True):
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="control type 4: this Union ControlNet knows 0-3"):
        ours.forward_union(sample, 500, context, [ours.encode_hint(images[0])], [4], [1.0], added)


def _pooled_width(base) -> int:
    c = base.unet.config
    return c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
