"""Qwen-Image generation through the generic path (the family protocol's QwenImageBase): equal to
diffusers' QwenImageControlNetPipeline on the same tiny weights, noise and conditions, with true
classifier-free guidance and its norm rescale - one ControlNet, and one under two conditions with
their own strengths and windows (the ControlNets read the conditional prompt and serve both
halves, as the pipeline runs them)."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageControlNetInpaintPipeline,
    QwenImageControlNetModel,
    QwenImageControlNetPipeline,
    QwenImageMultiControlNetModel,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from controlnet.families.dit import pack
from controlnet.families.protocol import PromptEmbeddings
from controlnet.families.qwenimage import QwenImageControlNet, QwenImageControlNetConfig
from controlnet.families.qwenimage.base import QWEN_SCHEDULE, QwenImageBase
from controlnet.families.qwenimage.fused import FusedQwenImageBlock, stock_blocks
from controlnet.formats.dit_fresh import character_tokenizer
from controlnet.generation.denoiser import ControlUnit
from controlnet.generation.sampling import Sampling, initial_noise, render

LATENT = 4
TRANSFORMER = {
    "patch_size": 2,
    "in_channels": 4 * LATENT,
    "out_channels": LATENT,
    "num_layers": 4,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 12,
    "axes_dims_rope": (2, 2, 4),
}
SIZE, GUIDANCE, PROMPT = (32, 48), 4.0, "a red disk"


def qwen_text_encoder() -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL of a few channels (its language model 12 wide: the transformer's text width)."""
    text = {"hidden_size": 12, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
    text |= {
        "num_key_value_heads": 1,
        "vocab_size": 64,
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 1]},
    }
    vision = {"depth": 1, "hidden_size": 8, "intermediate_size": 8, "num_heads": 2, "out_hidden_size": 12}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, bos_token_id=None, eos_token_id=None)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_base() -> QwenImageBase:
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=LATENT,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, False],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 2.0, 1.1],
    ).eval()
    with torch.no_grad():  # a posterior of no spread: the pipeline samples the condition's latents
        vae.quant_conv.weight[LATENT:].zero_()
        vae.quant_conv.bias[LATENT:].fill_(-1000.0)
    transformer = QwenImageTransformer2DModel(**TRANSFORMER).eval()
    return QwenImageBase(transformer, vae, qwen_text_encoder(), character_tokenizer())


@pytest.fixture(scope="module")
def world() -> QwenImageBase:
    return qwen_base()


def controlnet(base: QwenImageBase, layers: int, seed: int, extra: int = 0) -> QwenImageControlNet:
    torch.manual_seed(seed)
    cn = base.new_controlnet(QwenImageControlNetConfig(num_layers=layers, extra_condition_channels=extra))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # open the zero layers
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_x_embedder")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return cn.eval()


def peer(cn: QwenImageControlNet) -> QwenImageControlNetModel:
    fields = {k: v for k, v in TRANSFORMER.items() if k not in ("num_layers", "out_channels")}
    fields |= {
        "num_layers": cn.config.num_layers,
        "extra_condition_channels": cn.config.extra_condition_channels,
    }
    model = QwenImageControlNetModel(**fields).eval()
    model.load_state_dict(cn.state_dict())
    return model


def condition(seed: int) -> torch.Tensor:
    return torch.rand(1, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


def ours(base, units, seeds, steps=3, prompts=None, negatives=None):
    sampling = Sampling("euler", "default", steps, GUIDANCE)
    n = len(seeds)
    prompts, negatives = prompts or [PROMPT] * n, negatives or [""] * n
    return render(base, units, prompts, negatives, seeds, SIZE, sampling, progress=False).latents


def theirs(base, cns, conds, scales, seeds, steps=3, starts=None, ends=None, prompts=None, negatives=None):
    many = len(cns) > 1
    assert all(c is cns[0] for c in cns)  # the pipeline runs one network (under several conditions)
    net = QwenImageMultiControlNetModel([peer(cns[0])]) if many else peer(cns[0])
    pipe = QwenImageControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULE),
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        transformer=base.transformer,
        controlnet=net,
    )
    pipe.set_progress_bar_config(disable=True)
    h, w = base.latent_size(SIZE)
    noise = pack(initial_noise((len(seeds), LATENT, h, w), seeds, torch.device("cpu"), torch.float32))
    conds = [c * 2 - 1 for c in conds]  # a tensor reaches the VAE as it is: give it [-1, 1]
    kw = {} if starts is None else {"control_guidance_start": starts, "control_guidance_end": ends}
    with torch.no_grad(), stock_blocks(base.transformer):  # diffusers' own blocks
        return pipe(
            prompt=prompts or [PROMPT] * len(seeds),
            negative_prompt=negatives or [""] * len(seeds),
            control_image=conds if many else conds[0],
            controlnet_conditioning_scale=scales if many else scales[0],
            height=SIZE[0],
            width=SIZE[1],
            num_inference_steps=steps,
            true_cfg_scale=GUIDANCE,
            latents=noise,
            output_type="latent",
            **kw,
        ).images


