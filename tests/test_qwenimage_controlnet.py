"""The Qwen-Image ControlNet (issue 34's first slice): our controlled copy loads diffusers'
``QwenImageControlNetModel`` state dict as is and gives its residuals exactly, plain and
inpainting (extra condition channels), text mask included; a fresh one copies the base's blocks
exactly, its residuals are zero, so the base's output is unchanged."""

import pytest
import torch
from diffusers import QwenImageControlNetModel, QwenImageTransformer2DModel

from controlnet.families.qwenimage import QwenImageControlNet, QwenImageControlNetConfig

TRANSFORMER = {
    "patch_size": 2,
    "in_channels": 16,  # 4 latent channels, 2x2 patches
    "out_channels": 4,
    "num_layers": 4,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 12,
    "axes_dims_rope": (2, 2, 4),
}
H, W = 4, 6  # packed latent grid


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**TRANSFORMER).eval()


def _inputs(batch: int = 2, extra: int = 0):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, 7)
    mask[1, 5:] = 0  # the second prompt is shorter: its padding is masked out
    return {
        "x": torch.randn(batch, H * W, 16, generator=g),
        "cond": torch.randn(batch, H * W, 16 + extra, generator=g),
        "text": torch.randn(batch, 7, 12, generator=g),
        "mask": mask,
        "t": torch.tensor([0.3, 0.8][:batch]),
        "shapes": [[(1, H, W)]] * batch,
    }


@pytest.mark.parametrize("extra", [0, 4], ids=["plain", "inpainting"])
def test_our_residuals_equal_diffusers_on_its_own_state_dict(transformer, extra):
    torch.manual_seed(2)
    theirs = QwenImageControlNetModel.from_transformer(
        transformer, num_layers=2, attention_head_dim=8, num_attention_heads=2, extra_condition_channels=extra
    ).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # open the zero layers, so that every part shows in the residuals
        for name, p in theirs.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_x_embedder")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ours = QwenImageControlNet(dict(transformer.config), QwenImageControlNetConfig(2, extra)).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: the same keys and shapes
    i = _inputs(extra=extra)
    with torch.no_grad():
        a = ours(
            i["x"],
            i["cond"],
            encoder_hidden_states=i["text"],
            timestep=i["t"],
            img_shapes=i["shapes"],
            encoder_hidden_states_mask=i["mask"],
        )
        b = theirs(
            hidden_states=i["x"],
            controlnet_cond=i["cond"],
            encoder_hidden_states=i["text"],
            encoder_hidden_states_mask=i["mask"],
            timestep=i["t"],
            img_shapes=i["shapes"],
            return_dict=False,
        )
    assert len(a) == len(b) == 2 and ours.mask_channels == extra // 4  # packed: 4 per mask channel
    assert all(torch.equal(r, s) for r, s in zip(a, b))
    assert all(r.abs().amax() > 0 for r in a)


def test_a_fresh_controlnet_copies_the_base_and_leaves_it_unchanged(transformer):
    cn = QwenImageControlNet.from_transformer(transformer, QwenImageControlNetConfig(3))
    base = transformer.state_dict()
    copied = {k: v for k, v in cn.state_dict().items() if not k.startswith("controlnet_")}
    assert copied and all(torch.equal(v, base[k]) for k, v in copied.items())
    i = _inputs()
    with torch.no_grad():
        res = cn(i["x"], i["cond"], encoder_hidden_states=i["text"], timestep=i["t"], img_shapes=i["shapes"])
        kw = {
            "hidden_states": i["x"],
            "encoder_hidden_states": i["text"],
            "timestep": i["t"],
            "img_shapes": i["shapes"],
            "return_dict": False,
        }
        alone = transformer(**kw)[0]
        controlled = transformer(**kw, controlnet_block_samples=res)[0]
    assert all(torch.equal(r, torch.zeros_like(r)) for r in res)
    assert torch.equal(controlled, alone)


def test_bad_configurations_are_named(transformer):
    with pytest.raises(ValueError, match="cannot copy 5 blocks of a transformer that has 4"):
        QwenImageControlNet.from_transformer(transformer, QwenImageControlNetConfig(5))
    with pytest.raises(ValueError, match="copies at least one block, got num_layers=0"):
        QwenImageControlNetConfig(0)


def test_a_float32_controlnet_reads_bf16_inputs_and_answers_in_bf16(transformer):
    """As in a mixed-precision run's validation: the trainable float32 copy beside a bf16 base
    computes in float32 on the base's inputs and hands back residuals the base can add."""
    cn = QwenImageControlNet.from_transformer(transformer, QwenImageControlNetConfig(2)).eval()
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith("controlnet_"):
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(4))
    i = _inputs()
    low = {k: i[k].bfloat16() for k in ("x", "cond", "text")}
    kw = {"timestep": i["t"], "img_shapes": i["shapes"], "encoder_hidden_states_mask": i["mask"]}
    with torch.no_grad():
        res = cn(low["x"], low["cond"], encoder_hidden_states=low["text"], **kw)
        exact = cn(low["x"].float(), low["cond"].float(), encoder_hidden_states=low["text"].float(), **kw)
    assert all(r.dtype == torch.bfloat16 for r in res)
    assert all(torch.equal(r, e.bfloat16()) for r, e in zip(res, exact))
