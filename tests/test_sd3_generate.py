"""SD3 / SD3.5 generation through the generic path (the family protocol's SD3Base): equal to
diffusers' StableDiffusion3ControlNetPipeline on the same tiny weights, noise and conditions, with
classifier-free guidance - an InstantX-style ControlNet, an SD3.5 Large-style one (the base's
tokens, no text), two with their own strengths and windows, and a model without its T5."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3ControlNetModel,
    SD3MultiControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3ControlNetPipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from controlnet.families.sd.configs import Family
from controlnet.families.sd3 import SD3ControlNet, SD3ControlNetConfig
from controlnet.families.sd3.base import SD3_SCHEDULE, SD3Base
from controlnet.generation.denoiser import ControlUnit
from controlnet.generation.sampling import Sampling, initial_noise, render
from controlnet.text.tokenizer import clip_tokenizer
from tiny_flux import t5_tokenizer

TRANSFORMER = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 4,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 12,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 10,
    "out_channels": 4,
    "pos_embed_max_size": 32,
}
SIZE, SEQ, GUIDANCE = (32, 48), 8, 4.5


def clip(
    hidden: int, projection: int, act: str = "quick_gelu", heads: int = 1
) -> CLIPTextModelWithProjection:
    cfg = CLIPTextConfig(
        hidden_act=act,
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(cfg).eval()


#: sizes that files without a config can hold: SD3's 64-channel heads, CLIP's 64-channel heads
#: (CLIP-L 64 wide, CLIP-G 128: a context and pooled vector 192 wide), a VAE of 32 norm groups
CONFIG_LESS = {
    "attention_head_dim": 64,
    "num_attention_heads": 1,
    "joint_attention_dim": 192,
    "caption_projection_dim": 64,
    "pooled_projection_dim": 192,
}


def sd3_base(with_t5: bool = True, *, config_less: bool = False, latent: int = 4) -> SD3Base:
    """A tiny SD3 base model; ``config_less``: of sizes Stability AI's single file can hold;
    ``latent``: its latent channels (SD3's own 16 where a peer insists)."""
    torch.manual_seed(0)
    sizes = {
        **TRANSFORMER,
        **(CONFIG_LESS if config_less else {}),
        "in_channels": latent,
        "out_channels": latent,
    }
    transformer = SD3Transformer2DModel(**sizes).eval()
    vae = AutoencoderKL(
        block_out_channels=(32, 32) if config_less else (8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent,
        layers_per_block=1,
        norm_num_groups=32 if config_less else 4,
        scaling_factor=1.5305 if config_less else 1.5,
        shift_factor=0.0609 if config_less else 0.06,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    with torch.no_grad():  # a posterior of no spread: diffusers samples the condition's latents
        vae.encoder.conv_out.weight[latent:].zero_()
        vae.encoder.conv_out.bias[latent:].fill_(-1000.0)
    width = 192 if config_less else 12
    t5 = T5EncoderModel(
        T5Config(vocab_size=32, d_model=width, d_kv=4, d_ff=24, num_layers=2, num_heads=3)
    ).eval()
    clip_l, clip_g = (
        (clip(64, 64), clip(128, 128, "gelu", heads=2)) if config_less else (clip(4, 4), clip(6, 6, "gelu"))
    )
    return SD3Base(
        transformer,
        vae,
        clip_l,
        clip_g,
        t5 if with_t5 else None,
        clip_tokenizer(Family.SD1),
        clip_tokenizer(Family.SDXL, second=True),
        t5_tokenizer() if with_t5 else None,
        max_sequence_length=SEQ,
    )


@pytest.fixture(scope="module")
def world() -> SD3Base:
    return sd3_base()


def controlnet(base: SD3Base, config: SD3ControlNetConfig, seed: int) -> SD3ControlNet:
    torch.manual_seed(seed)
    cn = SD3ControlNet(dict(base.transformer.config), config)
    if config.reads_text:
        cn = SD3ControlNet.from_transformer(base.transformer, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_blocks", "pos_embed_input")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return cn.eval()


def peer(cn: SD3ControlNet) -> SD3ControlNetModel:
    c = cn.config
    extra = {} if c.reads_text else {"use_pos_embed": False, "joint_attention_dim": None}
    fields = {k: v for k, v in TRANSFORMER.items() if k != "num_layers"}
    model = SD3ControlNetModel(
        **{**fields, **extra},
        num_layers=c.num_layers,
        force_zeros_for_pooled_projection=c.zero_pooled,
        extra_conditioning_channels=c.extra_conditioning_channels,
    ).eval()
    model.load_state_dict(cn.state_dict())
    return model


def pipeline(cls, base: SD3Base, **extra):
    """A diffusers SD3 pipeline of class ``cls`` over ``base``'s parts (and ``extra`` ones)."""
    pipe = cls(
        transformer=base.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULE),
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2,
        text_encoder_3=base.text_encoder_3,
        tokenizer_3=base.tokenizer_3,
        **extra,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def condition(seed: int) -> torch.Tensor:
    return torch.rand(1, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


def ours(base, units, seeds, steps=3):
    sampling = Sampling("euler", "default", steps, GUIDANCE)
    n = len(seeds)
    return render(base, units, ["a red disk"] * n, [""] * n, seeds, SIZE, sampling, progress=False).latents


def theirs(base, cns, conds, scales, seeds, steps=3, starts=None, ends=None):
    many = len(cns) > 1
    net = SD3MultiControlNetModel([peer(c) for c in cns]) if many else peer(cns[0])
    pipe = pipeline(StableDiffusion3ControlNetPipeline, base, controlnet=net)
    h, w = base.latent_size(SIZE)
    noise = initial_noise((len(seeds), 4, h, w), seeds, torch.device("cpu"), torch.float32)
    conds = [c * 2 - 1 for c in conds]  # a tensor reaches the VAE as it is: give it [-1, 1]
    kw = {}
    if starts is not None:
        kw = {"control_guidance_start": starts, "control_guidance_end": ends}
    with torch.no_grad():
        return pipe(
            prompt=["a red disk"] * len(seeds),
            negative_prompt=[""] * len(seeds),
            control_image=conds if many else conds[0],
            controlnet_conditioning_scale=scales if many else scales[0],
            height=SIZE[0],
            width=SIZE[1],
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            latents=noise,
            max_sequence_length=SEQ,
            output_type="latent",
            **kw,
        ).images


def close(a, b):
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "config",
    [
        SD3ControlNetConfig(num_layers=2),  # InstantX's: zero pooled input, unshifted latents
        SD3ControlNetConfig(
            num_layers=2, own_pos_embed=False, reads_text=False, zero_pooled=False
        ),  # SD3.5 L
    ],
    ids=["instantx", "sd3.5-large"],
)
def test_one_controlnet_equals_the_pipeline(world, config):
    cn = controlnet(world, config, seed=1)
    close(
        ours(world, [ControlUnit(cn, condition(5), 0.8)], [7, 8]),
        theirs(world, [cn], [condition(5)], [0.8], [7, 8]),
    )


def test_two_controlnets_with_their_own_strengths_and_windows(world):
    a = controlnet(world, SD3ControlNetConfig(num_layers=2), seed=1)
    b = controlnet(world, SD3ControlNetConfig(num_layers=2), seed=2)
    # windows on step boundaries: diffusers counts step i in while (i + 1) / N <= end, we while
    # i / N < end (the sidecars' convention); they agree where end * N is whole
    units = [ControlUnit(a, condition(5), 0.7, 0.0, 0.5), ControlUnit(b, condition(6), 1.2, 0.25, 1.0)]
    cns, conds = [a, b], [condition(5), condition(6)]
    want = theirs(world, cns, conds, [0.7, 1.2], [3], steps=4, starts=[0.0, 0.25], ends=[0.5, 1.0])
    close(ours(world, units, [3], steps=4), want)


def test_a_model_without_its_t5_reads_zeros_in_its_place():
    base = sd3_base(with_t5=False)
    cn = controlnet(base, SD3ControlNetConfig(num_layers=2), seed=4)
    close(
        ours(base, [ControlUnit(cn, condition(9), 1.0)], [11]),
        theirs(base, [cn], [condition(9)], [1.0], [11]),
    )


def test_img2img_equals_the_pipeline(world, monkeypatch):
    """Half the schedule from an image's latents, with classifier-free guidance (both sides take
    the image's posterior mean; diffusers would draw a sample with the seed's generator)."""
    import diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img as img2img
    from diffusers import StableDiffusion3Img2ImgPipeline

    monkeypatch.setattr(
        img2img, "retrieve_latents", lambda out, generator=None, sample_mode=None: out.latent_dist.mode()
    )
    image = torch.rand(1, 3, *SIZE, generator=torch.Generator().manual_seed(21))
    init = world.encode_images(image * 2 - 1)
    sampling = Sampling("euler", "default", 4, GUIDANCE)
    got = render(
        world,
        [],
        ["a red disk"],
        [""],
        [7],
        SIZE,
        sampling,
        init_latents=init,
        denoise_strength=0.5,
        progress=False,
    ).latents
    pipe = pipeline(StableDiffusion3Img2ImgPipeline, world)
    with torch.no_grad():
        want = pipe(
            prompt=["a red disk"],
            negative_prompt=[""],
            image=image * 2 - 1,
            strength=0.5,
            height=SIZE[0],
            width=SIZE[1],
            num_inference_steps=4,
            guidance_scale=GUIDANCE,
            generator=[torch.Generator().manual_seed(7)],
            max_sequence_length=SEQ,
            output_type="latent",
        ).images
    close(got, want)


def test_masked_editing_equals_the_inpaint_pipeline(monkeypatch):
    """Regenerate inside a mask on whole latent cells, keep the source outside it every step, with
    classifier-free guidance (both sides take the image's posterior mean). diffusers' pipeline
    takes SD3's 16 latent channels only."""
    world = sd3_base(latent=16)
    import diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_inpaint as inpaint
    from diffusers import StableDiffusion3InpaintPipeline

    from controlnet.generation.sampling import mask_to_latent

    monkeypatch.setattr(
        inpaint, "retrieve_latents", lambda out, generator=None, sample_mode=None: out.latent_dist.mode()
    )
    image = torch.rand(1, 3, *SIZE, generator=torch.Generator().manual_seed(21))
    pixel_mask = torch.zeros(1, 1, *SIZE)
    pixel_mask[..., 8:24, 12:36] = 1.0  # whole latent cells of the tiny VAE
    init = world.encode_images(image * 2 - 1)
    mask = mask_to_latent(pixel_mask, world.latent_size(SIZE))
    sampling = Sampling("euler", "default", 4, GUIDANCE)
    got = render(
        world, [], ["a red disk"], [""], [7], SIZE, sampling, init_latents=init, mask=mask, progress=False
    ).latents
    pipe = pipeline(StableDiffusion3InpaintPipeline, world)
    with torch.no_grad():
        want = pipe(
            prompt=["a red disk"],
            negative_prompt=[""],
            image=image * 2 - 1,
            mask_image=pixel_mask,
            strength=1.0,
            height=SIZE[0],
            width=SIZE[1],
            num_inference_steps=4,
            guidance_scale=GUIDANCE,
            generator=[torch.Generator().manual_seed(7)],
            max_sequence_length=SEQ,
            output_type="latent",
        ).images
    close(got, want)


def test_controlnet_is_more_important_acts_on_the_conditional_half_only(world):
    """With classifier-free guidance, a control in the "ControlNet is more important" mode leaves
    the unconditional half as the base alone makes it; a region keeps it to part of the image."""
    from controlnet.model.control import Control

    cn = controlnet(world, SD3ControlNetConfig(num_layers=2), seed=1)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 12, generator=g)
    context = torch.randn(2, 77 + SEQ, 12, generator=g)
    added = {"pooled": torch.randn(2, 10, generator=g)}
    hint = torch.randn(1, 4, 8, 12, generator=g)
    t = torch.tensor(600.0)
    with torch.no_grad():
        plain = world.predict(x, t, context, [], added=added, cfg_batch=True)
        both = world.predict(x, t, context, [Control(cn, hint, [1.0, 1.0])], added=added, cfg_batch=True)
        half = world.predict(
            x, t, context, [Control(cn, hint, [1.0, 1.0], True)], added=added, cfg_batch=True
        )
        nowhere = world.predict(
            x,
            t,
            context,
            [Control(cn, hint, [1.0, 1.0], False, torch.zeros(1, 1, 8, 12))],
            added=added,
            cfg_batch=True,
        )
    torch.testing.assert_close(half[:1], plain[:1], rtol=1e-5, atol=1e-6)  # unconditional: the base's
    torch.testing.assert_close(half[1:], both[1:], rtol=1e-5, atol=1e-6)  # conditional: controlled
    assert not torch.allclose(both[:1], plain[:1])
    torch.testing.assert_close(nowhere, plain, rtol=1e-5, atol=1e-6)


def test_an_inpainting_controlnet_equals_the_inpainting_pipeline(world):
    """An inpainting ControlNet reads the image with its masked pixels black and 1 - the mask at
    the latents' size beside its latents. Our condition marks masked pixels -1 (the inpaint map's
    convention); diffusers takes the image and the mask apart."""
    from diffusers import StableDiffusion3ControlNetInpaintingPipeline

    cn = controlnet(world, SD3ControlNetConfig(num_layers=2, extra_conditioning_channels=1), seed=6)
    image = torch.rand(1, 3, *SIZE, generator=torch.Generator().manual_seed(21))
    mask = torch.zeros(1, 1, *SIZE)
    mask[..., 8:24, 12:36] = 1.0
    ours_condition = torch.where(mask > 0.5, torch.full_like(image, -1.0), image)
    got = ours(world, [ControlUnit(cn, ours_condition, 0.9)], [5], steps=4)
    pipe = pipeline(StableDiffusion3ControlNetInpaintingPipeline, world, controlnet=peer(cn))
    h, w = world.latent_size(SIZE)
    noise = initial_noise((1, 4, h, w), [5], torch.device("cpu"), torch.float32)
    with torch.no_grad():
        want = pipe(
            prompt=["a red disk"],
            negative_prompt=[""],
            control_image=image * 2 - 1,
            control_mask=mask,
            controlnet_conditioning_scale=0.9,
            height=SIZE[0],
            width=SIZE[1],
            num_inference_steps=4,
            guidance_scale=GUIDANCE,
            latents=noise,
            max_sequence_length=SEQ,
            output_type="latent",
        ).images
    close(got, want)