def close(a, b):
    torch.testing.assert_close(pack(a), b, rtol=2e-5, atol=2e-5)


def test_one_controlnet_equals_the_pipeline(world):
    cn = controlnet(world, 2, seed=1)
    close(
        ours(world, [ControlUnit(cn, condition(5), 0.8)], [7, 8]),
        theirs(world, [cn], [condition(5)], [0.8], [7, 8]),
    )


def test_prompts_of_different_lengths_in_one_batch(world):
    """Rows run in runs of one caption length (no mask): two prompts and two negatives, all of
    different lengths, against the pipeline's masked batch."""
    cn = controlnet(world, 2, seed=1)
    prompts, negatives = ["a red disk", "a much longer prompt about a blue square"], ["", "blurry"]
    close(
        ours(world, [ControlUnit(cn, condition(5), 0.8)], [7, 8], prompts=prompts, negatives=negatives),
        theirs(world, [cn], [condition(5)], [0.8], [7, 8], prompts=prompts, negatives=negatives),
    )


def test_two_conditions_with_their_own_strengths_and_windows(world):
    """One (Union) ControlNet under two conditions: the pipeline's only form of several (its
    multi-ControlNet takes a single network); the residuals of the two are summed block by block."""
    a = controlnet(world, 2, seed=1)
    # windows on step boundaries (diffusers counts step i in while (i + 1) / N <= end)
    units = [ControlUnit(a, condition(5), 0.7, 0.0, 0.5), ControlUnit(a, condition(6), 1.2, 0.25, 1.0)]
    want = theirs(world, [a, a], [condition(5), condition(6)], [0.7, 1.2], [3], steps=4,
                  starts=[0.0, 0.25], ends=[0.5, 1.0])  # fmt: skip
    close(ours(world, units, [3], steps=4), want)


def test_the_inpainting_controlnet_equals_the_inpaint_pipeline(world):
    """InstantX's inpainting ControlNet reads the latents of the image with its masked pixels at
    -1 beside 1 - the mask at the latents' size (packed: 4 more channels); ours takes the inpaint
    map's convention (masked pixels -1 in the condition) through the family's control hint."""
    cn = controlnet(world, 2, seed=4, extra=4)
    assert cn.mask_channels == 1
    photo = condition(9)
    mask = torch.zeros(1, 1, *SIZE)
    mask[..., 8:28, 12:40] = 1
    painted = torch.where(mask > 0.5, torch.full_like(photo, -1.0), photo)
    pipe = QwenImageControlNetInpaintPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULE),
        vae=world.vae,
        text_encoder=world.text_encoder,
        tokenizer=world.tokenizer,
        transformer=world.transformer,
        controlnet=peer(cn),
    )
    pipe.set_progress_bar_config(disable=True)
    h, w = world.latent_size(SIZE)
    noise = pack(initial_noise((1, LATENT, h, w), [4], torch.device("cpu"), torch.float32))
    with torch.no_grad(), stock_blocks(world.transformer):  # diffusers' own blocks
        want = pipe(
            prompt=[PROMPT],
            negative_prompt=[""],
            control_image=photo * 2 - 1,
            control_mask=mask,
            controlnet_conditioning_scale=0.9,
            height=SIZE[0],
            width=SIZE[1],
            num_inference_steps=3,
            true_cfg_scale=GUIDANCE,
            latents=noise,
            output_type="latent",
        ).images
    close(ours(world, [ControlUnit(cn, painted, 0.9)], [4]), want)


def test_each_prompt_keeps_its_own_tokens_and_length(world):
    """A prompt encoded beside a longer one (padded) reads as when encoded alone, and its length
    travels with it as host data (the CPU), for the network to read it at that length."""
    alone = world.encode_prompt(["a red disk"])
    beside = world.encode_prompt(["a red disk", "a much longer prompt about a blue square"])
    n = alone.context.shape[1]
    torch.testing.assert_close(beside.context[:1, :n], alone.context, rtol=1e-5, atol=1e-6)
    assert beside.added["text_lengths"].tolist() == [n, beside.context.shape[1]]
    assert beside.added["text_lengths"].device.type == "cpu"
    assert not beside.context[0, n:].any()
    with pytest.raises(ValueError, match="carry different conditions"):  # not joined without its lengths
        PromptEmbeddings.cat([PromptEmbeddings(alone.context, {}), beside])


