"""Z-Image generation through the generic path (the family protocol's ZImageBase): equal to
diffusers' ZImageControlNetPipeline on the same tiny weights, noise and conditions - a prompt and
a negative of different lengths, each row reading its own caption at its own length, guidance on
the usual scale (the pipeline's g is our g + 1), one ControlNet and one under two conditions with
their own strengths; the tokenizer's chat template, or Qwen3's where it has none; the Union 2.x
ControlNets' inpainting equal to ZImageControlNetInpaintPipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    ZImageControlNetInpaintPipeline,
    ZImageControlNetModel,
    ZImageControlNetPipeline,
    ZImageTransformer2DModel,
)
from transformers import Qwen3Config, Qwen3Model

from controlnet.families.protocol import Inpaint
from controlnet.families.zimage import ZImageControlNet, ZImageControlNetConfig
from controlnet.families.zimage.base import PROMPT_TEMPLATE, ZIMAGE_SCHEDULE, ZImageBase
from controlnet.families.zimage.fused import FusedZImageBlock, stock_blocks
from controlnet.formats.dit_fresh import character_tokenizer
from controlnet.generation.denoiser import ControlUnit
from controlnet.generation.sampling import Sampling, initial_noise, render

LATENT = 4
TRANSFORMER = {
    "in_channels": LATENT,
    "dim": 32,
    "n_layers": 4,
    "n_refiner_layers": 2,
    "n_heads": 2,
    "n_kv_heads": 2,
    "cap_feat_dim": 12,
    "axes_dims": [4, 6, 6],
    "axes_lens": [512, 64, 64],
}
SIZE, GUIDANCE, PROMPT, NEGATIVE = (64, 48), 4.0, "a red disk on a grey ground", "blur"
#: Qwen3's chat template for one user message and the generation prompt, as a tiny tokenizer's own
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def zimage_base(chat_template: bool = True) -> ZImageBase:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=LATENT,
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ).eval()
    text = Qwen3Config(
        vocab_size=64,
        hidden_size=12,
        intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=6,
    )
    tokenizer = character_tokenizer()
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    transformer = ZImageTransformer2DModel(**TRANSFORMER).eval()
    return ZImageBase(transformer, vae, Qwen3Model(text).eval(), tokenizer)


@pytest.fixture(scope="module")
def world() -> ZImageBase:
    return zimage_base()


def opened(base: ZImageBase, config: ZImageControlNetConfig, seed: int) -> ZImageControlNet:
    torch.manual_seed(seed)
    cn = base.new_controlnet(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # open the zero projections
        for name, p in cn.named_parameters():
            if "_proj" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return cn.eval()


def peer(cn: ZImageControlNet) -> ZImageControlNetModel:
    t, c = cn.transformer_config, cn.config
    model = ZImageControlNetModel(
        control_layers_places=list(c.control_layers_places),
        control_refiner_layers_places=list(c.control_refiner_layers_places or []),
        control_in_dim=c.control_in_dim,
        add_control_noise_refiner=c.refiner,
        dim=t["dim"],
        n_refiner_layers=t["n_refiner_layers"],
        n_heads=t["n_heads"],
        n_kv_heads=t["n_kv_heads"],
    ).eval()
    model.load_state_dict(cn.state_dict())
    return model


def condition(seed: int) -> torch.Tensor:
    return torch.rand(1, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


def ours(base, units, seeds, steps=3, guidance=GUIDANCE, **more):
    sampling = Sampling("euler", "default", steps, guidance, **more)
    n = len(seeds)
    return render(base, units, [PROMPT] * n, [NEGATIVE] * n, seeds, SIZE, sampling, progress=False).latents


def theirs(
    base, cn, cond, scale, seeds, steps=3, guidance=GUIDANCE, pipeline=ZImageControlNetPipeline, **more
):
    pipe = pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULE),
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        transformer=base.transformer,
        controlnet=peer(cn),
    )
    pipe.set_progress_bar_config(disable=True)
    h, w = base.latent_size(SIZE)
    noise = initial_noise((len(seeds), LATENT, h, w), seeds, torch.device("cpu"), torch.float32)
    with torch.no_grad(), stock_blocks(base.transformer):  # diffusers' own blocks
        return pipe(
            prompt=[PROMPT] * len(seeds),
            negative_prompt=[NEGATIVE] * len(seeds),
            control_image=cond * 2 - 1,  # a tensor reaches the VAE as it is: give it [-1, 1]
            controlnet_conditioning_scale=scale,
            height=SIZE[0],
            width=SIZE[1],
            num_inference_steps=steps,
            guidance_scale=guidance - 1,  # the pipeline's scale counts from 0
            latents=noise,
            output_type="latent",
            **more,
        ).images


def close(a, b):
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "config",
    [
        ZImageControlNetConfig((0, 2), None, 4),
        ZImageControlNetConfig((0, 3), (0, 1), 6, "control_noise_refiner"),
    ],
    ids=["plain-refiner", "control-refiner"],
)
def test_one_controlnet_equals_the_pipeline(world, config):
    cn = opened(world, config, seed=1)
    close(
        ours(world, [ControlUnit(cn, condition(5), 0.8)], [7, 8]),
        theirs(world, cn, condition(5), 0.8, [7, 8]),
    )


def test_two_conditions_sum_their_residuals(world):
    """The pipeline runs one network under one condition; ours sums several ControlNets'
    residuals layer by layer: the same condition twice, at strengths a and b, equals it once at
    a + b (with plain refiners a residual is linear in its strength)."""
    cn = opened(world, ZImageControlNetConfig((0, 2), None, 4), seed=2)
    two = [ControlUnit(cn, condition(6), 0.5), ControlUnit(cn, condition(6), 0.7)]
    close(ours(world, two, [3]), theirs(world, cn, condition(6), 1.2, [3]))


def test_without_guidance_and_without_a_chat_template():
    base = zimage_base(chat_template=False)
    cn = opened(base, ZImageControlNetConfig((0, 2), None, 4), seed=3)
    want = theirs(zimage_base(chat_template=True), cn, condition(4), 1.0, [2], guidance=1.0)
    close(ours(base, [ControlUnit(cn, condition(4), 1.0)], [2], guidance=1.0), want)
    assert base._templated("x") == PROMPT_TEMPLATE.format("x")


def test_a_controlnet_of_another_family_or_transformer_is_refused(world):
    from tiny_flux import tiny_flux_base

    flux_cn = tiny_flux_base().new_controlnet({"num_layers": 1, "num_single_layers": 1})
    with pytest.raises(ValueError, match="CN is not a Z-Image ControlNet, and BASE is Z-Image"):
        world.check_controlnet(flux_cn, controlnet_name="CN", base_name="BASE")
    wrong = ZImageControlNet({**TRANSFORMER, "dim": 16}, ZImageControlNetConfig((0,), None, 4))
    with pytest.raises(ValueError, match="made for another transformer than BASE: dim 16 vs 32"):
        world.check_controlnet(wrong, controlnet_name="CN", base_name="BASE")
    deep = ZImageControlNet(TRANSFORMER, ZImageControlNetConfig((0, 4), None, 4))
    with pytest.raises(ValueError, match="after layer 4, and BASE has 4 layers"):
        world.check_controlnet(deep, controlnet_name="CN", base_name="BASE")


def test_the_base_and_controlnet_run_fused_blocks(world):
    """The transformer's blocks and a ControlNet's run the fused forward (the tests above hold it
    to diffusers' blocks); the pipeline above ran diffusers' own (stock_blocks)."""
    t = world.transformer
    assert all(type(b) is FusedZImageBlock for b in [*t.layers, *t.noise_refiner, *t.context_refiner])
    cn = opened(world, ZImageControlNetConfig((0, 2), None, 4), seed=1)
    assert all(isinstance(b, FusedZImageBlock) for b in [*cn.control_layers, *cn.control_noise_refiner])
    with stock_blocks(t):
        assert not any(isinstance(b, FusedZImageBlock) for b in t.layers)


def test_a_control_for_the_conditional_half_only(world):
    """ "ControlNet is more important" runs a control for the conditional rows only: here with a
    condition per sample, the unconditional rows read no residual, and the result moves."""
    cn = opened(world, ZImageControlNetConfig((0, 2), None, 4), seed=1)
    conds = torch.cat([condition(5), condition(6)])
    both = ours(world, [ControlUnit(cn, conds, 0.8)], [7, 8], steps=2)
    cond_only = ours(world, [ControlUnit(cn, conds, 0.8, mode="controlnet")], [7, 8], steps=2)
    assert torch.isfinite(cond_only).all() and not torch.allclose(both, cond_only)


def hole(size=SIZE) -> torch.Tensor:
    mask = torch.zeros(1, 1, *size)
    mask[..., 8:40, 16:44] = 1.0
    return mask


def test_the_inpainting_controlnet_equals_the_inpaint_pipeline(world):
    """A Union 2.x ControlNet (2 x latent + 1 channels) in an edit reads the control's latents,
    1 - the mask and the latents of the image with the masked pixels grey: equal to
    ZImageControlNetInpaintPipeline given the control image, the image and the mask."""
    cn = opened(world, ZImageControlNetConfig((0, 2), None, 2 * LATENT + 1), seed=4)
    photo, mask = condition(9), hole()
    unit = ControlUnit(cn, condition(5), 0.8, inpaint=Inpaint(photo, mask))
    want = theirs(
        world,
        cn,
        condition(5),
        0.8,
        [7, 8],
        pipeline=ZImageControlNetInpaintPipeline,
        image=photo * 2 - 1,
        mask_image=torch.cat([mask, mask]),  # the pipeline takes a mask per sample
    )
    close(ours(world, [unit], [7, 8]), want)
    # not an edit: the inpainting channels stay empty, as ZImageControlNetPipeline leaves them
    close(ours(world, [ControlUnit(cn, condition(5), 0.8)], [7]), theirs(world, cn, condition(5), 0.8, [7]))


def test_an_inpainting_map_as_the_condition(world):
    """The inpaint annotator's map (masked pixels -1) as the condition: the ControlNet reads the
    same inpainting channels as from the request's image and mask, and no control channels; a
    ControlNet without inpainting channels refuses it in one line."""
    cn = opened(world, ZImageControlNetConfig((0, 2), None, 2 * LATENT + 1), seed=4)
    photo, mask = condition(9), hole()
    from_map = world.control_hint(cn, torch.where(mask > 0, -1.0, photo))
    from_request = world.control_hint(cn, condition(5), inpaint=Inpaint(photo, mask))
    assert from_map.shape == (1, 2 * LATENT + 1, *world.latent_size(SIZE))
    assert not from_map[:, :LATENT].any() and from_request[:, :LATENT].abs().sum() > 0
    torch.testing.assert_close(from_map[:, LATENT:], from_request[:, LATENT:])
    keep, f = from_map[0, LATENT], SIZE[0] // world.latent_size(SIZE)[0]  # 1 - the mask, latent-sized
    assert (
        keep[8 // f : 40 // f, 16 // f : 44 // f].eq(0).all() and keep.sum() == keep.numel() - 32 * 28 / f**2
    )
    plain = opened(world, ZImageControlNetConfig((0, 2), None, LATENT), seed=4)
    with pytest.raises(ValueError, match=r"inpainting map as the condition .* reads 4 condition channels"):
        world.control_hint(plain, torch.where(mask > 0, -1.0, photo))


def test_an_edit_request_gives_the_controlnet_its_image_and_mask(world, tmp_path, monkeypatch):
    """`generate` with an image to edit and a mask hands both, at the output size, to the hint."""
    import numpy as np
    from PIL import Image

    from controlnet.generation.check import check
    from controlnet.generation.generate import generate
    from controlnet.generation.request import ControlRequest, GenerationRequest

    rng = np.random.default_rng(0)
    photo = (rng.random((64, 64, 3)) * 255).astype(np.uint8)  # the smallest size a request takes
    mask = (hole((64, 64))[0, 0].numpy() * 255).astype(np.uint8)
    for name, a in (("photo", photo), ("pose", photo[::-1].copy()), ("mask", mask)):
        Image.fromarray(a).save(tmp_path / f"{name}.png")
    cn = opened(world, ZImageControlNetConfig((0, 2), None, 2 * LATENT + 1), seed=4)
    seen = []
    real = world.control_hint
    monkeypatch.setattr(world, "control_hint", lambda *a, **k: seen.append(k["inpaint"]) or real(*a, **k))
    pose = ControlRequest(str(tmp_path / "pose.png"))
    common = dict(prompt=PROMPT, controls=[pose], steps=2, seed=3, sampler="euler")
    size = dict(width=64, height=64)
    generate(check(GenerationRequest(**common, **size)), world, [cn], progress=False)
    edit = GenerationRequest(
        **common, **size, init_image=str(tmp_path / "photo.png"), mask=str(tmp_path / "mask.png")
    )
    generate(check(edit), world, [cn], progress=False)
    assert seen[0] is None
    torch.testing.assert_close(seen[1].image[0], torch.from_numpy(photo).permute(2, 0, 1).float() / 255)
    assert torch.equal(seen[1].mask[0, 0] > 0.5, hole((64, 64))[0, 0] > 0.5)


def test_a_control_region_weights_each_token_by_its_patch(world):
    """A region (1, 1, h, w) at the latents' size scales each image token's residual (and, with a
    control-block refiner, its refiner hint) by the region's mean over the token's 2x2 patch, and
    the caption's by its mean over the image: zeros leave the base alone, ones act as no region."""
    from controlnet.families.zimage.sequence import finish, patch_tokens, prepare
    from controlnet.model.control import Control

    h, w = world.latent_size(SIZE)
    g = torch.Generator().manual_seed(4)
    x, hint = torch.randn(1, LATENT, h, w, generator=g), torch.randn(1, LATENT, h, w, generator=g)
    context, t = torch.randn(1, 7, 12, generator=g), torch.tensor(600.0)
    region = torch.zeros(1, 1, h, w)
    region[..., :, : w // 2] = 1.0  # the left half: whole patches
    region[..., 0:2, w // 2 : w // 2 + 2] = 0.5  # one patch at half strength
    for config in (
        ZImageControlNetConfig((0, 2), None, 4),
        ZImageControlNetConfig((0, 3), (0, 1), 4, "control_noise_refiner"),
    ):
        cn = opened(world, config, seed=1)

        def predict(r, cn=cn):
            with torch.no_grad():
                return world.predict(x, t, context, [Control(cn, hint, [0.8, 0.6], False, r)])

        with torch.no_grad():
            plain = world.predict(x, t, context, [])
        assert torch.equal(predict(torch.zeros(1, 1, h, w)), plain)  # acts nowhere: the base alone
        assert torch.equal(predict(torch.ones(1, 1, h, w)), predict(None))  # everywhere: as without one
        with torch.no_grad():  # by hand: the split pass, each residual times its position's weight
            s, sizes = prepare(
                world.transformer, [x[0, :, None]], ((1000 - t) / 1000).expand(1), [context[0]]
            )
            cells = torch.nn.functional.avg_pool2d(region, 2).flatten(2).transpose(1, 2)
            weight = torch.cat([cells, cells.mean().expand(1, s.unified.shape[1] - cells.shape[1], 1)], 1)
            out = cn(s, patch_tokens(world.transformer, [hint[0, :, None]]), 0.8 * weight[:, : s.x_lens[0]])
            residuals = {p: r * scale * weight for (p, r), scale in zip(out.items(), (0.8, 0.6))}
            want = -torch.stack(finish(s, sizes, residuals)).squeeze(2)
        torch.testing.assert_close(predict(region), want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(predict(region), predict(None))


def test_guidance_truncated_and_its_norm_capped_equal_the_pipeline(world):
    """The pipeline's cfg_truncation (guidance only while 1 - t/1000 is at most it; the later steps
    run the conditional half alone) is our guidance_end, its cfg_normalization our
    guidance_renorm: equal to it, and each changes the result."""
    cn = opened(world, ZImageControlNetConfig((0, 2), None, 4), seed=1)
    unit = [ControlUnit(cn, condition(5), 0.8)]
    # 4 steps, shift 3: 1 - t/1000 = 0, 0.1, 0.25, 0.5; the last step unguided
    got = ours(world, unit, [7, 8], steps=4, guidance_end=0.3, guidance_renorm=1.0)
    want = theirs(world, cn, condition(5), 0.8, [7, 8], steps=4, cfg_truncation=0.3, cfg_normalization=True)
    close(got, want)
    plain = ours(world, unit, [7, 8], steps=4)
    for one in ({"guidance_end": 0.3}, {"guidance_renorm": 1.0}):
        moved = ours(world, unit, [7, 8], steps=4, **one)
        assert not torch.allclose(moved, plain), one