def test_a_controlnet_of_another_family_or_transformer_is_refused(world):
    from tiny_flux import tiny_flux_base

    flux_cn = tiny_flux_base().new_controlnet({"num_layers": 1, "num_single_layers": 1})
    with pytest.raises(ValueError, match="CN is not a Qwen-Image ControlNet, and BASE is Qwen-Image"):
        world.check_controlnet(flux_cn, controlnet_name="CN", base_name="BASE")
    other = QwenImageTransformer2DModel(**{**TRANSFORMER, "joint_attention_dim": 16})
    wrong = QwenImageControlNet.from_transformer(other, QwenImageControlNetConfig(1))
    with pytest.raises(
        ValueError, match="made for another transformer than BASE: joint_attention_dim 16 vs 12"
    ):
        world.check_controlnet(wrong, controlnet_name="CN", base_name="BASE")


def test_fp8_takes_the_token_layers_and_stores_the_modulation():
    """--fp8 on Qwen-Image: the attention and feed-forward products of the transformer's and the
    ControlNet's blocks in FP8, the modulation layers (one vector per sample) stored in FP8 with
    their products in bf16; the result stays close to full precision."""
    from controlnet.model.fp8 import FP8Linear

    base = qwen_base()
    cn = controlnet(base, 2, seed=1)
    full = ours(base, [ControlUnit(cn, condition(5), 0.8)], [7])
    base.use_fp8([cn])
    for network in (base.transformer, cn):
        layers = dict(network.transformer_blocks[0].named_modules())
        kinds = {name: (type(m), getattr(m, "weight_only", None)) for name, m in layers.items()}
        assert kinds["img_mod.1"] == kinds["txt_mod.1"] == (FP8Linear, True)
        assert kinds["attn.to_q"] == kinds["img_mlp.net.2"] == kinds["attn.to_add_out"] == (FP8Linear, False)
    fp8 = ours(base, [ControlUnit(cn, condition(5), 0.8)], [7])
    rel = float((fp8 - full).norm() / full.norm())
    assert 0 < rel < 0.1, rel


def test_a_single_step_is_finite():
    """Qwen-Image's schedule is stretched to end at 0.02; a schedule of one level cannot be
    (diffusers' scheduler divides 0 by 0 and returns NaN): one step runs from noise to the end."""
    base = qwen_base()
    assert torch.isfinite(ours(base, [], [3], steps=1)).all()


def test_the_base_and_controlnet_run_fused_blocks(world):
    """The transformer's blocks and a ControlNet's run the fused forward (the tests above hold it
    to diffusers' blocks, which the pipeline ran under stock_blocks)."""
    assert all(type(b) is FusedQwenImageBlock for b in world.transformer.transformer_blocks)
    cn = controlnet(world, 2, seed=1)
    assert all(type(b) is FusedQwenImageBlock for b in cn.transformer_blocks)
    with stock_blocks(world.transformer):
        assert not any(isinstance(b, FusedQwenImageBlock) for b in world.transformer.transformer_blocks)


def test_a_step_takes_each_blocks_modulation_once_and_a_calls_rotary_table_once(world, monkeypatch):
    """The guidance halves of a step run as separate calls when their captions differ in length;
    both read the same timestep embedding, so each block takes its modulation products once a
    step, and the blocks of a call make their rotary table once - and the latents are bitwise
    those of taking them in every block and call."""
    import contextlib

    from controlnet.families.qwenimage import base as qwen
    from controlnet.families.qwenimage import fused

    calls, tables = [], []
    block = world.transformer.transformer_blocks[0]
    hook = block.img_mod.register_forward_hook(lambda *_: calls.append(1))
    table = fused._table
    monkeypatch.setattr(fused, "_table", lambda freqs: tables.append(1) or table(freqs))
    units = [ControlUnit(controlnet(world, 2, seed=1), condition(5), 0.8)]
    prompts, negatives = ["a much longer prompt about a blue square"], [""]  # two calls a step
    blocks = len(world.transformer.transformer_blocks)
    try:
        shared = ours(world, units, [7], steps=2, prompts=prompts, negatives=negatives)
        assert len(calls) == 2  # once in each of the 2 steps
        # rotary tables (two _table calls each) a step: one per call of the base (its captions'
        # lengths differ), one per block of the ControlNet (2), which runs outside the sharing
        assert len(tables) == 2 * 2 * (2 + 2)
        monkeypatch.setattr(qwen, "sharing_step", lambda network: contextlib.nullcontext())
        calls.clear(), tables.clear()
        each = ours(world, units, [7], steps=2, prompts=prompts, negatives=negatives)
        assert len(calls) == 4  # in both calls of each step
        assert len(tables) == 2 * 2 * (2 * blocks + 2)  # in every block
    finally:
        hook.remove()
    assert torch.equal(shared, each)
    assert "_shared_modulation" not in block.__dict__  # nothing kept after the step
    assert "_shared_rotary" not in block.__dict__
